"""Global-feature baselines: IDE, IDE+BN, BoT and AGW (one class, four registered names).

Architecture: ``backbone -> pool -> neck``::

    images (B,3,H,W) -> backbone -> feat_map (B,C,h,w) -> pool -> global_feat (B,C)
                     -> neck.bn -> bn_feat (B,C) -> neck.classifier -> logits (B,num_classes)

- ``ide``    (Zheng et al. 2016): GAP -> Linear with bias (``model.neck=none``); CE without
  label smoothing, no metric loss.
- ``ide_bn`` (CAMA's IDE+BN baseline): GAP -> BatchNorm1d -> Linear; CE without smoothing,
  no metric loss.
- ``bot``    (Luo et al. 2019): BNNeck, CE with label smoothing 0.1 + batch-hard triplet
  (margin 0.3) on the pre-BN feature (+ center loss when ``loss.center_weight > 0``).
  These are the config defaults.
- ``agw``    (Ye et al. 2021): BoT + non-local blocks (``model.non_local``) + GeM pooling
  + weighted regularised triplet (``loss.metric=wrt``).

**Presets.** Each name has a small preset of config fields (:data:`METHOD_PRESETS`).
:func:`apply_method_presets` writes a preset value into the config *only for fields the
config did not set explicitly* (pydantic's ``model_fields_set``: a YAML key or a
``key=value`` override counts as explicit), so ``model.name=agw`` alone gives the full
AGW, while ``model.name=agw model.pooling=avg`` is the AGW-without-GeM ablation. The
builder applies the presets to ``cfg`` *in place* (and logs them), so a config dumped
after building the model records the resolved values and rebuilds the same model.

The class is meant to be extended (CGE subclasses it): override :meth:`extract`,
:meth:`forward_train`, :meth:`id_loss`, :meth:`metric_feature` or
:meth:`compute_loss`; replace ``self.pool``/``self.neck`` modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from reidkit.config import Config
from reidkit.losses import (
    CenterLoss,
    build_extra_loss,
    build_id_loss,
    build_metric_loss,
    metric_loss_key,
)
from reidkit.methods.base import ReIDMethod, register_method
from reidkit.models import BNNeck, backbone_from_config, build_pooling

__all__ = ["Baseline", "METHOD_PRESETS", "apply_method_presets"]

logger = logging.getLogger(__name__)

METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ide": {"model": {"neck": "none"}, "loss": {"metric": "none", "label_smoothing": 0.0}},
    "ide_bn": {"model": {"neck": "bnneck"}, "loss": {"metric": "none", "label_smoothing": 0.0}},
    "bot": {},
    "agw": {"model": {"non_local": True, "pooling": "gem"}, "loss": {"metric": "wrt"}},
}


def apply_method_presets(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """Fill the preset fields of method ``name`` (default ``cfg.model.name``) into ``cfg``.

    Only fields not explicitly set in the config are changed (in place). Explicit values
    that differ from the preset are kept and logged. Idempotent.

    Returns:
        ``{"section.field": value}`` of the fields that were changed.
    """
    name = name or cfg.model.name
    applied: dict[str, Any] = {}
    for section_name, fields in METHOD_PRESETS.get(name, {}).items():
        section = getattr(cfg, section_name)
        for field, value in fields.items():
            current = getattr(section, field)
            if field in section.model_fields_set:
                if current != value:
                    logger.info(
                        "%s: keeping explicit %s.%s=%r (the method's preset is %r)",
                        name,
                        section_name,
                        field,
                        current,
                        value,
                    )
                continue
            setattr(section, field, value)  # also marks the field as set: idempotent
            if current != value:
                applied[f"{section_name}.{field}"] = value
    if applied:
        logger.info(
            "%s preset: %s", name, ", ".join(f"{k}={v!r}" for k, v in sorted(applied.items()))
        )
    return applied


class Baseline(ReIDMethod):
    """Global-feature re-ID model built from ``cfg.model`` / ``cfg.loss`` / ``cfg.test``.

    Args:
        cfg: the experiment config (read, not modified; presets are applied by the
            registered builders before construction).
        num_classes: number of training identities (0: inference only, no classifier).

    Attributes:
        backbone: ResNet trunk (``out_channels`` = ``feat_dim``).
        pool: global pooling ``(B, C, h, w) -> (B, C)``.
        neck: :class:`~reidkit.models.heads.BNNeck`.
        test_feature: ``"post_bn"`` or ``"pre_bn"``: what eval ``forward`` returns.
    """

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        mcfg, lcfg = cfg.model, cfg.loss
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = backbone_from_config(mcfg)
        self.feat_dim: int = self.backbone.out_channels
        self.pool = build_pooling(mcfg.pooling, p=mcfg.gem_p)
        self.neck = BNNeck(self.feat_dim, num_classes, neck=mcfg.neck)
        self.test_feature: str = cfg.test.feature

        # losses
        self.ce_weight = lcfg.ce_weight
        self.metric_weight = lcfg.metric_weight
        self.center_weight = lcfg.center_weight
        self.extra_weight = lcfg.extra_weight
        self.triplet_feature = lcfg.triplet_feature
        self.id_criterion = build_id_loss(lcfg)
        self.metric_key = metric_loss_key(lcfg.metric)
        self.metric_criterion: nn.Module | None = (
            build_metric_loss(lcfg) if lcfg.metric != "none" and lcfg.metric_weight > 0 else None
        )
        self.center_criterion: CenterLoss | None = None
        if lcfg.center_weight > 0 and num_classes > 0:
            self.center_criterion = CenterLoss(num_classes, self.feat_dim)
        self.extra_criterion: nn.Module | None = None
        self.extra_key = ""
        if lcfg.extra:
            self.extra_criterion = build_extra_loss(lcfg.extra, num_classes, self.feat_dim, lcfg)
            self.extra_key = lcfg.extra
            if self.extra_key in ("ce", self.metric_key, "center"):
                self.extra_key = f"extra_{lcfg.extra}"

    # ------------------------------------------------------------------ forward parts
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> feat_map (B, C, h, w)``."""
        return self.backbone(images)

    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training outputs: ``feat_map (B,C,h,w)``, ``global_feat (B,C)`` (pre-BN),
        ``bn_feat (B,C)``, ``logits (B,num_classes)``."""
        feat_map = self.extract(images)
        global_feat = self.pool(feat_map)
        bn_feat, logits = self.neck(global_feat)
        out = {"feat_map": feat_map, "global_feat": global_feat, "bn_feat": bn_feat}
        if logits is not None:
            out["logits"] = logits
        return out

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Test features ``{"pre_bn": (B, C), "post_bn": (B, C)}`` (not normalised)."""
        global_feat = self.pool(self.extract(images))
        return {"pre_bn": global_feat, "post_bn": self.neck.bn(global_feat)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        """Training: the dict of :meth:`forward_train`; eval: ``(B, C)`` test feature."""
        if self.training:
            return self.forward_train(images)
        feats = self.forward_features(images)
        if self.test_feature not in feats:
            raise KeyError(
                f"test.feature='{self.test_feature}' not produced by {type(self).__name__} "
                f"(available: {', '.join(feats)})"
            )
        return feats[self.test_feature]

    # --------------------------------------------------------------------- losses
    def id_loss(self, logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """Unweighted ID loss (label-smoothed CE or focal, from ``cfg.loss``)."""
        return self.id_criterion(logits, pids)

    def metric_feature(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature for the metric / center / extra losses (``loss.triplet_feature``)."""
        return outputs["global_feat"] if self.triplet_feature == "pre_bn" else outputs["bn_feat"]

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], pids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms: ``ce`` and, as configured, ``triplet``/``wrt``/``circle``,
        ``center`` and the extra loss (named after it)."""
        if "logits" not in outputs:
            raise RuntimeError("compute_loss needs logits; the model was built with num_classes=0")
        losses: dict[str, torch.Tensor] = {}
        if self.ce_weight > 0:
            losses["ce"] = self.ce_weight * self.id_loss(outputs["logits"], pids)
        feat = self.metric_feature(outputs)
        if self.metric_criterion is not None:
            losses[self.metric_key] = self.metric_weight * self.metric_criterion(feat, pids)
        if self.center_criterion is not None:
            losses["center"] = self.center_weight * self.center_criterion(feat, pids)
        if self.extra_criterion is not None and self.extra_weight > 0:
            losses[self.extra_key] = self.extra_weight * self.extra_criterion(feat, pids)
        return losses

    # ------------------------------------------------------------- parameter groups
    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The neck (BN + classifier) and any loss-owned classifier weights."""
        yield from (p for p in self.neck.parameters() if p.requires_grad)
        if self.extra_criterion is not None:
            yield from self.extra_criterion.parameters()

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        """Center-loss centers: to be optimised by their own SGD (lr ``loss.center_lr``),
        with gradients rescaled by ``1 / loss.center_weight`` (BoT), and excluded from the
        main optimiser."""
        if self.center_criterion is not None:
            yield from self.center_criterion.parameters()


def _make_builder(name: str):
    def build(cfg: Config, num_classes: int) -> Baseline:
        apply_method_presets(cfg, name)
        return Baseline(cfg, num_classes)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"Build the '{name}' baseline (presets: {METHOD_PRESETS[name] or 'none'})."
    return build


for _name in METHOD_PRESETS:
    register_method(_name)(_make_builder(_name))
