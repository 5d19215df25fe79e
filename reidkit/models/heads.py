"""Classification heads on a pooled feature: BNNeck (BoT) and the plain IDE head.

``neck="bnneck"`` (Luo et al., BoT 2019): ``feat -> BatchNorm1d -> bn_feat -> Linear``.
The BN bias is fixed at 0 (``requires_grad_(False)``), its weight starts at 1; the
classifier has no bias and weights drawn from N(0, 0.001^2). Metric losses use the pre-BN
``feat``; the ID loss uses the logits of the post-BN ``bn_feat``.

``neck="none"`` (IDE, Zheng et al. 2016): ``feat -> Linear(bias=True)``; ``bn_feat`` is
``feat`` itself.

``bn_bias=True`` / ``classifier_bias=True`` give the IANet head (GAP -> BN1d with a
trainable bias -> Linear with bias).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BNNeck"]


class BNNeck(nn.Module):
    """Neck + identity classifier.

    Args:
        in_dim: feature dimension ``D``.
        num_classes: training identities ``C``; 0 builds no classifier (inference only,
            ``logits`` is then ``None``).
        neck: ``"bnneck"`` or ``"none"``.
        bn_bias: train the BN bias (BoT freezes it at 0).
        classifier_bias: give the classifier a bias (default: only without BN, as IDE).

    ``forward(feat)``: ``(B, D) -> (bn_feat (B, D), logits (B, C) or None)``.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        neck: str = "bnneck",
        *,
        bn_bias: bool = False,
        classifier_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if neck not in ("bnneck", "none"):
            raise ValueError(f"model.neck: unknown neck '{neck}' (expected bnneck or none)")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.neck = neck
        self.in_dim = in_dim
        self.num_classes = num_classes
        if neck == "bnneck":
            self.bn: nn.Module = nn.BatchNorm1d(in_dim)
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
            self.bn.bias.requires_grad_(bn_bias)
        else:
            self.bn = nn.Identity()
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            bias = neck == "none" if classifier_bias is None else classifier_bias
            self.classifier = nn.Linear(in_dim, num_classes, bias=bias)
            nn.init.normal_(self.classifier.weight, std=0.001)
            if self.classifier.bias is not None:
                nn.init.zeros_(self.classifier.bias)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bn_feat = self.bn(feat)
        logits = self.classifier(bn_feat) if self.classifier is not None else None
        return bn_feat, logits
