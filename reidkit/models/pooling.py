"""Global pooling of a feature map to a vector: average, max and GeM.

All poolers map ``(B, C, H, W) -> (B, C)`` and work for any spatial size (so methods can
pool horizontal stripes with the same module, e.g. CGE with the learned GeM ``p``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GlobalAvgPool", "GlobalMaxPool", "GeM", "build_pooling"]


class GlobalAvgPool(nn.Module):
    """Global average pooling: ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """Global max pooling: ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al., TPAMI 2018).

    ``f_c = ( mean_{h,w} clamp(x_c, eps)^p )^(1/p)``: ``p = 1`` is average pooling and
    ``p -> inf`` max pooling. ``p`` is a learnable scalar (init 3) unless
    ``learnable=False``; during the forward pass it is clamped to ``>= 1`` for stability
    (the stored parameter is not modified). Computed in float32 (safe under AMP).

    Shape: ``(B, C, H, W) -> (B, C)``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be positive, got {p}")
        if learnable:
            self.p = nn.Parameter(torch.full((1,), float(p)))
        else:
            self.register_buffer("p", torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float().clamp(min=1.0)
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


def build_pooling(name: str, p: float = 3.0, learnable: bool = True) -> nn.Module:
    """Pooling layer by name: ``"avg"``, ``"max"`` or ``"gem"`` (``p``: GeM's initial p)."""
    if name == "avg":
        return GlobalAvgPool()
    if name == "max":
        return GlobalMaxPool()
    if name == "gem":
        return GeM(p=p, learnable=learnable)
    raise ValueError(f"model.pooling: unknown pooling '{name}' (expected avg, max or gem)")
