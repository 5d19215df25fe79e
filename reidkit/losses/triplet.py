"""Triplet losses on a P x K batch: batch-hard (Hermans et al. 2017) and AGW's
weighted regularised triplet (Ye et al., TPAMI 2021).

Distances are Euclidean, ``d(a, b) = ||f_a - f_b||_2`` (computed in float32 from the Gram
matrix, clamped at 1e-12 before the square root), or, for the batch-hard loss with
``distance="cosine"``, ``d(a, b) = 1 - cos(f_a, f_b)`` (IANet's triplet on the post-BN
feature). The anchor itself is never one of its
positives. Anchors without a positive or without a negative in the batch are left out of
the mean; a batch with no valid anchor gives a zero loss that keeps the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.losses.softmax import full_precision, to_float

__all__ = [
    "TRIPLET_DISTANCES",
    "cosine_dist",
    "euclidean_dist",
    "pair_masks",
    "triplet_batch_hard",
    "cross_triplet_batch_hard",
    "weighted_regularized_triplet",
    "TripletLoss",
    "WeightedRegularizedTripletLoss",
]


@full_precision
def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``(M, D), (N, D) -> (M, N)`` in float32."""
    x = to_float(x)
    y = to_float(y)
    xx = x.pow(2).sum(dim=1, keepdim=True)
    yy = y.pow(2).sum(dim=1, keepdim=True).t()
    d2 = torch.addmm(xx + yy, x, y.t(), beta=1, alpha=-2)
    return d2.clamp(min=1e-12).sqrt()


@full_precision
def cosine_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distances ``1 - cos(x_i, y_j)``: ``(M, D), (N, D) -> (M, N)`` in
    float32, in [0, 2] (a zero vector has distance 1 to everything)."""
    x = F.normalize(to_float(x), dim=1)
    y = F.normalize(to_float(y), dim=1)
    return 1.0 - x @ y.t()


#: ``distance`` values of :func:`triplet_batch_hard`.
TRIPLET_DISTANCES = ("euclidean", "cosine")


def pair_masks(pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` labels -> ``(is_pos, is_neg)`` boolean ``(B, B)`` masks, diagonal excluded."""
    if pids.dim() != 1:
        raise ValueError(f"pids must be (B,), got shape {tuple(pids.shape)}")
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    eye = torch.eye(pids.shape[0], dtype=torch.bool, device=pids.device)
    return same & ~eye, ~same


def _check(feats: torch.Tensor, pids: torch.Tensor) -> None:
    if feats.dim() != 2:
        raise ValueError(f"feats must be (B, D), got shape {tuple(feats.shape)}")
    if pids.shape != (feats.shape[0],):
        raise ValueError(f"pids must be (B,) with B={feats.shape[0]}, got {tuple(pids.shape)}")


def _batch_distances(
    feats: torch.Tensor, pids: torch.Tensor, normalize: bool, distance: str = "euclidean"
) -> torch.Tensor:
    """Check ``feats (B, D)`` / ``pids (B,)`` and return the ``(B, B)`` float32 distances
    between the features: Euclidean (of the L2-normalised features when ``normalize``) or
    cosine (``1 - cos``; ``normalize`` changes nothing)."""
    _check(feats, pids)
    if distance == "cosine":
        return cosine_dist(feats, feats)
    if distance != "euclidean":
        raise ValueError(f"triplet distance must be one of {TRIPLET_DISTANCES}, got {distance!r}")
    if normalize:
        feats = F.normalize(to_float(feats), dim=1)
    return euclidean_dist(feats, feats)


