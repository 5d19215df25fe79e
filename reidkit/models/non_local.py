"""Dot-product non-local block (Wang et al., CVPR 2018) as used by AGW (Ye et al., 2021).

For an input map ``x`` with ``N = H * W`` positions::

    f(i, j) = theta(x_i)^T phi(x_j) / N          (dot-product affinity, no softmax)
    y_i     = sum_j f(i, j) g(x_j)
    z       = x + W(y)                            W = 1x1 conv + BatchNorm2d

``theta``, ``phi``, ``g`` are 1x1 convolutions to ``inner_channels`` channels. The BN of
``W`` has weight and bias initialised to zero, so the block is the identity at init and
can be inserted into a pretrained backbone. The AGW public code uses a single inner
channel; that is the default here.

Because the affinity has no softmax, ``y = theta^T (phi g^T) / N`` is computed with the
associativity trick: ``O(N * C_inner^2)`` time and memory instead of the ``O(N^2)``
affinity matrix, with identical results.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NonLocalBlock"]


class NonLocalBlock(nn.Module):
    """Residual dot-product non-local block.

    Args:
        in_channels: channels ``C`` of the input map.
        inner_channels: bottleneck width of theta/phi/g; ``None`` means ``C // 2``
            (the non-local paper's choice). Default 1 (AGW's public code).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, in_channels: int, inner_channels: int | None = 1) -> None:
        super().__init__()
        if inner_channels is None:
            inner_channels = max(1, in_channels // 2)
        if inner_channels < 1:
            raise ValueError(f"non-local inner_channels must be >= 1, got {inner_channels}")
        self.in_channels = in_channels
        self.inner_channels = inner_channels
        self.g = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.theta = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.W = nn.Sequential(
            nn.Conv2d(inner_channels, in_channels, kernel_size=1),
            nn.BatchNorm2d(in_channels),
        )
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        g = self.g(x).flatten(2)  # (B, Ci, N)
        theta = self.theta(x).flatten(2)  # (B, Ci, N)
        phi = self.phi(x).flatten(2)  # (B, Ci, N)
        # y[:, :, i] = sum_j (theta_i . phi_j / N) g_j  ==  ((g phi^T) theta) / N
        y = torch.bmm(torch.bmm(g, phi.transpose(1, 2)), theta) / n  # (B, Ci, N)
        y = y.view(b, self.inner_channels, h, w)
        return x + self.W(y)
