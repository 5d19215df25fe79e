"""Grad-CAM of reidkit methods: target specs, default layers and the three kinds of score.

:mod:`reidkit.viz.grad_cam` explains any scalar of any model; this module knows the method
contract, so a command line or a report can ask for

- ``class``: the logit of the image's predicted identity (``outputs["logits"]``; for a
  multi-part model such as SCR the mean of its part logits), or ``class:K`` for class K;
- ``part:NAME``: the logit of one part's classifier (``outputs["part_logits"][NAME]``,
  e.g. SCR's ``p2_s1`` stripe or ``p2_c1`` channel group), for the same predicted class
  as ``class`` (so the maps of several parts explain the same identity), or
  ``part:NAME:K``;
- ``pair``: the similarity of a query and a gallery image's test features
  (``method.encode``, ``test.feature``): what makes the two match.

Class and part targets run the training outputs (``method({"images": x})``) in eval
mode. The layer defaults to ``method.default_cam_layer(part)`` when the method has one
(SCR: the part's branch's layer4; IANet: ``backbone.layer4``), else to the backbone's
last stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reidkit.viz.cam import eval_mode
from reidkit.viz.grad_cam import (
    GradCAM,
    class_logit,
    compute_grad_cam,
    pair_grad_cam,
    part_logit,
    similarity_to,
)

__all__ = [
    "CamTarget",
    "parse_cam_target",
    "default_layer",
    "predicted_classes",
    "method_grad_cam",
    "method_pair_grad_cam",
    "method_similarity_cam",
    "similarity_metric",
]


@dataclass(frozen=True)
class CamTarget:
    """A parsed target: ``kind`` (``class``, ``part``, ``pair``), the part name and an
    optional fixed class index."""

    kind: str
    part: str | None = None
    index: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "pair":
            return "pair similarity"
        what = "class" if self.kind == "class" else f"part {self.part}"
        return what if self.index is None else f"{what} (class {self.index})"


def parse_cam_target(spec: str) -> CamTarget:
    """``class``, ``class:K``, ``part:NAME``, ``part:NAME:K`` or ``pair`` -> :class:`CamTarget`
    (``ValueError`` naming the expected forms otherwise)."""
    forms = "class, class:K, part:NAME, part:NAME:K or pair"
    bits = spec.strip().split(":")
    kind = bits[0]

    def index(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"Grad-CAM target '{spec}': class '{text}' is not an integer"
            ) from None
        if value < 0:
            raise ValueError(f"Grad-CAM target '{spec}': class must be >= 0")
        return value

    if kind == "class" and len(bits) <= 2:
        return CamTarget("class", None, index(bits[1]) if len(bits) == 2 else None)
    if kind == "part" and len(bits) in (2, 3) and bits[1]:
        return CamTarget("part", bits[1], index(bits[2]) if len(bits) == 3 else None)
    if kind == "pair" and len(bits) == 1:
        return CamTarget("pair")
    raise ValueError(f"Grad-CAM target '{spec}': expected {forms}")


def default_layer(model: nn.Module, target: CamTarget | None = None) -> str:
    """The layer to explain ``target`` with: ``model.default_cam_layer(part)`` when the
    method defines it, else ``backbone.<last stage>``; ``ValueError`` asking for
    ``--layer`` when neither exists."""
    part = target.part if target is not None else None
    if hasattr(model, "default_cam_layer"):
        return model.default_cam_layer(part)
    backbone = getattr(model, "backbone", None)
    stages = getattr(backbone, "stage_names", ())
    for name in reversed(stages):
        stage = getattr(backbone, name, None)
        if isinstance(stage, nn.Sequential) and len(stage) > 0:
            return f"backbone.{name}"
    raise ValueError(
        f"{type(model).__name__}: no default Grad-CAM layer; give one (e.g. --layer branches.0)"
    )


def _train_outputs(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    return lambda x: model({"images": x})


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B,)`` argmax of ``outputs["logits"]`` in eval mode (the identity the model sees)."""
    with eval_mode(model):
        out = model({"images": images})
    logits = out.get("logits") if isinstance(out, dict) else None
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"{type(model).__name__}: the training outputs have no 'logits' (was the model "
            "built with num_classes=0?); class / part Grad-CAM needs a classifier"
        )
    return logits.argmax(dim=1)


def method_grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target: CamTarget,
    layer: str | None = None,
    classes: torch.Tensor | None = None,
) -> GradCAM:
    """Grad-CAM of a class or part target on ``images (B, 3, H, W)``.

    ``classes (B,)`` overrides the class index (default: ``target.index`` or the predicted
    class of each image, :func:`predicted_classes`). Returns ``maps (B, h, w)`` in [0, 1].
    """
    if target.kind == "pair":
        raise ValueError("method_grad_cam: use method_pair_grad_cam for the pair target")
    if target.kind == "part":
        names = getattr(model, "part_names", None)
        if names is None:
            raise ValueError(
                f"{type(model).__name__} has no part classifiers; use --target class or pair"
            )
        if target.part not in names:
            raise ValueError(f"no part '{target.part}' (parts: {', '.join(names)})")
    if classes is None:
        if target.index is not None:
            classes = torch.full((images.shape[0],), target.index, dtype=torch.long)
        else:
            classes = predicted_classes(model, images)
    classes = classes.to(images.device)
    score = class_logit(classes) if target.kind == "class" else part_logit(target.part, classes)
    return compute_grad_cam(
        model,
        images,
        layer or default_layer(model, target),
        score,
        forward=_train_outputs(model),
    )


def similarity_metric(test_cfg: Any) -> str:
    """The similarity behind the ranking: cosine for normalised features (Euclidean on
    unit vectors ranks as cosine) or a cosine metric, else minus the Euclidean distance."""
    return "cosine" if test_cfg.normalize or test_cfg.metric == "cosine" else "euclidean"


def method_pair_grad_cam(
    model: nn.Module,
    query_images: torch.Tensor,
    gallery_images: torch.Tensor,
    layer: str | None = None,
    feature: str = "post_bn",
    metric: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What makes query ``i`` and gallery ``i`` match: ``(query maps (P, h, w), gallery maps
    (P, h, w), similarities (P,))`` of the test features ``method.encode(...)[feature]``."""
    return pair_grad_cam(
        model,
        query_images,
        gallery_images,
        layer or default_layer(model),
        forward=lambda x: model.encode({"images": x}),
        key=feature,
        metric=metric,
    )


def method_similarity_cam(
    model: nn.Module,
    images: torch.Tensor,
    reference: torch.Tensor,
    layer: str | None = None,
    feature: str = "post_bn",
    metric: str = "cosine",
) -> torch.Tensor:
    """Maps ``(B, h, w)`` of each image's similarity to a fixed ``reference (D,)`` test
    feature (e.g. a query's: what in each ranked gallery image matches it)."""
    return compute_grad_cam(
        model,
        images,
        layer or default_layer(model),
        similarity_to(reference, key=feature, metric=metric),
        forward=lambda x: model.encode({"images": x}),
    ).maps
