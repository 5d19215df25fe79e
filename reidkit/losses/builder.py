"""Build losses from ``cfg.loss`` (:class:`reidkit.config.LossConfig`).

- :func:`build_metric_loss` -> the metric loss named by ``loss.metric``
  (``none``, ``triplet``, ``soft_triplet``, ``wrt``, ``circle``) as a module called
  ``(feats (B, D), pids (B,)) -> scalar``; ``none`` gives :class:`ZeroLoss`.
- :func:`build_id_loss` -> label-smoothed CE, or focal loss when ``loss.focal_gamma`` is set.
- :func:`build_extra_loss` -> CGE Table 5 extras (``sphere``, ``lifted``, ``instance``,
  ``contrastive``, ``circle``, ``triplet``); sphere and instance own classifier weights,
  so they need ``num_classes`` and ``feat_dim``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reidkit.losses.circle import CircleLoss
from reidkit.losses.focal import FocalLoss
from reidkit.losses.pairwise import ContrastiveLoss, InstanceLoss, LiftedStructureLoss, SphereLoss
from reidkit.losses.softmax import CrossEntropyLabelSmooth, to_float
from reidkit.losses.triplet import TripletLoss, WeightedRegularizedTripletLoss

__all__ = [
    "ZeroLoss",
    "build_metric_loss",
    "build_id_loss",
    "build_extra_loss",
    "metric_loss_key",
    "EXTRA_LOSSES",
]

EXTRA_LOSSES = ("sphere", "lifted", "instance", "contrastive", "circle", "triplet")


class ZeroLoss(nn.Module):
    """A loss that is always 0 (keeps the graph): ``loss.metric = none``."""

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return to_float(feats).sum() * 0.0


def metric_loss_key(metric: str) -> str:
    """Name of the metric term in ``compute_loss`` dicts: triplet, wrt, circle (or none)."""
    return {"soft_triplet": "triplet"}.get(metric, metric)


def build_metric_loss(loss_cfg: Any) -> nn.Module:
    """Metric loss module for ``loss_cfg.metric``; called as ``(feats, pids) -> scalar``.

    Unweighted: the caller multiplies by ``loss_cfg.metric_weight``.
    """
    metric = loss_cfg.metric
    if metric == "none":
        return ZeroLoss()
    if metric == "triplet":
        return TripletLoss(margin=loss_cfg.triplet_margin)
    if metric == "soft_triplet":
        return TripletLoss(soft=True)
    if metric == "wrt":
        return WeightedRegularizedTripletLoss(include_self_positive=loss_cfg.wrt_include_self)
    if metric == "circle":
        return CircleLoss(m=loss_cfg.circle_m, gamma=loss_cfg.circle_gamma)
    raise ValueError(
        f"loss.metric: unknown metric loss '{metric}' (expected none, triplet, soft_triplet, wrt, circle)"
    )


def build_id_loss(loss_cfg: Any) -> nn.Module:
    """ID loss ``(logits (B, C), pids (B,)) -> scalar``: CE with ``loss.label_smoothing``,
    or focal loss (same smoothing) when ``loss.focal_gamma`` is set."""
    if loss_cfg.focal_gamma is not None:
        return FocalLoss(gamma=loss_cfg.focal_gamma, epsilon=loss_cfg.label_smoothing)
    return CrossEntropyLabelSmooth(epsilon=loss_cfg.label_smoothing)


def build_extra_loss(
    name: str,
    num_classes: int = 0,
    feat_dim: int = 0,
    loss_cfg: Any | None = None,
    **options: Any,
) -> nn.Module:
    """An extra loss of CGE's Table 5 as a module ``(feats (B, D), pids (B,)) -> scalar``.

    Args:
        name: sphere, lifted, instance, contrastive, circle or triplet.
        num_classes, feat_dim: needed by sphere and instance (own classifier weights).
        loss_cfg: ``cfg.loss``; circle takes ``circle_m``/``circle_gamma`` and triplet
            ``triplet_margin`` from it.
        options: keyword overrides for the loss constructor (e.g. ``m=4`` for sphere,
            ``margin=1.0`` for lifted, ``scale=16`` for instance).

    Defaults: sphere ``m=4`` (the CGE paper's), lifted ``margin=1.0``, instance
    ``scale=16``, contrastive ``margin=1.0`` on normalised features.
    """
    if name in ("sphere", "instance") and (num_classes < 1 or feat_dim < 1):
        raise ValueError(
            f"loss.extra={name} needs num_classes and feat_dim (got {num_classes}, {feat_dim})"
        )
    if name == "sphere":
        return SphereLoss(num_classes, feat_dim, **{"m": 4, **options})
    if name == "instance":
        return InstanceLoss(num_classes, feat_dim, **options)
    if name == "lifted":
        return LiftedStructureLoss(**options)
    if name == "contrastive":
        return ContrastiveLoss(**options)
    if name == "circle":
        kw: dict[str, Any] = {}
        if loss_cfg is not None:
            kw = {"m": loss_cfg.circle_m, "gamma": loss_cfg.circle_gamma}
        return CircleLoss(**{**kw, **options})
    if name == "triplet":
        kw = {"margin": loss_cfg.triplet_margin} if loss_cfg is not None else {}
        return TripletLoss(**{**kw, **options})
    raise ValueError(
        f"loss.extra: unknown extra loss '{name}' (expected one of {', '.join(EXTRA_LOSSES)})"
    )
