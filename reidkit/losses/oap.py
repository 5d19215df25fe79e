"""Overlapped Activation Penalty (CAMA, Yang et al. CVPR 2019, Eq. 5-6).

Each of the N branches of a CAMA model produces the class activation map of the target
class, ``M^i_t`` (h x w). The penalty turns every map into a soft mask of its ``k``
strongest cells and penalises the area where *all* branches are active at once::

    a^i(x, y) = sigmoid(M^i_t(x, y) - sigma^i)        sigma^i = k-th largest value of M^i_t
    L_oap     = 1/N * sum_{x,y} a^1 * a^2 * ... * a^N      (per sample, then batch mean)
"""

from __future__ import annotations

import torch

__all__ = ["overlapped_activation_penalty", "resolve_topk"]


def resolve_topk(k: float | int, num_cells: int) -> int:
    """Turn ``k`` into a cell count for a map of ``num_cells`` cells.

    ``k < 1`` is a fraction of the cells (``26 / 128`` is the paper's 26 of a 16x8 map),
    rounded to the nearest integer and at least 1; ``k >= 1`` is a count and must be a
    whole number no larger than ``num_cells``.
    """
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise TypeError(f"k must be a count (int >= 1) or a fraction in (0, 1), got {k!r}")
    if not k > 0:
        raise ValueError(f"k must be positive (a count >= 1 or a fraction in (0, 1)), got {k}")
    if k < 1:
        count = max(1, int(round(float(k) * num_cells)))
    else:
        if float(k) != int(k):
            raise ValueError(
                f"k={k} is >= 1 so it is read as a cell count, but it is not a whole number; "
                "give a fraction in (0, 1) or an integer count"
            )
        count = int(k)
    if count > num_cells:
        raise ValueError(
            f"k={k} asks for {count} cells but the activation map has only {num_cells}"
        )
    return count


def overlapped_activation_penalty(
    target_cams: torch.Tensor, k: float | int, detach_threshold: bool = False
) -> torch.Tensor:
    """Overlapped Activation Penalty of Eq. 6, averaged over the batch.

    Args:
        target_cams: ``(N, B, H, W)``: ``M^i_t`` for branch ``i`` and sample ``b``, the
            class activation map of the sample's own (target) class.
        k: the threshold rank of Eq. 5, a count of cells (``>= 1``) or a fraction of
            ``H * W`` (``< 1``); ``sigma^i`` is the k-th largest value of ``M^i_t``.
        detach_threshold: stop the gradient through ``sigma^i`` (the paper's formula lets
            it flow to the k-th cell; detaching makes the threshold a constant).

    Returns:
        A scalar: ``mean_b 1/N * sum_{x,y} prod_i sigmoid(M^i_t(x, y) - sigma^i)``.
    """
    if target_cams.dim() != 4:
        raise ValueError(
            "overlapped_activation_penalty: target_cams must be (N branches, B, H, W), "
            f"got shape {tuple(target_cams.shape)}"
        )
    n, b, h, w = target_cams.shape
    kk = resolve_topk(k, h * w)
    flat = target_cams.reshape(n, b, h * w).float()
    sigma = flat.topk(kk, dim=-1).values[..., -1:]  # (N, B, 1): k-th largest per map
    if detach_threshold:
        sigma = sigma.detach()
    masks = torch.sigmoid(flat - sigma)  # (N, B, HW), Eq. 5
    overlap = masks.prod(dim=0).sum(dim=-1) / n  # (B,), Eq. 6
    return overlap.mean()
