"""Backbones, pooling and heads.

``build_backbone(name, ...)`` builds a backbone by name: the ResNet / IBN-a trunks with
torchvision key names (:mod:`reidkit.models.resnet`) and the zoo of
:mod:`reidkit.models.backbones` (ResNeSt, SE-ResNet/ResNeXt, Residual Attention Network,
OSNet, ViT/DeiT), each in the key layout of its published weights.
``load_pretrained(model, path)`` loads a *local* weights file into it (never downloads,
never unpickles code).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reidkit.errors import UserError, describe_load_error, one_line
from reidkit.models import backbones as zoo
from reidkit.models.backbone import Backbone, BackboneTail, split_backbone
from reidkit.models.heads import BNNeck
from reidkit.models.ibn import IBN
from reidkit.models.non_local import NonLocalBlock
from reidkit.models.pooling import GeM, GlobalAvgPool, GlobalMaxPool, build_pooling
from reidkit.models.resnet import ResNet, build_resnet

__all__ = [
    "Backbone",
    "BackboneTail",
    "BNNeck",
    "GeM",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "IBN",
    "LoadReport",
    "NonLocalBlock",
    "PretrainedLoadError",
    "missing_pretrained_message",
    "ResNet",
    "available_backbones",
    "backbone_from_config",
    "build_backbone",
    "build_pooling",
    "load_pretrained",
    "read_state_dict",
    "split_backbone",
]

logger = logging.getLogger(__name__)

_BACKBONES: dict[str, tuple[int, bool]] = {
    "resnet18": (18, False),
    "resnet34": (34, False),
    "resnet50": (50, False),
    "resnet101": (101, False),
    "resnet18_ibn_a": (18, True),
    "resnet34_ibn_a": (34, True),
    "resnet50_ibn_a": (50, True),
    "resnet101_ibn_a": (101, True),
}

# Keys of an ImageNet checkpoint that a re-ID backbone deliberately does not have.
_IGNORED_PREFIXES = ("fc.",)


class PretrainedLoadError(UserError, RuntimeError):
    """A weights file is missing, unreadable, unsafe or does not fit the model (one line
    naming the file and what to do)."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    ``missing``: model keys the file did not provide (kept at their init values);
    ``unexpected``: file keys the model does not have (ignored; ``fc.*`` of an ImageNet
    classifier always lands here); ``loaded``: number of tensors copied.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0
    path: str = ""

    def __str__(self) -> str:
        return (
            f"{self.path}: loaded {self.loaded} tensors, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected (ignored)"
        )


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone` (ResNets and the backbone zoo)."""
    return sorted(set(_BACKBONES) | set(zoo.available()))


def build_backbone(
    name: str,
    last_stride: int = 1,
    ibn: bool = False,
    non_local_layers: Mapping[str, Sequence[int]] | None = None,
    non_local_inner_channels: int | None = 1,
    pretrained: str | Path | None = None,
    width: int = 64,
    **options: Any,
) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: one of :func:`available_backbones`: ``resnet18/34/50/101`` and the
            ``*_ibn_a`` variants, or a zoo backbone (``resnest50``, ``se_resnext50_32x4d``,
            ``resattnet56``, ``osnet_x1_0``, ``vit_base_patch16``, ...; see
            ``docs/backbones.md``).
        last_stride: stride of the last stage (1 for re-ID: 16x8 maps at 256x128; 2 = the
            ImageNet network). OSNet and ViT have no strided last stage and ignore it.
        ibn: IBN-a in layer1-3 (same as the ``*_ibn_a`` names; ResNets only).
        non_local_layers: ``{"layer2": [2, 3], "layer3": [3, 4, 5]}`` (AGW) inserts
            non-local blocks after those 0-based block indices; ``None``: none (ResNets
            only for now).
        non_local_inner_channels: inner width of the non-local blocks (AGW: 1;
            ``None``: half the input channels).
        pretrained: local weights (``.pth``/``.pt``/``.bin``/``.safetensors``) in the
            backbone's published layout; ``None`` trains from scratch (logged).
        width: base width (64 = the standard networks; smaller only for tests; ResNets,
            ResNeSt, SE-Nets and the Residual Attention Network).
        **options: backbone-specific options (``model.backbone_options``), e.g. ViT's
            ``stride=12``, ``img_size=(256, 128)``, ``drop_path_rate``; SE-Nets'
            ``caffe_style``.

    Returns:
        A backbone with ``out_channels``, ``stage_channels``, ``stage_names``, ``stem``,
        ``run_stage``, ``forward(x) -> (B, C, h, w)`` and ``forward_stages(x) -> [4 maps]``.
    """
    if name in _BACKBONES:
        if options:
            raise ValueError(
                f"model.backbone_options: backbone '{name}' takes no options "
                f"(got {sorted(options)})"
            )
        depth, name_ibn = _BACKBONES[name]
        model: nn.Module = build_resnet(
            depth,
            last_stride=last_stride,
            ibn=ibn or name_ibn,
            non_local_layers=non_local_layers,
            non_local_inner_channels=non_local_inner_channels,
            width=width,
        )
    elif name in zoo.available():
        if ibn:
            raise ValueError(
                f"model.ibn: IBN-a is only available on the ResNet backbones, not '{name}'"
            )
        if non_local_layers:
            raise ValueError(
                f"model.non_local: non-local blocks are only available on the ResNet "
                f"backbones for now, not '{name}'"
            )
        if width != 64:
            options = {**options, "width": width}
        model = zoo.create_backbone(name, last_stride=last_stride, **options)
    else:
        import difflib

        close = difflib.get_close_matches(name, available_backbones(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"model.backbone: unknown backbone '{name}'{hint} "
            f"(available: {', '.join(available_backbones())})"
        )
    if pretrained is None or str(pretrained) == "":
        logger.info("no ImageNet weights given (model.pretrained); training from scratch")
    else:
        report = load_pretrained(model, pretrained)
        logger.info("backbone %s: %s", name, report)
    return model


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint (``state_dict``/``model`` wrappers)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "model_state_dict", "net"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise PretrainedLoadError(
            f"{path}: expected a state dict (a mapping of parameter names to tensors), "
            f"got {type(obj).__name__}"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PretrainedLoadError(
            f"{path}: no tensors found (top-level keys: {list(obj)[:8]}); expected a state "
            "dict, optionally wrapped as {'state_dict': ...} or {'model': ...}"
        )
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a local ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` file.

    Pickle files are read with ``torch.load(map_location="cpu", weights_only=True)``, so a
    file that would execute code is refused. ``{"state_dict": ...}``/``{"model": ...}``
    wrappers and ``module.`` (DataParallel/DDP) prefixes are removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedLoadError(missing_pretrained_message(path))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise PretrainedLoadError(f"{path}: reading .safetensors needs `safetensors`") from exc
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise PretrainedLoadError(
                f"{path}: not a valid .safetensors file (corrupt or truncated?): {one_line(exc)}"
            ) from exc
    elif suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a refused pickle, or a corrupt / truncated file
            raise PretrainedLoadError(
                f"{path}: refused by torch.load(weights_only=True): {describe_load_error(exc)}"
            ) from exc
        state = _unwrap(obj, path)
    else:
        raise PretrainedLoadError(
            f"{path}: unsupported weights format '{suffix or '(no suffix)'}' "
            "(expected .pth, .pt, .bin, .ckpt or .safetensors)"
        )
    return _strip_prefixes(state)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(state)
    for prefix in ("module.", "backbone.", "base."):
        if keys and all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            keys = list(state)
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local weights file into ``model`` (non-strict on names, strict on shapes).

    Keys absent from the file stay at their init values (``missing``), keys the model
    lacks are ignored (``unexpected``; e.g. ImageNet ``fc.*``). A tensor whose shape
    differs from the model's raises :class:`PretrainedLoadError` naming the key and both
    shapes. Returns a :class:`LoadReport`; counts are logged.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    adapt = getattr(model, "adapt_pretrained_state", None)
    if not any(k in own for k in state):
        # a whole re-ID checkpoint: take its backbone part
        sub = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if any(k in own for k in sub):
            state = sub
    if adapt is not None:
        # the backbone renames/resizes the file's tensors into its own layout (e.g. the
        # pretrainedmodels SE-Net keys, a ViT pos_embed of another grid)
        try:
            state = adapt(state)
        except ValueError as exc:
            raise PretrainedLoadError(f"{path}: {exc}") from exc
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:3])
        more = f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise PretrainedLoadError(
            f"{path}: {len(mismatched)} tensor(s) have the wrong shape for this model, so the "
            f"file is for another architecture or depth ({shown}{more}); use ImageNet weights "
            "of the configured model.backbone"
        )
    to_load = {k: v for k, v in state.items() if k in own}
    if not to_load:
        raise PretrainedLoadError(
            f"{path}: none of the {len(state)} tensors match a model key (file keys start "
            f"with {sorted(state)[:3]}, model keys with {sorted(own)[:3]}); is it ImageNet "
            "weights of the configured model.backbone?"
        )
    model.load_state_dict(to_load, strict=False)
    report = LoadReport(
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        loaded=len(to_load),
        path=str(path),
    )
    ignore_prefixes = _IGNORED_PREFIXES + tuple(getattr(model, "pretrained_ignore_prefixes", ()))
    ignored = [k for k in report.unexpected if k.startswith(ignore_prefixes)]
    other = [k for k in report.unexpected if not k.startswith(ignore_prefixes)]
    logger.info("loaded %d tensors from %s", report.loaded, path)
    if ignored:
        logger.info(
            "ignored %d classifier keys not used by the backbone: %s", len(ignored), ignored
        )
    if other:
        logger.warning("%d unexpected keys ignored, e.g. %s", len(other), other[:5])
    # layers the published network does not have (non-local blocks, identity at init, and
    # whatever a backbone declares) are new: their absence from the file is expected
    new_prefixes = ("nl_",) + tuple(getattr(model, "new_layer_prefixes", ()))
    new_layers = [k for k in report.missing if k.startswith(new_prefixes)]
    absent = [k for k in report.missing if not k.startswith(new_prefixes)]
    # BN step counters (only used when momentum=None) are absent from many published files
    # (saved before torch 0.4.1, or stripped); that loses no weights
    counters = [k for k in absent if k.endswith("num_batches_tracked")]
    absent = [k for k in absent if not k.endswith("num_batches_tracked")]
    if new_layers:
        logger.info("%d keys of new layers start from their init", len(new_layers))
    if counters:
        logger.info("%d BatchNorm step counters not in the file (start at 0)", len(counters))
    if absent:
        logger.warning(
            "%d model keys not in the file (kept at init), e.g. %s", len(absent), absent[:5]
        )
    return report


