"""Grad-CAM of several trained models side by side on the same images.

The SCR supplementary's Fig. 3 compares where a plain ResNet-50, an SE-Net and a Residual
Attention Network look: Grad-CAM (:mod:`reidkit.viz.grad_cam`) of each model's class logit
at its last stage, one column per model, one row per image. This module does it for any
reidkit models (any backbone, any method whose training outputs hold ``logits``):

- :func:`last_stage_layer`: the module whose output the head pools, ``backbone.<last
  stage>`` or, where the published network ends the stage with a tail (the Residual
  Attention Network's final BN-ReLU, ``backbone.norm_out``), that tail: the explained
  activations are then the (non-negative) map the classifier sees, as for a ResNet;
- :func:`class_grad_cam`: one model's Grad-CAM of a class logit (its predicted class by
  default);
- :func:`compare_grad_cam`: the same images through several models, each at its own
  layer, with the per-model classes, and :func:`comparison_rows` for the picture
  (:func:`reidkit.viz.grid.save_image_grid`).

``reidkit compare-gradcam`` (``reidkit/commands/compare_gradcam.py``) is the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reidkit.viz.cam import eval_mode
from reidkit.viz.grad_cam import GradCAM, class_logit, compute_grad_cam
from reidkit.viz.grid import overlay_maps

__all__ = [
    "LoadedRun",
    "load_run",
    "last_stage_layer",
    "predicted_classes",
    "class_grad_cam",
    "compare_grad_cam",
    "comparison_rows",
]


@dataclass
class LoadedRun:
    """A trained run: its folder, resolved ``cfg``, the ``model`` (eval mode) and the
    ``weights`` file it was loaded from."""

    folder: Path
    cfg: Any
    model: nn.Module
    weights: Path


def load_run(
    run: str | Path,
    checkpoint: str = "best",
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
) -> LoadedRun:
    """Load a run folder written by ``reidkit train`` (``config.yaml`` +
    ``checkpoints/<checkpoint>.pt``; ``last`` is used when ``best`` is absent, e.g. a run
    without evaluation). ``overrides`` (``key=value``) apply to its config, e.g.
    ``data.root=...`` when the data moved."""
    from reidkit.config import load_config
    from reidkit.engine import load_model

    folder = Path(run)
    config = folder / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"run {folder}: no config.yaml (expected a run folder written by reidkit train)"
        )
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    weights = folder / "checkpoints" / f"{checkpoint}.pt"
    if not weights.is_file() and checkpoint == "best":
        weights = folder / "checkpoints" / "last.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"run {folder}: no checkpoints/{checkpoint}.pt (nor last.pt)")
    cfg = load_config(config, list(overrides))
    model = load_model(cfg, weights, device=device).eval()
    return LoadedRun(folder=folder, cfg=cfg, model=model, weights=weights)


def last_stage_layer(model: nn.Module) -> str:
    """Dotted name of the last stage's output the head pools: ``backbone.<tail>`` when the
    backbone ends its last stage with a tail module (``stage_tails``), else
    ``backbone.<last stage>``. ``ValueError`` when the model has no staged backbone or its
    stages pass token sequences (ViT)."""
    backbone = getattr(model, "backbone", None)
    stages = tuple(getattr(backbone, "stage_names", ()))
    if not stages:
        raise ValueError(
            f"{type(model).__name__}: no backbone with named stages; give the layer explicitly"
        )
    if getattr(backbone, "stage_format", "map") != "map":
        raise ValueError(
            f"{type(backbone).__name__}: its stages pass {backbone.stage_format}, not "
            "(B, C, h, w) maps; Grad-CAM needs a map layer (give one explicitly)"
        )
    last = stages[-1]
    tail = getattr(backbone, "stage_tails", {}).get(last)
    if tail is not None and isinstance(getattr(backbone, tail, None), nn.Module):
        if isinstance(getattr(backbone, tail), nn.Identity):  # moved into branches
            return f"backbone.{last}"
        return f"backbone.{tail}"
    return f"backbone.{last}"


def _logits(outputs: Any, key: str, model: nn.Module) -> torch.Tensor:
    logits = outputs.get(key) if isinstance(outputs, dict) else outputs
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"{type(model).__name__}: its training outputs have no (B, num_classes) '{key}' "
            "(was it built without a classifier?); the class-logit Grad-CAM needs one"
        )
    return logits


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor, key: str = "logits") -> torch.Tensor:
    """``(B,)`` argmax of the model's ``outputs[key]`` (training outputs, eval mode)."""
    with eval_mode(model):
        return _logits(model({"images": images}), key, model).argmax(dim=1)


