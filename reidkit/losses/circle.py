"""Circle loss, pair-wise form (Sun et al., CVPR 2020, Eq. 4 and 6).

On cosine similarities ``s`` between L2-normalised features, for each anchor with
within-class similarities ``s_p`` and between-class similarities ``s_n``::

    alpha_p = relu(1 + m - s_p)     alpha_n = relu(s_n + m)        (detached, as in the paper)
    L = log(1 + sum_n exp(gamma alpha_n (s_n - m)) * sum_p exp(-gamma alpha_p (s_p - 1 + m)))
      = softplus( logsumexp_n(...) + logsumexp_p(...) )

Every sample of the batch is an anchor (the anchor itself is not a positive); anchors
with no positive or no negative are left out of the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.losses.softmax import full_precision, to_float
from reidkit.losses.triplet import _anchor_masks, _check, masked_mean

__all__ = ["circle_loss", "CircleLoss"]


@full_precision
def circle_loss(
    feats: torch.Tensor, pids: torch.Tensor, m: float = 0.25, gamma: float = 64.0
) -> torch.Tensor:
    """Pair-wise circle loss.

    Args:
        feats: ``(B, D)`` embeddings (normalised inside); pids: ``(B,)``.
        m: relaxation margin; gamma: scale.

    Returns:
        Scalar mean over valid anchors.
    """
    _check(feats, pids)
    f = F.normalize(to_float(feats), dim=1)
    sim = f @ f.t()  # (B, B)
    is_pos, is_neg, valid = _anchor_masks(pids)
    alpha_p = (1 + m - sim).clamp(min=0).detach()
    alpha_n = (sim + m).clamp(min=0).detach()
    logit_p = (-gamma * alpha_p * (sim - (1 - m))).masked_fill(~is_pos, float("-inf"))
    logit_n = (gamma * alpha_n * (sim - m)).masked_fill(~is_neg, float("-inf"))
    per_anchor = F.softplus(torch.logsumexp(logit_n, dim=1) + torch.logsumexp(logit_p, dim=1))
    return masked_mean(per_anchor, valid)


class CircleLoss(nn.Module):
    """Module form of :func:`circle_loss`: ``(feats (B, D), pids (B,)) -> scalar``."""

    def __init__(self, m: float = 0.25, gamma: float = 64.0) -> None:
        super().__init__()
        self.m = m
        self.gamma = gamma

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return circle_loss(feats, pids, self.m, self.gamma)

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"
