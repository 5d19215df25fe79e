"""Focal loss (Lin et al., ICCV 2017) for identity classification, with label smoothing.

For class probabilities ``p = softmax(logits)`` and a target distribution ``q`` (one-hot,
or label-smoothed ``(1-eps) onehot + eps / C``)::

    FL = mean_b sum_c -alpha_c * q_bc * (1 - p_bc)^gamma * log p_bc

With one-hot targets this is the usual ``-alpha_t (1 - p_t)^gamma log p_t``; ``gamma = 0``
and no ``alpha`` reduce it to (label-smoothed) cross entropy. ``alpha`` is a scalar
(applied to every class) or a ``(C,)`` per-class weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.losses.softmax import check_targets, full_precision, to_float

__all__ = ["focal_loss", "FocalLoss"]


@full_precision
def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | None = None,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """Focal loss.

    Args:
        logits: ``(B, C)``.
        targets: ``(B,)`` class ids.
        gamma: focusing parameter ``>= 0``.
        alpha: ``None``, a scalar, or a ``(C,)`` tensor of class weights.
        epsilon: label smoothing in ``[0, 1)``.

    Returns:
        Scalar batch mean (float32).
    """
    check_targets(logits, targets)
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    if not 0 <= epsilon < 1:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    num_classes = logits.shape[1]
    log_p = F.log_softmax(to_float(logits), dim=1)  # (B, C)
    q = F.one_hot(targets.long(), num_classes).to(log_p.dtype)
    if epsilon > 0:
        q = (1 - epsilon) * q + epsilon / num_classes
    modulating = (1 - log_p.exp()).clamp(min=0).pow(gamma)  # (B, C)
    per_class = -q * modulating * log_p
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=per_class.dtype, device=per_class.device)
        if alpha_t.dim() == 1 and alpha_t.shape[0] != num_classes:
            raise ValueError(f"focal alpha has {alpha_t.shape[0]} entries, expected {num_classes}")
        per_class = per_class * alpha_t
    return per_class.sum(dim=1).mean()


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`: ``(logits (B, C), targets (B,)) -> scalar``."""

    def __init__(
        self, gamma: float = 2.0, alpha: float | torch.Tensor | None = None, epsilon: float = 0.0
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.epsilon = epsilon
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha.float())
        else:
            self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.alpha, self.epsilon)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, epsilon={self.epsilon}"
