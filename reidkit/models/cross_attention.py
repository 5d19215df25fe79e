"""Cross-attention module of CAN (Hou et al., "Cross Attention Network for Few-shot
Classification", NeurIPS 2019), following the authors' public code where the slides are silent.

Given two feature maps ``P`` and ``Q`` of the same size (``h x w`` positions, ``C`` channels):

1. **Correlation layer**: ``R[i, j] = cos(p_i, q_j)`` for every position ``i`` of ``P`` and
   ``j`` of ``Q`` (:func:`correlation_map`); ``R^p = R^T`` and ``R^q = R``.
2. **Meta fusion layer** (:class:`MetaFusion`): a kernel ``w = W2(ReLU(BN(W1(GAP(R^p)))))``
   from the correlations, with 1x1 convolutions ``hw -> hw/6 -> hw`` (both with a bias, BN
   after the first). The code hard-codes ``hw = 36`` (6x6 maps); here ``hw`` follows the map.
3. **Attention**: ``A^p_i = softmax_i(mean_j(w_j R[i, j]) / tau) + 1`` with ``tau = 0.025``.
   The code takes the *mean* over ``j`` (the slides write ``w^T r_i``, a sum: the two differ
   by the factor ``hw`` inside the softmax, so the mean is kept for fidelity) and adds the
   residual ``+ 1`` so every position keeps at least its own weight. ``A^q`` is the same
   computation with the roles swapped (the fusion layer is shared, as in the code).
4. Both maps are re-weighted by their attention and globally average-pooled.

Shapes use ``hw = h * w``. All functions broadcast over leading batch dimensions where the
docstring says so; nothing loops over positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CrossAttention",
    "CrossAttentionOutput",
    "MetaFusion",
    "correlation_all_pairs",
    "correlation_map",
]


def _check_maps(p: Tensor, q: Tensor, dims: int, what: str) -> None:
    if p.dim() != dims or q.dim() != dims:
        raise ValueError(
            f"{what}: expected {dims}-d feature maps, got shapes {tuple(p.shape)} and "
            f"{tuple(q.shape)}"
        )


def correlation_map(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine correlation between every position of ``p`` and every position of ``q``.

    Args:
        p: ``(B, C, h, w)`` feature maps.
        q: ``(B, C, h, w)`` feature maps (same shape as ``p``).
        eps: floor of the vector norms (an all-zero position gets correlation 0).

    Returns:
        ``(B, hw, hw)`` with ``R[b, i, j] = <p_i, q_j> / (|p_i| |q_j|)``, positions in
        row-major order (``i = y * w + x``).
    """
    _check_maps(p, q, 4, "correlation_map")
    if p.shape != q.shape:
        raise ValueError(
            f"correlation_map: p and q must have the same shape, got {tuple(p.shape)} and "
            f"{tuple(q.shape)}"
        )
    pn = F.normalize(p.flatten(2), dim=1, eps=eps)  # (B, C, hw)
    qn = F.normalize(q.flatten(2), dim=1, eps=eps)
    return pn.transpose(1, 2) @ qn