def _anchor_masks(pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(is_pos, is_neg, valid)`` for per-anchor reductions without host syncs.

    ``valid (B,)`` marks anchors with at least one positive and one negative. Rows of
    invalid anchors get an all-True mask (so masked max/min/softmax/logsumexp stay finite
    and no NaN reaches the backward pass); :func:`masked_mean` then drops them.
    """
    is_pos, is_neg = pair_masks(pids)
    has_pos = is_pos.any(dim=1, keepdim=True)
    has_neg = is_neg.any(dim=1, keepdim=True)
    valid = (has_pos & has_neg).squeeze(1)
    return is_pos | ~has_pos, is_neg | ~has_neg, valid


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (B,)`` over ``valid (B,)``; 0 (keeping the graph) if none is valid."""
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp(min=1)


@full_precision
def triplet_batch_hard(
    feats: torch.Tensor,
    pids: torch.Tensor,
    margin: float = 0.3,
    soft: bool = False,
    normalize: bool = False,
    distance: str = "euclidean",
) -> torch.Tensor:
    """Batch-hard triplet loss.

    For each anchor ``a``: ``d_ap = max_{p: y_p = y_a, p != a} d(a, p)``,
    ``d_an = min_{n: y_n != y_a} d(a, n)``; loss ``relu(d_ap - d_an + margin)``, or
    ``softplus(d_ap - d_an)`` when ``soft`` (margin unused). Mean over valid anchors.

    Args:
        feats: ``(B, D)`` embeddings; pids: ``(B,)`` identity labels.
        margin: ranking margin (hard version).
        soft: soft-margin variant.
        normalize: L2-normalise the features first (Euclidean distance).
        distance: ``"euclidean"`` or ``"cosine"`` (``1 - cos``, in [0, 2]; the margin is
            then on that scale, e.g. IANet's 0.3).

    Returns:
        Scalar.
    """
    dist = _batch_distances(feats, pids, normalize, distance)
    is_pos, is_neg, valid = _anchor_masks(pids)
    d_ap = dist.masked_fill(~is_pos, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(~is_neg, float("inf")).amin(dim=1)
    per_anchor = F.softplus(d_ap - d_an) if soft else F.relu(d_ap - d_an + margin)
    return masked_mean(per_anchor, valid)


@full_precision
def cross_triplet_batch_hard(
    anchors: torch.Tensor,
    anchor_pids: torch.Tensor,
    targets: torch.Tensor,
    target_pids: torch.Tensor,
    margin: float = 0.3,
) -> torch.Tensor:
    """Batch-hard triplet loss between two sets of features (heterogeneous: TKP's I2V,
    V2I, I2I and V2V terms, the authors' ``HeterogeneousTripletLoss``).

    For each anchor ``a`` (a row of ``anchors``), over the rows ``t`` of ``targets``:
    ``d_ap = max_{t: y_t = y_a} d(a, t)``, ``d_an = min_{t: y_t != y_a} d(a, t)`` (Euclidean),
    loss ``relu(d_ap - d_an + margin)``, mean over the anchors that have a positive and a
    negative among the targets. Every same-identity target is a positive: when ``targets``
    *is* ``anchors`` (I2I, V2V) the anchor itself counts (distance ~0, as in the authors'
    code), which changes nothing unless the anchor is its identity's only row.

    Args:
        anchors: ``(M, D)``; anchor_pids: ``(M,)``.
        targets: ``(N, D)``; target_pids: ``(N,)``.
        margin: ranking margin.

    Returns:
        Scalar (0, keeping the graph, when no anchor is valid).
    """
    _check(anchors, anchor_pids)
    _check(targets, target_pids)
    if anchors.shape[1] != targets.shape[1]:
        raise ValueError(
            f"anchors {tuple(anchors.shape)} and targets {tuple(targets.shape)} must have the "
            "same feature dimension"
        )
    dist = euclidean_dist(anchors, targets)
    same = anchor_pids.unsqueeze(1) == target_pids.unsqueeze(0)
    has_pos = same.any(dim=1, keepdim=True)
    has_neg = (~same).any(dim=1, keepdim=True)
    valid = (has_pos & has_neg).squeeze(1)
    # rows of invalid anchors get all-True masks: finite values, no NaN in the backward
    is_pos, is_neg = same | ~has_pos, ~same | ~has_neg
    d_ap = dist.masked_fill(~is_pos, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(~is_neg, float("inf")).amin(dim=1)
    return masked_mean(F.relu(d_ap - d_an + margin), valid)


@full_precision
def weighted_regularized_triplet(
    feats: torch.Tensor,
    pids: torch.Tensor,
    normalize: bool = False,
    include_self_positive: bool = True,
) -> torch.Tensor:
    """Weighted regularised triplet (WRT, AGW).

    Per anchor ``a`` with positives ``P(a)`` and negatives ``N(a)``::

        w_ap = softmax_{p in P(a)}(d(a, p))      w_an = softmax_{n in N(a)}(-d(a, n))
        L_a  = softplus( sum_p w_ap d(a, p) - sum_n w_an d(a, n) )

    No margin. Mean over anchors that have a positive and a negative.

    Args:
        feats: ``(B, D)``; pids: ``(B,)``.
        normalize: L2-normalise features first.
        include_self_positive: count the anchor (distance 0) among its positives, as the
            AGW public code does (its positive mask keeps the diagonal, which dilutes the
            positive weights); default on, for parity with the published numbers.

    Returns:
        Scalar.
    """
    dist = _batch_distances(feats, pids, normalize)
    is_pos, is_neg, valid = _anchor_masks(pids)
    if include_self_positive:
        is_pos = is_pos | torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    w_ap = torch.softmax(dist.masked_fill(~is_pos, float("-inf")), dim=1)
    w_an = torch.softmax((-dist).masked_fill(~is_neg, float("-inf")), dim=1)
    d_ap = (w_ap * dist).sum(dim=1)
    d_an = (w_an * dist).sum(dim=1)
    return masked_mean(F.softplus(d_ap - d_an), valid)


class TripletLoss(nn.Module):
    """Batch-hard triplet loss module: ``(feats (B, D), pids (B,)) -> scalar``;
    ``distance`` is ``"euclidean"`` or ``"cosine"`` (see :func:`triplet_batch_hard`)."""

    def __init__(
        self,
        margin: float = 0.3,
        soft: bool = False,
        normalize: bool = False,
        distance: str = "euclidean",
    ) -> None:
        super().__init__()
        if distance not in TRIPLET_DISTANCES:
            raise ValueError(
                f"triplet distance must be one of {TRIPLET_DISTANCES}, got {distance!r}"
            )
        self.margin = margin
        self.soft = soft
        self.normalize = normalize
        self.distance = distance

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return triplet_batch_hard(
            feats, pids, self.margin, self.soft, self.normalize, self.distance
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, soft={self.soft}, normalize={self.normalize}, "
            f"distance={self.distance}"
        )


class WeightedRegularizedTripletLoss(nn.Module):
    """WRT module: ``(feats (B, D), pids (B,)) -> scalar``."""

    def __init__(self, normalize: bool = False, include_self_positive: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.include_self_positive = include_self_positive

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return weighted_regularized_triplet(feats, pids, self.normalize, self.include_self_positive)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, include_self_positive={self.include_self_positive}"
