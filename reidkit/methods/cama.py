"""CAMA: Class Activation Maps Augmentation (Yang et al., CVPR 2019).

Architecture (Fig. 2 of the paper)::

    image -> shared trunk (conv1 .. conv4 = layer3) -> N unshared copies of conv5 (layer4)
          -> T^i (B, d, h, w) -> F^i = BatchNorm2d(T^i)            (Eq. 3, BN before GAP)
          -> M^i = W^i applied as a 1x1 conv: (B, C, h, w)          (class activation maps)
          -> S^i = GAP(M^i) = W^i GAP(F^i)                          (class scores, Eq. 4)

Loss (Eq. 8): ``sum_i CE(S^i, t) + alpha * L_oap`` with the overlapped activation penalty
computed on the target-class maps ``M^i_t`` (``reidkit.losses.overlapped_activation_penalty``).
Test feature: ``[f^1/|f^1|; ...; f^n/|f^n|]`` with ``f^i = GAP(F^i)``, for the first
``n = model.cama.test_branches`` branches (all by default; the paper's Table 5).

Config: ``model.name: cama`` and ``model.cama.{num_branches, oap_k, oap_alpha,
test_branches}``; ``oap_alpha: 0`` is the paper's "MltB + L_id" ablation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.config import Config
from reidkit.losses.oap import overlapped_activation_penalty
from reidkit.methods.base import ReIDMethod, register_method

__all__ = ["CAMA", "build_cama"]

_TRUNK_ATTRS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


class CAMA(ReIDMethod):
    """Multi-branch CAM-augmented re-ID network.

    Args:
        cfg: the experiment config (``model.*``, ``loss.*``, ``test.feature``).
        num_classes: number of training identities ``C``.
        backbone: optional pre-built backbone with torchvision ResNet attribute names
            (``conv1, bn1, relu, maxpool, layer1..layer4``) and ``out_channels``; by default
            ``reidkit.models.build_backbone`` builds it from ``cfg.model`` (pretrained
            weights are loaded *before* ``layer4`` is copied, so every branch starts from
            the same ImageNet conv5). A given backbone is adopted: its ``layer4`` is copied
            into the branches and then replaced by ``nn.Identity``.
    """

    def __init__(self, cfg: Config, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        mcfg = cfg.model
        opts = mcfg.cama
        if num_classes < 1:
            raise ValueError(
                f"CAMA needs at least one training identity, got num_classes={num_classes}"
            )
        if mcfg.pooling != "avg":
            raise ValueError(
                f"model.pooling='{mcfg.pooling}': CAMA needs global average pooling (the CAM "
                "identity S = GAP(M) only holds for GAP); set model.pooling=avg"
            )
        if backbone is None:
            from reidkit.models import backbone_from_config

            backbone = backbone_from_config(mcfg)
        missing = [a for a in (*_TRUNK_ATTRS, "layer4") if not hasattr(backbone, a)]
        if missing:
            raise ValueError(
                f"model.backbone='{mcfg.backbone}': CAMA needs a ResNet-style backbone with "
                f"attributes conv1, bn1, relu, maxpool, layer1..layer4; missing {missing}"
            )
        dim = int(getattr(backbone, "out_channels", 0)) or _infer_channels(backbone.layer4)

        self.num_branches = opts.num_branches
        self.num_classes = num_classes
        self.feat_dim = dim
        self.oap_k = opts.oap_k
        self.oap_alpha = opts.oap_alpha
        self.oap_detach_threshold = opts.oap_detach_threshold
        self.test_branches = opts.test_branches or opts.num_branches
        if not 1 <= self.test_branches <= self.num_branches:
            raise ValueError(
                f"model.cama.test_branches={opts.test_branches} must be between 1 and "
                f"model.cama.num_branches={opts.num_branches}"
            )
        self.test_feature = cfg.test.feature
        self.ce_weight = cfg.loss.ce_weight
        self.label_smoothing = cfg.loss.label_smoothing
        self.metric_weight = cfg.loss.metric_weight
        self.metric_feature = cfg.loss.triplet_feature
        self._metric_loss = None
        if cfg.loss.metric != "none" and cfg.loss.metric_weight > 0:
            from reidkit.losses import build_metric_loss

            self._metric_loss = build_metric_loss(cfg.loss)

        if "layer4" in getattr(backbone, "non_local_layers", {}):
            raise ValueError(
                "model.non_local_layers: CAMA copies layer4 into its branches; non-local "
                "blocks inside layer4 are not supported (use layer2/layer3)"
            )
        # Deep copies of the (possibly pretrained) conv5: unshared, identical at start.
        self.branches = nn.ModuleList(
            copy.deepcopy(backbone.layer4) for _ in range(self.num_branches)
        )
        # The shared trunk is the backbone up to layer3 (with its non-local blocks, if any);
        # its own layer4 is dropped so that no parameter goes unused.
        backbone.layer4 = nn.Identity()
        self.backbone = backbone
        self.bns = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(self.num_branches))
        self.classifiers = nn.ModuleList(
            nn.Linear(dim, num_classes, bias=False) for _ in range(self.num_branches)
        )
        for cls in self.classifiers:
            nn.init.normal_(cls.weight, std=0.001)

    # ------------------------------------------------------------------ building blocks
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Shared conv1..conv4: ``(B, 3, H, W) -> (B, d3, h, w)`` (the layer3 map)."""
        bb = self.backbone
        if hasattr(bb, "stem") and hasattr(bb, "run_stage"):
            x = bb.stem(images)
            for name in ("layer1", "layer2", "layer3"):
                x = bb.run_stage(name, x)
            return x
        x = images
        for name in _TRUNK_ATTRS:
            x = getattr(bb, name)(x)
        return x

    def _branch_maps(self, images: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the trunk and the first ``num`` branches.

        Returns ``(T, F)``, both ``(num, B, d, h, w)``: raw conv5 maps and their BN'd maps.
        """
        x = self.trunk(images)  # (B, d3, h, w)
        raw, normed = [], []
        for i in range(num):
            t = self.branches[i](x)
            raw.append(t)
            normed.append(self.bns[i](t))
        return torch.stack(raw), torch.stack(normed)

    def classifier_weights(self) -> torch.Tensor:
        """Stacked classifier weights ``W``: ``(N, C, d)`` (branch i's ``W^i`` transposed)."""
        return torch.stack([cls.weight for cls in self.classifiers])

    def class_activation_maps(
        self, feat_maps: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CAMs from BN'd branch maps ``feat_maps`` ``(N, B, d, h, w)``.

        With ``targets`` ``(B,)`` (class indices) returns ``M^i_t``: ``(N, B, h, w)``;
        without, every class: ``(N, B, C, h, w)``. ``GAP`` of a CAM is the class score.
        """
        n = feat_maps.shape[0]
        weight = self.classifier_weights()[:n].to(feat_maps.dtype)
        if targets is None:
            return torch.einsum("nbdhw,ncd->nbchw", feat_maps, weight)
        w_t = weight[:, targets]  # (N, B, d)
        return torch.einsum("nbdhw,nbd->nbhw", feat_maps, w_t)

    # -------------------------------------------------------------------------- API
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        """Training: a dict of tensors (see below); eval: the test feature ``(B, D)``.

        Training outputs: ``feat_maps`` ``(N, B, d, h, w)`` (F^i), ``branch_logits``
        ``(N, B, C)`` (S^i), ``logits`` ``(B, C)`` (mean over branches, for accuracy),
        ``global_feat`` ``(B, N*d)`` (GAP(T^i) concatenated), ``bn_feat`` ``(B, N*d)``
        (GAP(F^i) concatenated).
        """
        if not self.training:
            return self.forward_features(images)[self.test_feature]
        raw, feat_maps = self._branch_maps(images, self.num_branches)
        pooled = feat_maps.mean(dim=(-2, -1))  # (N, B, d) = GAP(F^i)
        branch_logits = torch.einsum(
            "nbd,ncd->nbc", pooled, self.classifier_weights().to(pooled.dtype)
        )
        b = images.shape[0]
        return {
            "feat_maps": feat_maps,
            "branch_logits": branch_logits,
            "logits": branch_logits.mean(dim=0),
            "global_feat": raw.mean(dim=(-2, -1)).transpose(0, 1).reshape(b, -1),
            "bn_feat": pooled.transpose(0, 1).reshape(b, -1),
        }

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], pids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``ce_1 .. ce_N`` (one per branch, Eq. 7), ``oap`` (alpha * Eq. 6, when alpha > 0)
        and ``metric`` (when ``loss.metric`` is set; not in the paper)."""
        logits = outputs["branch_logits"]
        terms: dict[str, torch.Tensor] = {}
        for i in range(logits.shape[0]):
            ce = F.cross_entropy(logits[i].float(), pids, label_smoothing=self.label_smoothing)
            terms[f"ce_{i + 1}"] = self.ce_weight * ce
        if self.oap_alpha > 0 and self.num_branches > 1:
            target_cams = self.class_activation_maps(outputs["feat_maps"], pids)
            terms["oap"] = self.oap_alpha * overlapped_activation_penalty(
                target_cams, self.oap_k, detach_threshold=self.oap_detach_threshold
            )
        if self._metric_loss is not None:
            feats = outputs["global_feat" if self.metric_feature == "pre_bn" else "bn_feat"]
            terms["metric"] = self.metric_weight * self._metric_loss(feats.float(), pids)
        return terms

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Test features of the first ``test_branches`` branches, ``(B, n*d)`` each:
        ``post_bn`` = concat of L2-normalised GAP(F^i) (the paper's), ``pre_bn`` = the same
        for GAP(T^i)."""
        raw, feat_maps = self._branch_maps(images, self.test_branches)
        b = images.shape[0]
        post = F.normalize(feat_maps.mean(dim=(-2, -1)), dim=-1)
        pre = F.normalize(raw.mean(dim=(-2, -1)), dim=-1)
        return {
            "post_bn": post.transpose(0, 1).reshape(b, -1),
            "pre_bn": pre.transpose(0, 1).reshape(b, -1),
        }

    def forward_maps(
        self, images: torch.Tensor, targets: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-branch maps for visualisation (all N branches, current train/eval mode).

        Returns ``feat_maps`` ``(N, B, d, h, w)`` (F^i), ``raw_maps`` (T^i, same shape)
        and either ``cams`` ``(N, B, C, h, w)`` (every class) or, with ``targets``
        ``(B,)``, ``target_cams`` ``(N, B, h, w)``.
        """
        raw, feat_maps = self._branch_maps(images, self.num_branches)
        out = {"feat_maps": feat_maps, "raw_maps": raw}
        if targets is None:
            out["cams"] = self.class_activation_maps(feat_maps)
        else:
            out["target_cams"] = self.class_activation_maps(feat_maps, targets)
        return out

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The N classifiers and their BN layers (trained alone in the warm phase)."""
        for module in (*self.bns, *self.classifiers):
            yield from module.parameters()


def _infer_channels(layer: nn.Module) -> int:
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("cannot infer the conv5 output width: backbone has no out_channels")
    # the last conv of a residual stage may be the downsample; take the largest width
    return max(c.out_channels for c in convs)


@register_method("cama")
def build_cama(cfg: Config, num_classes: int) -> CAMA:
    """Registry builder for ``model.name: cama``."""
    return CAMA(cfg, num_classes)