def correlation_all_pairs(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """:func:`correlation_map` for every (query, prototype) pair of an episode batch.

    Args:
        p: ``(B, N, C, h, w)``, e.g. the class prototypes of ``B`` episodes.
        q: ``(B, M, C, h, w)``, e.g. the query images of the same episodes.

    Returns:
        ``(B, M, N, hw, hw)`` with ``R[b, m, n] = correlation_map(p[b, n], q[b, m])``.
    """
    _check_maps(p, q, 5, "correlation_all_pairs")
    if p.shape[0] != q.shape[0] or p.shape[2:] != q.shape[2:]:
        raise ValueError(
            "correlation_all_pairs: p (B, N, C, h, w) and q (B, M, C, h, w) must agree on B, "
            f"C, h, w; got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    pn = F.normalize(p.flatten(3), dim=2, eps=eps)  # (B, N, C, hw)
    qn = F.normalize(q.flatten(3), dim=2, eps=eps)  # (B, M, C, hw)
    # (B, 1, N, hw, C) @ (B, M, 1, C, hw) -> (B, M, N, hw, hw)
    return pn.transpose(2, 3).unsqueeze(1) @ qn.unsqueeze(2)


class MetaFusion(nn.Module):
    """The meta fusion layer: ``w = W2(ReLU(BN(W1(g))))`` for a pooled correlation ``g``.

    ``W1``: 1x1 conv ``hw -> hidden`` (bias), ``BN`` over the ``hidden`` channels (batch
    statistics over all pairs of the call in training mode), ``W2``: 1x1 conv ``hidden -> hw``
    (bias); ``hidden = max(1, hw // reduction)`` (the code: 36 -> 6 -> 36).

    ``forward(g)``: ``(..., hw) -> (..., hw)``.
    """

    def __init__(self, num_positions: int, reduction: int = 6) -> None:
        super().__init__()
        if num_positions < 1 or reduction < 1:
            raise ValueError(
                f"MetaFusion: num_positions and reduction must be >= 1, got {num_positions}, "
                f"{reduction}"
            )
        self.num_positions = int(num_positions)
        self.hidden = max(1, self.num_positions // int(reduction))
        self.reduce = nn.Conv2d(self.num_positions, self.hidden, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(self.hidden)
        self.expand = nn.Conv2d(self.hidden, self.num_positions, kernel_size=1, bias=True)
        for conv in (self.reduce, self.expand):  # the code's He init (fan-out); biases default
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / conv.out_channels))

    def forward(self, pooled: Tensor) -> Tensor:
        if pooled.shape[-1] != self.num_positions:
            raise ValueError(
                f"MetaFusion built for {self.num_positions} positions got a correlation over "
                f"{pooled.shape[-1]}; build it for the feature-map size in use (h * w)"
            )
        lead = pooled.shape[:-1]
        x = pooled.reshape(-1, self.num_positions, 1, 1)
        x = self.expand(F.relu(self.bn(self.reduce(x))))
        return x.reshape(*lead, self.num_positions)


@dataclass
class CrossAttentionOutput:
    """Result of :meth:`CrossAttention.forward` for ``B`` pairs of ``(B, C, h, w)`` maps.

    Attributes:
        p_features: ``(B, C)`` GAP of ``P`` re-weighted by ``A^p``.
        q_features: ``(B, C)`` GAP of ``Q`` re-weighted by ``A^q``.
        p_attention: ``(B, h, w)`` attention ``A^p`` (softmax + 1: values in ``[1, 2]``).
        q_attention: ``(B, h, w)`` attention ``A^q``.
        correlation: ``(B, hw, hw)`` the correlation map ``R`` (``R[b, i, j]``: ``p_i`` vs ``q_j``).
    """

    p_features: Tensor
    q_features: Tensor
    p_attention: Tensor
    q_attention: Tensor
    correlation: Tensor


class CrossAttention(nn.Module):
    """CAN's cross-attention module (CAM) for maps with ``num_positions = h * w`` positions.

    Args:
        num_positions: ``h * w`` of the feature maps (36 for ResNet-12 at 84x84).
        reduction: hidden width of the meta fusion layer is ``num_positions // reduction``.
        temperature: ``tau`` of the attention softmax (the code: 0.025).
        residual: add 1 to the softmax (the code does), so attention only re-weights.

    ``forward(p, q)`` attends one pair per batch row; :meth:`pair_attention` turns a batch of
    correlation maps of any leading shape into ``(A^p, A^q)``, which the few-shot model uses
    for all (query, prototype) pairs of an episode at once.
    """

    def __init__(
        self,
        num_positions: int,
        reduction: int = 6,
        temperature: float = 0.025,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CrossAttention: temperature must be > 0, got {temperature}")
        self.num_positions = int(num_positions)
        self.temperature = float(temperature)
        self.residual = bool(residual)
        self.fusion = MetaFusion(num_positions, reduction)

    def attention(self, r: Tensor) -> Tensor:
        """Attention over the *first* map's positions from its correlation ``r``.

        Args:
            r: ``(..., hw_p, hw_q)`` with ``r[..., i, j] = cos(p_i, q_j)``.

        Returns:
            ``(..., hw_p)``: ``softmax_i(mean_j(w_j r[i, j]) / tau) (+ 1)`` with ``w =
            fusion(mean_i r[i, :])``.
        """
        kernel = self.fusion(r.mean(dim=-2))  # (..., hw_q): GAP over P's positions, fused
        score = (r @ kernel.unsqueeze(-1)).squeeze(-1) / r.shape[-1]  # mean_j w_j R_ij
        attn = torch.softmax(score / self.temperature, dim=-1)
        return attn + 1.0 if self.residual else attn

    def pair_attention(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(A^p, A^q)``, each ``(..., hw)``, from ``r`` of shape ``(..., hw, hw)``.

        ``A^p`` attends over ``P``'s positions (from ``R^p = R^T``), ``A^q`` over ``Q``'s
        (from ``R^q = R``); both directions share the fusion layer, and in training mode each
        direction's BN uses its own batch statistics, as in the authors' code.
        """
        return self.attention(r), self.attention(r.transpose(-1, -2))

    def forward(self, p: Tensor, q: Tensor) -> CrossAttentionOutput:
        """Attend ``B`` pairs of maps ``p[b]``, ``q[b]`` (each ``(B, C, h, w)``); see
        :class:`CrossAttentionOutput` for the returned shapes."""
        r = correlation_map(p, q)
        b, _, h, w = p.shape
        ap, aq = self.pair_attention(r)
        p_feat = (p.flatten(2) * ap.unsqueeze(1)).mean(-1)
        q_feat = (q.flatten(2) * aq.unsqueeze(1)).mean(-1)
        return CrossAttentionOutput(
            p_features=p_feat,
            q_features=q_feat,
            p_attention=ap.view(b, h, w),
            q_attention=aq.view(b, h, w),
            correlation=r,
        )

    def extra_repr(self) -> str:
        return (
            f"num_positions={self.num_positions}, hidden={self.fusion.hidden}, "
            f"temperature={self.temperature}, residual={self.residual}"
        )
