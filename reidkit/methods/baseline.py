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

**Presets.** Each name has a small preset of config fields (:data:`METHOD_PRESETS`),
applied when a config is loaded, to the fields the config does not set itself: a YAML
key or a ``key=value`` override always wins. So ``model.name=agw`` alone gives the full
AGW, while ``model.name=agw model.pooling=avg`` is the AGW-without-GeM ablation, and
``reidkit config -c FILE`` shows the resolved values.

The class is meant to be extended (CGE subclasses it): override :meth:`extract`,
:meth:`forward_train`, :meth:`metric_feature` or :meth:`compute_loss`; replace
``self.pool``/``self.neck`` modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from reidkit.config import Config
from reidkit.losses import ReIDLoss
from reidkit.methods.base import Batch, ReIDMethod, Role, register_method
from reidkit.models import BNNeck, backbone_from_config, build_pooling

__all__ = ["Baseline", "METHOD_PRESETS"]

METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ide": {"model": {"neck": "none"}, "loss": {"metric": "none", "label_smoothing": 0.0}},
    "ide_bn": {"model": {"neck": "bnneck"}, "loss": {"metric": "none", "label_smoothing": 0.0}},
    "bot": {},
    "agw": {"model": {"non_local": True, "pooling": "gem"}, "loss": {"metric": "wrt"}},
}


class Baseline(ReIDMethod):
    """Global-feature re-ID model built from ``cfg.model`` / ``cfg.loss`` / ``cfg.test``.

    Args:
        cfg: the experiment config (read, not modified; presets are applied by the
            registered builders before construction).
        num_classes: number of training identities (0: inference only, no classifier).
        backbone: a trunk to use instead of ``cfg.model.backbone`` (with ``out_channels``;
            tests use narrow ResNets).

    Attributes:
        backbone: ResNet trunk (``out_channels`` = ``feat_dim``).
        pool: global pooling ``(B, C, h, w) -> (B, C)``.
        neck: :class:`~reidkit.models.heads.BNNeck`.
        test_feature: ``"post_bn"`` or ``"pre_bn"``: what eval ``forward`` returns.
    """

    def __init__(self, cfg: Config, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        mcfg, lcfg = cfg.model, cfg.loss
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = backbone if backbone is not None else backbone_from_config(mcfg)
        self.feat_dim: int = self.backbone.out_channels
        self.pool = build_pooling(mcfg.pooling, p=mcfg.gem_p)
        self.neck = BNNeck(self.feat_dim, num_classes, neck=mcfg.neck)
        self.test_feature: str = cfg.test.feature

        self.triplet_feature = lcfg.triplet_feature
        # ID + metric (+ center, + extra) terms, shared with every other method
        self.loss = ReIDLoss(lcfg, num_classes, self.feat_dim)
        self._register_load_state_dict_pre_hook(_legacy_loss_keys)

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

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training outputs of :meth:`forward_train` for ``batch["images"]``."""
        return self.forward_train(batch["images"])

    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, torch.Tensor]:
        """``{"pre_bn": (B, C), "post_bn": (B, C)}`` (query and gallery alike)."""
        return self.forward_features(batch["images"])

    # --------------------------------------------------------------------- losses
    def metric_feature(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature for the metric / center / extra losses (``loss.triplet_feature``)."""
        return outputs["global_feat"] if self.triplet_feature == "pre_bn" else outputs["bn_feat"]

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms: ``ce`` and, as configured, ``triplet``/``wrt``/``circle``,
        ``center`` and the extra loss (named after it)."""
        if "logits" not in outputs:
            raise RuntimeError("compute_loss needs logits; the model was built with num_classes=0")
        return self.loss(batch["pids"], outputs["logits"], self.metric_feature(outputs))

    # ------------------------------------------------------------- parameter groups
    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The neck (BN + classifier) and any loss-owned classifier weights."""
        yield from (p for p in self.neck.parameters() if p.requires_grad)
        if self.loss.extra_criterion is not None:
            yield from self.loss.extra_criterion.parameters()


def _legacy_loss_keys(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the shared loss helper kept the center-loss centres and
    extra-loss weights at ``center_criterion.*`` / ``extra_criterion.*``."""
    for old in ("center_criterion.", "extra_criterion."):
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + "loss." + key[len(prefix) :]] = state_dict.pop(key)


for _name, _presets in METHOD_PRESETS.items():
    register_method(_name, presets=_presets)(Baseline)
