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
test_branches}`` (:class:`CAMAOptions`); ``oap_alpha: 0`` is the paper's "MltB + L_id"
ablation and ``num_branches: 1`` the paper's IDE+BN baseline of Eq. 3 (BN per cell before
GAP, with a learnable bias).

The classifier-only warm phase (``solver.classifier_warm_epochs``) trains the classifiers
``W^i`` alone: every other module, the new BN layers included, stays frozen in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from reidkit.config import Config
from reidkit.losses import ReIDLoss
from reidkit.losses.oap import overlapped_activation_penalty
from reidkit.methods.base import (
    Batch,
    EvalExtras,
    MethodOptions,
    ReIDMethod,
    Role,
    method_options,
    register_method,
)
from reidkit.models.backbone import Backbone, split_backbone

__all__ = ["CAMA", "CAMAOptions"]


class CAMAOptions(MethodOptions):
    """``model.cama``: CAMA's options."""

    num_branches: int = Field(3, ge=1)  # N unshared copies of conv5
    oap_k: float = Field(26 / 128, gt=0)  # <1: fraction of H*W cells; >=1: a count
    oap_alpha: float = Field(1.0, ge=0)  # weight of the OAP (Eq. 8)
    test_branches: int | None = None  # use only the first n branches at test (Table 5)
    oap_detach_threshold: bool = False  # stop the gradient through sigma^i (Eq. 5)


@register_method("cama", options=CAMAOptions)
class CAMA(ReIDMethod):
    """CAMA: multi-branch CAM-augmented re-ID network with the overlapped activation penalty.

    Args:
        cfg: the experiment config (``model.*``, ``loss.*``, ``test.feature``).
        num_classes: number of training identities ``C``.
        backbone: optional pre-built :class:`~reidkit.models.backbone.Backbone`; by default
            ``reidkit.models.build_backbone`` builds it from ``cfg.model`` (pretrained
            weights are loaded *before* the last stage is copied, so every branch starts
            from the same ImageNet conv5). A given backbone is adopted: its last stage is
            split off into the branches (:func:`~reidkit.models.backbone.split_backbone`).
    """

    def __init__(self, cfg: Config, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        mcfg = cfg.model
        opts = method_options(cfg, CAMAOptions, "cama")
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
        if not isinstance(backbone, Backbone) or not backbone.stage_names:
            raise ValueError(
                f"model.backbone='{mcfg.backbone}': CAMA needs a staged backbone "
                "(reidkit.models.backbone.Backbone) to copy its last stage into the branches"
            )
        last = backbone.stage_names[-1]
        if any(last in stages for stages in backbone.inserted_groups.values()):
            raise ValueError(
                f"model.non_local_layers: CAMA copies {last} into its branches; blocks "
                f"inserted into {last} are not supported (use earlier stages)"
            )
        dim = int(backbone.out_channels)

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
        self.metric_feature = cfg.loss.triplet_feature
        # ID term per branch (Eq. 7) and the optional metric / center / extra terms on the
        # concatenated feature, all from cfg.loss through the shared helper
        self.branch_loss = ReIDLoss(cfg.loss, num_classes, dim, metric_loss=False)
        self.feature_loss = ReIDLoss(cfg.loss, num_classes, dim * self.num_branches, id_loss=False)
        # The shared trunk is the backbone up to its last stage (with any inserted blocks);
        # the branches are deep copies of the (possibly pretrained) conv5: unshared,
        # identical at start.
        self.backbone, self.branches = split_backbone(backbone, last, self.num_branches)
        self.bns = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(self.num_branches))
        self.classifiers = nn.ModuleList(
            nn.Linear(dim, num_classes, bias=False) for _ in range(self.num_branches)
        )
        for cls in self.classifiers:
            nn.init.normal_(cls.weight, std=0.001)

    # ------------------------------------------------------------------ building blocks
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Shared conv1..conv4: ``(B, 3, H, W) -> (B, d3, h, w)`` (the layer3 map)."""
        return self.backbone(images)

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
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training outputs: ``feat_maps`` ``(N, B, d, h, w)`` (F^i), ``branch_logits``
        ``(N, B, C)`` (S^i), ``logits`` ``(B, C)`` (mean over branches, for accuracy),
        ``global_feat`` ``(B, N*d)`` (GAP(T^i) concatenated), ``bn_feat`` ``(B, N*d)``
        (GAP(F^i) concatenated).
        """
        images = batch["images"]
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
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """``ce_1 .. ce_N`` (one ID term per branch, Eq. 7), ``oap`` (alpha * Eq. 6, when
        alpha > 0) and, when ``loss.metric`` / ``loss.center_weight`` / ``loss.extra`` are
        set (not in the paper), those terms on the concatenated feature."""
        pids = batch["pids"]
        logits = outputs["branch_logits"]
        terms: dict[str, torch.Tensor] = {}
        for i in range(logits.shape[0]):
            terms.update(self.branch_loss(pids, logits[i].float(), suffix=str(i + 1)))
        if self.oap_alpha > 0 and self.num_branches > 1:
            target_cams = self.class_activation_maps(outputs["feat_maps"], pids)
            terms["oap"] = self.oap_alpha * overlapped_activation_penalty(
                target_cams, self.oap_k, detach_threshold=self.oap_detach_threshold
            )
        if self.feature_loss.needs_feature:
            feats = outputs["global_feat" if self.metric_feature == "pre_bn" else "bn_feat"]
            terms.update(self.feature_loss(pids, feat=feats.float()))
        return terms

    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, torch.Tensor]:
        """``post_bn`` / ``pre_bn`` test features of :meth:`forward_features`."""
        return self.forward_features(batch["images"])

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
        """The N classifiers ``W^i``: the only weights the warm phase trains (the paper
        fixes everything else; the new BN layers run with their initial statistics)."""
        for module in self.classifiers:
            yield from module.parameters()

    def eval_extras(self, cfg: Config, dataset, device: torch.device) -> EvalExtras | None:
        """Branch overlap: mean top-k CAM IoU between branches on (up to 4 batches of) the
        query set, so a run shows whether its branches look at different regions."""
        if self.num_branches < 2:
            return None
        from reidkit.data.loader import build_test_loader
        from reidkit.viz.overlap import (
            branch_overlap_matrix,
            format_branch_overlap,
            mean_pairwise_overlap,
        )

        mat = branch_overlap_matrix(
            self, build_test_loader(cfg, dataset.query), max_batches=4, device=device
        )
        return EvalExtras(
            metrics={"branch_overlap": mean_pairwise_overlap(mat)},
            notes=[format_branch_overlap(mat, self.oap_k)],
        )
