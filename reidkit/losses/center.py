"""Center loss (Wen et al., ECCV 2016) as used by BoT.

``L_C = 1/B * sum_b ||f_b - c_{y_b}||^2``: every class has a learnable center ``c_y``
(owned by the module). BoT trains the centers with their own SGD (lr 0.5) and scales the
loss by 5e-4; the engine undoes that scale on the centers' gradients, see
``reidkit.methods.baseline.Baseline.aux_parameters``.
"""

from __future__ import annotations

import torch
from torch import nn

from reidkit.losses.softmax import full_precision, to_float

__all__ = ["CenterLoss", "center_loss"]


@full_precision
def center_loss(feats: torch.Tensor, centers: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """``mean_b ||feats_b - centers[pids_b]||^2`` (each term clamped to [1e-12, 1e12]).

    Args:
        feats: ``(B, D)``; centers: ``(C, D)``; pids: ``(B,)`` in ``[0, C)``.
    """
    if feats.dim() != 2 or centers.dim() != 2 or feats.shape[1] != centers.shape[1]:
        raise ValueError(
            f"center loss: feats (B, D) and centers (C, D) must share D, got "
            f"{tuple(feats.shape)} and {tuple(centers.shape)}"
        )
    diff = to_float(feats) - to_float(centers)[pids.long()]
    return diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).mean()


class CenterLoss(nn.Module):
    """Center loss with its own centers ``(num_classes, feat_dim)`` (init N(0, 1)).

    ``forward(feats (B, D), pids (B,)) -> scalar``.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(
                f"CenterLoss needs num_classes, feat_dim >= 1, got {num_classes}, {feat_dim}"
            )
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return center_loss(feats, self.centers, pids)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"