def backbone_from_config(model_cfg: Any) -> nn.Module:
    """:func:`build_backbone` from a ``ModelConfig`` (``reidkit.config``, ``cfg.model``):
    ``backbone``, ``last_stride``, ``ibn``, ``non_local_layers`` (only when ``non_local``),
    ``non_local_inner_channels``, ``pretrained`` and, where the config has it,
    ``backbone_options`` (a dict of backbone-specific options)."""
    options = dict(getattr(model_cfg, "backbone_options", None) or {})
    try:
        return build_backbone(
            model_cfg.backbone,
            last_stride=model_cfg.last_stride,
            ibn=model_cfg.ibn,
            non_local_layers=model_cfg.non_local_layers if model_cfg.non_local else None,
            non_local_inner_channels=model_cfg.non_local_inner_channels,
            pretrained=model_cfg.pretrained,
            **options,
        )
    except PretrainedLoadError as exc:
        if str(exc).startswith("model.pretrained"):
            raise
        raise PretrainedLoadError(f"model.pretrained: {exc}") from exc


def missing_pretrained_message(path: str | Path) -> str:
    """What to do when the ImageNet weights file ``path`` is not there."""
    path = Path(path)
    where = f" (relative to {Path.cwd()})" if not path.expanduser().is_absolute() else ""
    return (
        f"model.pretrained: ImageNet weights file not found: {path}{where}; reidkit never "
        "downloads weights: put torchvision-format ImageNet weights there, point "
        "model.pretrained=PATH at yours, or train from scratch with model.pretrained=null"
    )