def class_grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str | None = None,
    classes: int | torch.Tensor | None = None,
    key: str = "logits",
) -> GradCAM:
    """Grad-CAM of the class logit ``outputs[key][b, classes[b]]`` of a reidkit method.

    Args:
        model: a reidkit method (``model({"images": x})`` gives its training outputs; run in
            eval mode).
        images: ``(B, 3, H, W)`` normalised as the model was trained.
        layer: dotted module name; default :func:`last_stage_layer`.
        classes: an int, ``(B,)`` indices, or ``None`` for each image's predicted class.
        key: the outputs' logits entry.

    Returns:
        :class:`~reidkit.viz.grad_cam.GradCAM`: ``maps (B, h, w)`` in [0, 1], ``scores (B,)``
        the explained logits.
    """
    if classes is None:
        classes = predicted_classes(model, images, key)
    target = class_logit(classes, key=key)
    return compute_grad_cam(
        model,
        images,
        layer or last_stage_layer(model),
        target,
        forward=lambda x: model({"images": x}),
    )


def compare_grad_cam(
    models: Sequence[nn.Module],
    images: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[str | None] | None = None,
    classes: int | torch.Tensor | Sequence[torch.Tensor | int | None] | None = None,
    key: str = "logits",
) -> tuple[list[GradCAM], list[torch.Tensor]]:
    """The same images through several models.

    Args:
        models: ``M`` reidkit methods.
        images: one ``(B, 3, H, W)`` batch for all, or one per model (each normalised and
            sized as that model was trained; same ``B`` and order).
        layers: one dotted name (or ``None``: :func:`last_stage_layer`) per model.
        classes: ``None`` (each model's own predicted class), one int / ``(B,)`` tensor for
            all models (e.g. the images' training labels), or one of those per model.
        key: the logits entry of the outputs.

    Returns:
        ``(cams, classes)``: ``M`` :class:`~reidkit.viz.grad_cam.GradCAM` results (maps
        ``(B, h_m, w_m)``) and the ``M`` ``(B,)`` class indices explained.
    """
    m = len(models)
    if m == 0:
        raise ValueError("compare_grad_cam: no models given")
    batches = [images] * m if isinstance(images, torch.Tensor) else list(images)
    if len(batches) != m:
        raise ValueError(f"compare_grad_cam: {len(batches)} image batches for {m} models")
    if len({b.shape[0] for b in batches}) != 1:
        raise ValueError("compare_grad_cam: every model's batch must hold the same images")
    layers = list(layers) if layers is not None else [None] * m
    if len(layers) != m:
        raise ValueError(f"compare_grad_cam: {len(layers)} layers for {m} models")
    if classes is None or isinstance(classes, (int, torch.Tensor)):
        per_model = [classes] * m
    else:
        per_model = list(classes)
        if len(per_model) != m:
            raise ValueError(f"compare_grad_cam: {len(per_model)} class sets for {m} models")
    cams, explained = [], []
    for model, batch, layer, cls in zip(models, batches, layers, per_model):
        b = batch.shape[0]
        if cls is None:
            cls = predicted_classes(model, batch, key)
        cls = torch.as_tensor(cls, dtype=torch.long, device=batch.device)
        cls = cls.expand(b) if cls.dim() == 0 else cls
        cams.append(class_grad_cam(model, batch, layer, cls, key))
        explained.append(cls.detach().cpu())
    return cams, explained


def comparison_rows(
    pixels: np.ndarray, maps: Sequence[torch.Tensor], alpha: float = 0.5
) -> list[list[np.ndarray]]:
    """Grid rows ``[image, overlay of model 1, ..., overlay of model M]`` per image.

    ``pixels``: uint8 ``(B, H, W, 3)``; ``maps``: ``M`` map sets ``(B, h_m, w_m)`` in [0, 1]
    (each upsampled over the image)."""
    columns = [overlay_maps(pixels, m.detach().cpu(), alpha=alpha) for m in maps]
    return [[pixels[b]] + [col[b] for col in columns] for b in range(len(pixels))]
