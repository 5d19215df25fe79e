"""Build losses from ``cfg.loss`` (:class:`reidkit.config.LossConfig`).

- :func:`build_metric_loss` -> the metric loss named by ``loss.metric``
  (``none``, ``triplet``, ``soft_triplet``, ``wrt``, ``circle``) as a module called
  ``(feats (B, D), pids (B,)) -> scalar``; ``none`` gives :class:`ZeroLoss`. The triplet
  losses use ``loss.triplet_distance`` (``euclidean`` or ``cosine``).
- :func:`build_id_loss` -> label-smoothed CE, or focal loss when ``loss.focal_gamma`` is set.
- :func:`build_extra_loss` -> CGE Table 5 extras (``sphere``, ``lifted``, ``instance``,
  ``contrastive``, ``circle``, ``triplet``); sphere and instance own classifier weights,
  so they need ``num_classes`` and ``feat_dim``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reidkit.losses.center import CenterLoss
from reidkit.losses.circle import CircleLoss
from reidkit.losses.focal import FocalLoss
from reidkit.losses.pairwise import ContrastiveLoss, InstanceLoss, LiftedStructureLoss, SphereLoss
from reidkit.losses.softmax import CrossEntropyLabelSmooth, to_float
from reidkit.losses.triplet import TripletLoss, WeightedRegularizedTripletLoss

__all__ = [
    "ReIDLoss",
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
    distance = getattr(loss_cfg, "triplet_distance", "euclidean")
    if metric == "triplet":
        return TripletLoss(margin=loss_cfg.triplet_margin, distance=distance)
    if metric == "soft_triplet":
        return TripletLoss(soft=True, distance=distance)
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
        kw = {}
        if loss_cfg is not None:
            kw = {"margin": loss_cfg.triplet_margin, "distance": loss_cfg.triplet_distance}
        return TripletLoss(**{**kw, **options})
    raise ValueError(
        f"loss.extra: unknown extra loss '{name}' (expected one of {', '.join(EXTRA_LOSSES)})"
    )


class ReIDLoss(nn.Module):
    """ "ID loss + metric loss (+ center, + extra)" on a logits / feature pair, from
    ``cfg.loss``: the one place every method, branch and part computes these terms, so
    ``loss.focal_gamma``, ``loss.label_smoothing``, ``loss.metric``, ``loss.center_weight``
    and ``loss.extra`` mean the same everywhere.

    Args:
        loss_cfg: ``cfg.loss``.
        num_classes: classifier size (center loss and the sphere / instance extras need it).
        feat_dim: dimension of the feature given to the metric / center / extra terms.
        id_loss: compute the ID term (needs ``logits``).
        metric_loss: compute the metric, center and extra terms (need ``feat``).

    ``forward(pids, logits=None, feat=None, suffix="")`` returns the weighted terms:
    ``ce`` (``loss.ce_weight``; focal loss when ``focal_gamma`` is set), the metric term
    named by :func:`metric_loss_key` (``loss.metric_weight``), ``center``
    (``loss.center_weight``) and the extra term (``loss.extra_weight``). With a
    ``suffix`` every name gets ``_<suffix>`` (``ce_1``, ``triplet_p2``). Center-loss
    centres are parameters of this module; the default optimisers give them BoT's own SGD.
    """

    def __init__(
        self,
        loss_cfg: Any,
        num_classes: int,
        feat_dim: int,
        *,
        id_loss: bool = True,
        metric_loss: bool = True,
    ) -> None:
        super().__init__()
        self.ce_weight = float(loss_cfg.ce_weight) if id_loss else 0.0
        self.id_criterion = build_id_loss(loss_cfg) if self.ce_weight > 0 else None
        use_metric = metric_loss and loss_cfg.metric != "none" and loss_cfg.metric_weight > 0
        self.metric_weight = float(loss_cfg.metric_weight)
        self.metric_key = metric_loss_key(loss_cfg.metric)
        self.metric_criterion = build_metric_loss(loss_cfg) if use_metric else None
        self.center_weight = float(loss_cfg.center_weight)
        self.center_criterion: CenterLoss | None = None
        if metric_loss and self.center_weight > 0 and num_classes > 0:
            self.center_criterion = CenterLoss(num_classes, feat_dim)
        self.extra_weight = float(loss_cfg.extra_weight)
        self.extra_criterion: nn.Module | None = None
        self.extra_key = ""
        if metric_loss and loss_cfg.extra and self.extra_weight > 0:
            self.extra_criterion = build_extra_loss(loss_cfg.extra, num_classes, feat_dim, loss_cfg)
            self.extra_key = loss_cfg.extra
            if self.extra_key in ("ce", self.metric_key, "center"):
                self.extra_key = f"extra_{loss_cfg.extra}"

    @property
    def needs_feature(self) -> bool:
        return any(
            c is not None
            for c in (self.metric_criterion, self.center_criterion, self.extra_criterion)
        )

    def forward(
        self,
        pids: torch.Tensor,
        logits: torch.Tensor | None = None,
        feat: torch.Tensor | None = None,
        suffix: str = "",
    ) -> dict[str, torch.Tensor]:
        def name(key: str) -> str:
            return f"{key}_{suffix}" if suffix else key

        terms: dict[str, torch.Tensor] = {}
        if self.id_criterion is not None:
            if logits is None:
                raise ValueError("ReIDLoss: the ID term needs logits")
            terms[name("ce")] = self.ce_weight * self.id_criterion(logits, pids)
        if self.needs_feature and feat is None:
            raise ValueError("ReIDLoss: the metric / center / extra terms need a feature")
        if self.metric_criterion is not None:
            terms[name(self.metric_key)] = self.metric_weight * self.metric_criterion(feat, pids)
        if self.center_criterion is not None:
            terms[name("center")] = self.center_weight * self.center_criterion(feat, pids)
        if self.extra_criterion is not None:
            terms[name(self.extra_key)] = self.extra_weight * self.extra_criterion(feat, pids)
        return terms
