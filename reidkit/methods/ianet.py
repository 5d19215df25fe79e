"""IANet: Interaction-and-Aggregation Network (Hou et al., CVPR 2019).

A global-feature re-ID network whose backbone carries IA blocks
(:class:`reidkit.models.interaction.IABlock`: spatial IA, then channel IA on its output)
after the last block of given stages (the paper's: layer2 and layer3)::

    image -> ResNet with IA blocks -> GAP -> BN1d (trainable bias) -> Linear (with bias)

Loss: CE with label smoothing + batch-hard triplet (margin 0.3) with the cosine distance
(``1 - cos``) on the post-BN feature (presets: ``loss.triplet_distance=cosine``,
``loss.triplet_feature=post_bn``). Test feature: the post-BN vector (cosine distance).

Options ``model.ianet`` (:class:`IANetOptions`): ``stages`` (``[]`` is the slides'
baseline: the same head and loss without IA blocks), ``parts`` (``ia``, ``sia``, ``cia``:
the slides' ablations CIA / SIA / IA at stage 3, IA at stage 2, IA at stages 2+3),
``kernel`` (K of SIA's K x K appearance neighbourhood; 1 = the authors' code), and the
location-prior widths.

**Location prior at other input sizes.** The authors' ``(ax, ay)`` are in cells of the
maps of a 256x128 input (:data:`~reidkit.models.interaction.IANET_STAGE_SIGMAS`: 10, 20
after layer2's 32x16 map, 5, 10 after layer3's 16x8). Stage maps scale with the input, so
by default (``scale_sigmas: true``) the widths scale with it too, ``ax * W / 128`` and
``ay * H / 256``: the prior covers the same fraction of the person at any size (at
128x64, 5, 10 after layer2 and 2.5, 5 after layer3). ``scale_sigmas: false`` keeps the
widths in cells as given.

The class extends :class:`~reidkit.methods.baseline.Baseline` (backbone, pooling, neck,
losses, test features), so the ranking report, CAM and Grad-CAM tools work unchanged; the
IA blocks live at ``backbone.ia_<stage>.0`` (:meth:`IANet.ia_blocks`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from reidkit.config import Config
from reidkit.methods.base import MethodOptions, method_options, register_method
from reidkit.methods.baseline import Baseline
from reidkit.models import BNNeck
from reidkit.models.backbone import Backbone
from reidkit.models.interaction import IANET_STAGE_SIGMAS, IABlock

__all__ = ["IANet", "IANetOptions", "ianet_sigmas", "SIGMA_REFERENCE_SIZE"]

#: Input ``(H, W)`` at which the authors' location-prior widths are given.
SIGMA_REFERENCE_SIZE: tuple[int, int] = (256, 128)


class IANetOptions(MethodOptions):
    """``model.ianet``: IANet's options."""

    stages: list[Literal["layer1", "layer2", "layer3", "layer4"]] = Field(
        default_factory=lambda: ["layer2", "layer3"]
    )  # an IA block after the last block of each; [] = the baseline
    parts: Literal["ia", "sia", "cia"] = "ia"  # SIA + CIA, or one of them (the ablations)
    kernel: int = Field(1, ge=1)  # odd K of SIA's K x K appearance neighbourhood
    # (ax, ay) per stage in cells at 256x128; stages not given use IANET_STAGE_SIGMAS
    sigmas: dict[str, tuple[float, float]] = Field(default_factory=dict)
    scale_sigmas: bool = True  # scale (ax, ay) with data.width / 128, data.height / 256

    @field_validator("kernel")
    @classmethod
    def _odd_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"kernel must be odd (1, 3, 5, ...), got {k}")
        return k

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages must not repeat, got {stages}")
        return stages


def ianet_sigmas(opts: IANetOptions, height: int, width: int) -> dict[str, tuple[float, float]]:
    """``{stage: (ax, ay)}`` in cells for ``opts.stages`` at an ``height x width`` input
    (scaled from 256x128 when ``opts.scale_sigmas``); ``ValueError`` for a stage with no
    widths (only layer2 / layer3 have the authors' values)."""
    ref_h, ref_w = SIGMA_REFERENCE_SIZE
    out = {}
    for stage in opts.stages:
        given = opts.sigmas.get(stage, IANET_STAGE_SIGMAS.get(stage))
        if given is None:
            raise ValueError(
                f"model.ianet.sigmas: no location-prior widths for {stage} (the authors give "
                f"them for {', '.join(IANET_STAGE_SIGMAS)}); set model.ianet.sigmas."
                f"{stage}=[ax, ay] (cells at 256x128)"
            )
        ax, ay = (float(v) for v in given)
        if ax <= 0 or ay <= 0:
            raise ValueError(f"model.ianet.sigmas.{stage}: ax and ay must be > 0, got {given}")
        if opts.scale_sigmas:
            ax, ay = ax * width / ref_w, ay * height / ref_h
        out[stage] = (ax, ay)
    return out


@register_method(
    "ianet",
    options=IANetOptions,
    presets={
        "model": {"pooling": "avg"},
        "loss": {
            "label_smoothing": 0.1,
            "metric": "triplet",
            "triplet_margin": 0.3,
            "triplet_distance": "cosine",
            "triplet_feature": "post_bn",
        },
        "test": {"feature": "post_bn", "metric": "cosine"},
    },
)
class IANet(Baseline):
    """IANet: a ResNet with interaction-aggregation blocks and a BN head.

    Args:
        cfg: the experiment config (``model.ianet`` for the blocks, ``data.height`` /
            ``data.width`` for the location-prior scaling).
        num_classes: training identities (0: inference only).
    """

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        opts = method_options(cfg, IANetOptions, "ianet")
        if not isinstance(self.backbone, Backbone):
            raise ValueError(
                f"model.backbone='{cfg.model.backbone}': IANet needs a staged backbone to "
                "insert its blocks into"
            )
        self.opts = opts
        self.sigmas = ianet_sigmas(opts, cfg.data.height, cfg.data.width)
        for stage, (ax, ay) in self.sigmas.items():
            last = len(getattr(self.backbone, stage)) - 1
            self.backbone.insert_blocks(
                "ia",
                {stage: [last]},
                lambda ch, ax=ax, ay=ay: IABlock(ch, ax, ay, kernel=opts.kernel, parts=opts.parts),
            )
        # GAP -> BN1d with a trainable bias -> Linear with a bias (the authors' head)
        self.neck = BNNeck(
            self.feat_dim, num_classes, neck="bnneck", bn_bias=True, classifier_bias=True
        )

    def ia_blocks(self) -> dict[str, IABlock]:
        """``{dotted module name: block}`` of the inserted IA blocks, in stage order."""
        return {
            f"backbone.ia_{stage}.0": getattr(self.backbone, f"ia_{stage}")[0]
            for stage in self.sigmas
        }

    def default_cam_layer(self, part: str | None = None) -> str:
        """Grad-CAM layer: the last stage of the backbone."""
        return f"backbone.{self.backbone.stage_names[-1]}"
