"""SCR: spatial-channel partition (Chen, Lagadec and Bremond, WACV 2020).

Architecture (the authors' public code, an MGN-style code base)::

    image -> shared trunk (stem .. layer3[0]) -> 3 unshared copies of layer3[1:] + layer4
          (layer4 with stride 1 in all three: 24x12 maps at 384x192)
    branch 1: global max pool                                        -> p1
    branch 2: global (p2), 2 horizontal stripes (p2_s1, p2_s2) and 2 channel groups of
              the global pooled vector (p2_c1, p2_c2)
    branch 3: global (p3), 3 stripes (p3_s1..s3), 3 channel groups (p3_c1..c3)
    each part: 1x1 conv to 256 (no bias) + BN (no ReLU) -> its own Linear classifier (bias)

Channel groups of a ``C``-channel vector cut it at multiples of ``ceil(C / n)``: for
ResNet-50 (``C = 2048``) the code's ``[0:1024], [1024:2048]`` and ``[0:683], [683:1366],
[1366:2048]``; for ResNet-18 (``C = 512``) ``[0:256], [256:512]`` and ``[0:171],
[171:342], [342:512]`` (:func:`channel_groups`). Stripes are adaptive poolings to
``(n, 1)``, so heights that ``n`` does not divide get overlapping stripes.

Loss (:meth:`SCR.compute_loss`): ``triplet`` = mean over the three reduced globals of the
batch-hard triplet (margin 1.2), ``ce`` = ``loss.ce_weight`` (2) x mean over the parts of
the cross entropy (no label smoothing). Both come from the shared
:class:`~reidkit.losses.ReIDLoss`, so ``loss.*`` (focal loss, another metric, center loss)
keeps its meaning; the presets set the paper's values.

Test feature (``post_bn``): the reduced features of all parts concatenated in the
authors' order ``p1, p2, p3, p2_c1, p2_c2, p2_s1, p2_s2, p3_c1..c3, p3_s1..s3`` (3,328-d
for 13 parts of 256). The authors sum the features of the image and its mirror and
L2-normalise; the engine's flip TTA (``test.flip``) averages them, which gives the same
normalised vector. Distance: Euclidean (``test.metric``).

Options ``model.scr`` (:class:`SCROptions`): ``spatial`` / ``channel`` switch the stripes
and the channel groups (the ablations: spatial only is an all-stride-1 MGN, channel only,
both), ``reduce_dim`` the part width. Grad-CAM of one part: ``part_logit("p2_s1")`` on the
training outputs with layer :meth:`SCR.default_cam_layer` (the part's branch's layer4).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from reidkit.config import Config
from reidkit.losses import ReIDLoss
from reidkit.methods.base import (
    Batch,
    MethodOptions,
    ReIDMethod,
    Role,
    method_options,
    register_method,
)
from reidkit.models.backbone import Backbone, split_backbone

__all__ = ["SCR", "SCROptions", "SCRPart", "channel_groups", "scr_parts"]

#: Stripes and channel groups of branches 2 and 3 (branch 1 is global only).
BRANCH_SPLITS: dict[int, int] = {2: 2, 3: 3}


class SCROptions(MethodOptions):
    """``model.scr``: SCR's options."""

    spatial: bool = True  # horizontal stripes in branches 2 and 3
    channel: bool = True  # channel groups of the global vectors of branches 2 and 3
    reduce_dim: int = Field(256, gt=0)  # width of every part after its 1x1 conv + BN
    split_at: str = "layer3.1"  # first block of the branches (the trunk ends before it)


@dataclass(frozen=True)
class SCRPart:
    """One part: ``name`` (``p2_s1``), ``branch`` (1-3), ``kind`` (``global``,
    ``stripe`` or ``channel``), ``index`` (0-based stripe / group), the channel range
    ``[start, stop)`` it reads and its input width."""

    name: str
    branch: int
    kind: str
    index: int
    start: int
    stop: int

    @property
    def in_dim(self) -> int:
        return self.stop - self.start


