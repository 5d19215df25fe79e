"""Instance-Batch Normalisation (IBN-a, Pan et al., ECCV 2018): the :class:`IBN` layer.

IBN-a replaces the first normalisation (``bn1``) of every residual block in ``layer1`` to
``layer3`` by an :class:`IBN` layer: the first half of the channels go through an affine
``InstanceNorm2d``, the rest through ``BatchNorm2d``. Key names follow the IBN-Net code
(``layer1.0.bn1.IN.weight``, ``layer1.0.bn1.BN.running_mean``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IBN"]


class IBN(nn.Module):
    """Half InstanceNorm (affine), half BatchNorm over the channel dimension.

    Args:
        planes: number of channels ``C``.
        ratio: fraction of channels normalised by InstanceNorm (``int(C * ratio)``).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        if not 0 < ratio < 1:
            raise ValueError(f"IBN ratio must be in (0, 1), got {ratio}")
        self.half = int(planes * ratio)
        if self.half < 1 or self.half >= planes:
            raise ValueError(f"IBN needs at least 2 channels, got planes={planes}")
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a), self.BN(b)], dim=1)