def channel_groups(channels: int, n: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``n`` channel groups of a ``channels``-wide vector, cut at
    multiples of ``ceil(channels / n)`` as the authors' code (2048, 3 -> 683, 1366).

    Raises ``ValueError`` when a group would be empty (``channels`` too small for ``n``).
    """
    if n < 1 or channels < 1:
        raise ValueError(f"channel_groups: need channels >= 1 and n >= 1, got {channels}, {n}")
    step = math.ceil(channels / n)
    bounds = [(i * step, min((i + 1) * step, channels)) for i in range(n)]
    if any(stop <= start for start, stop in bounds):
        raise ValueError(
            f"SCR channel partition: {channels} channels cannot be cut into {n} non-empty "
            f"groups at multiples of ceil({channels}/{n}) = {step}"
        )
    return bounds


def scr_parts(channels: int, spatial: bool = True, channel: bool = True) -> list[SCRPart]:
    """The parts of SCR in the authors' order: ``p1, p2, p3``, then per branch 2 and 3
    its channel groups (``_c``) and its stripes (``_s``)."""
    parts = [SCRPart(f"p{b}", b, "global", 0, 0, channels) for b in (1, 2, 3)]
    for b, n in BRANCH_SPLITS.items():
        if channel:
            for i, (start, stop) in enumerate(channel_groups(channels, n)):
                parts.append(SCRPart(f"p{b}_c{i + 1}", b, "channel", i, start, stop))
        if spatial:
            parts.extend(SCRPart(f"p{b}_s{i + 1}", b, "stripe", i, 0, channels) for i in range(n))
    return parts


def _reduction(in_dim: int, out_dim: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN, no ReLU; MGN's initialisation (Kaiming fan-in conv, BN
    weight N(1, 0.02))."""
    conv = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in")
    bn = nn.BatchNorm2d(out_dim)
    nn.init.normal_(bn.weight, mean=1.0, std=0.02)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@register_method(
    "scr",
    options=SCROptions,
    presets={
        "model": {"pooling": "max", "last_stride": 1},
        "loss": {
            "label_smoothing": 0.0,
            "ce_weight": 2.0,
            "metric": "triplet",
            "metric_weight": 1.0,
            "triplet_margin": 1.2,
            "triplet_feature": "post_bn",
        },
        "test": {"flip": True, "normalize": True, "metric": "euclidean"},
    },
)
class SCR(ReIDMethod):
    """SCR: three-branch network with spatial (stripe) and channel-group parts.

    Args:
        cfg: the experiment config (``model.*``, ``model.scr``, ``loss.*``, ``test.feature``).
        num_classes: training identities (0: inference only, no classifiers).
        backbone: optional pre-built staged backbone (default: from ``cfg.model``, weights
            loaded before the split, so the three branches start from the same weights).
    """

    feature_names = ("post_bn", "pre_bn")

    def __init__(self, cfg: Config, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        mcfg = cfg.model
        opts = method_options(cfg, SCROptions, "scr")
        if mcfg.pooling not in ("max", "avg"):
            raise ValueError(
                f"model.pooling='{mcfg.pooling}': SCR pools its global vectors and stripes with "
                "'max' (the paper's) or 'avg'"
            )
        if backbone is None:
            from reidkit.models import backbone_from_config

            backbone = backbone_from_config(mcfg)
        if not isinstance(backbone, Backbone) or not backbone.stage_names:
            raise ValueError(
                f"model.backbone='{mcfg.backbone}': SCR needs a staged backbone "
                "(reidkit.models.backbone.Backbone) to split into a trunk and three branches"
            )
        channels = int(backbone.out_channels)
        self.opts = opts
        self.num_classes = num_classes
        self.pooling = mcfg.pooling
        self.channels = channels
        self.reduce_dim = opts.reduce_dim
        self.triplet_feature = cfg.loss.triplet_feature
        self.parts = scr_parts(channels, spatial=opts.spatial, channel=opts.channel)
        self.part_names = [p.name for p in self.parts]
        self.backbone, self.branches = split_backbone(backbone, opts.split_at, 3)
        self.reductions = nn.ModuleDict(
            {p.name: _reduction(p.in_dim, opts.reduce_dim) for p in self.parts}
        )
        self.classifiers = nn.ModuleDict()
        if num_classes > 0:
            for p in self.parts:
                cls = nn.Linear(opts.reduce_dim, num_classes)
                nn.init.kaiming_normal_(cls.weight, mode="fan_out")
                nn.init.zeros_(cls.bias)
                self.classifiers[p.name] = cls
        # ID term of every part; metric (+ center / extra) term of each reduced global,
        # one module per global so loss-owned parameters (centres) are not shared
        self.part_loss = ReIDLoss(cfg.loss, num_classes, opts.reduce_dim, metric_loss=False)
        self.global_losses = nn.ModuleList(
            ReIDLoss(cfg.loss, num_classes, opts.reduce_dim, id_loss=False) for _ in range(3)
        )

    # ------------------------------------------------------------------ building blocks
    def _pool(self, x: torch.Tensor, rows: int = 1) -> torch.Tensor:
        """``(B, C, h, w) -> (B, C, rows)``: global (rows = 1) or stripe pooling."""
        if self.pooling == "max":
            return F.adaptive_max_pool2d(x, (rows, 1)).flatten(2)
        return F.adaptive_avg_pool2d(x, (rows, 1)).flatten(2)

    def branch_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The three branches' final maps, each ``(B, C, h, w)``."""
        x = self.backbone(images)
        return [branch(x) for branch in self.branches]

    def pooled_parts(self, maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pooled vector of every part, ``{name: (B, in_dim)}`` in the authors' order."""
        glob = [self._pool(m)[..., 0] for m in maps]  # (B, C) each
        stripes = {b: self._pool(maps[b - 1], n) for b, n in BRANCH_SPLITS.items()}
        out: dict[str, torch.Tensor] = {}
        for p in self.parts:
            if p.kind == "global":
                out[p.name] = glob[p.branch - 1]
            elif p.kind == "channel":
                out[p.name] = glob[p.branch - 1][:, p.start : p.stop]
            else:
                out[p.name] = stripes[p.branch][..., p.index]
        return out

    def reduce(self, pooled: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """``(pre_bn, post_bn)``: each ``{name: (B, reduce_dim)}`` (1x1 conv, then its BN)."""
        pre, post = {}, {}
        for name, vec in pooled.items():
            conv, bn = self.reductions[name]
            z = conv(vec[..., None, None])
            pre[name] = z.flatten(1)
            post[name] = bn(z).flatten(1)
        return pre, post

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def ranking_feature_maps(self, images: torch.Tensor, feature: str = "post_bn") -> torch.Tensor:
        """The three branch maps ``(3, B, C, h, w)`` for the ranking report's activation
        maps (:mod:`reidkit.viz.ram`). The RAM's identity (grid mean = similarity) holds
        for average-pooled features; with SCR's max pooling and part reductions the maps
        are an approximation of where each branch's global feature matches."""
        if feature not in ("post_bn", "pre_bn"):
            raise ValueError(f"feature must be 'post_bn' or 'pre_bn', got {feature!r}")
        with torch.no_grad():
            return torch.stack(self.branch_maps(images))

    def default_cam_layer(self, part: str | None = None) -> str:
        """The layer to explain a score with Grad-CAM: for a part, the last stage of its
        branch (``branches.1.stages.1`` is branch 2's layer4); without a part (the mean
        logit, a pair similarity: every branch contributes) the trunk's last stage, the
        one map all three branches read (same resolution, layer4 having stride 1)."""
        if part is None:
            stage, _, block = self.opts.split_at.partition(".")
            names = self.backbone.stage_names
            if block and int(block) > 0:
                return f"backbone.{stage}"
            return f"backbone.{names[names.index(stage) - 1]}"
        found = [p for p in self.parts if p.name == part]
        if not found:
            raise ValueError(f"SCR has no part '{part}' (parts: {', '.join(self.part_names)})")
        branch = found[0].branch
        tail = self.branches[branch - 1]
        stages = getattr(tail, "stages", None)
        if stages is None:
            return f"branches.{branch - 1}"
        return f"branches.{branch - 1}.stages.{len(stages) - 1}"

    # -------------------------------------------------------------------------- API
    def forward(self, batch: Batch) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """Training outputs.

        ``part_feats`` / ``part_pre_bn``: ``{name: (B, reduce_dim)}`` after / before the
        reduction BN; ``part_logits``: ``{name: (B, num_classes)}`` (for
        :func:`reidkit.viz.grad_cam.part_logit`); ``logits``: their mean over parts
        (accuracy, ``class_logit``); ``global_feats``: ``(3, B, reduce_dim)`` reduced
        globals (the ``loss.triplet_feature`` side); ``post_bn`` / ``pre_bn``: the
        concatenated test features ``(B, P * reduce_dim)``.
        """
        maps = self.branch_maps(batch["images"])
        pre, post = self.reduce(self.pooled_parts(maps))
        side = post if self.triplet_feature == "post_bn" else pre
        out: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {
            "part_feats": post,
            "part_pre_bn": pre,
            "global_feats": torch.stack([side["p1"], side["p2"], side["p3"]]),
            "post_bn": torch.cat([post[n] for n in self.part_names], dim=1),
            "pre_bn": torch.cat([pre[n] for n in self.part_names], dim=1),
        }
        if self.num_classes > 0:
            logits = {n: self.classifiers[n](post[n]) for n in self.part_names}
            out["part_logits"] = logits
            out["logits"] = torch.stack(list(logits.values())).mean(dim=0)
        return out

    def compute_loss(self, outputs: dict, batch: Batch) -> dict[str, torch.Tensor]:
        """``ce``: ``loss.ce_weight`` x mean CE over the parts' classifiers; the metric
        term (``triplet``; center / extra when configured): mean over the three reduced
        globals of ``loss.metric_weight`` x the loss."""
        if "part_logits" not in outputs:
            raise RuntimeError("compute_loss needs logits; the model was built with num_classes=0")
        pids = batch["pids"]
        terms: dict[str, torch.Tensor] = {}
        calls = [self.part_loss(pids, logits=lg.float()) for lg in outputs["part_logits"].values()]
        calls += [
            loss(pids, feat=f.float())
            for loss, f in zip(self.global_losses, outputs["global_feats"])
        ]
        counts: dict[str, int] = {}
        for call in calls:
            for key, value in call.items():
                terms[key] = terms[key] + value if key in terms else value
                counts[key] = counts.get(key, 0) + 1
        return {key: value / counts[key] for key, value in terms.items()}

    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, torch.Tensor]:
        """``post_bn``: the reduced part features concatenated (the authors' test feature);
        ``pre_bn``: the same before the reductions' BN. ``(B, P * reduce_dim)`` each."""
        pre, post = self.reduce(self.pooled_parts(self.branch_maps(batch["images"])))
        return {
            "post_bn": torch.cat([post[n] for n in self.part_names], dim=1),
            "pre_bn": torch.cat([pre[n] for n in self.part_names], dim=1),
        }

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The parts' classifiers."""
        yield from self.classifiers.parameters()
