"""Instance-Batch Normalisation (IBN-a, Pan et al., ECCV 2018).

IBN-a replaces the first normalisation (``bn1``) of every residual block in ``layer1`` to
``layer3`` by an :class:`IBN` layer: the first half of the channels go through an affine
``InstanceNorm2d``, the rest through ``BatchNorm2d``. ``layer4`` keeps plain BN, as in the
IBN-Net public code. Key names follow that code (``layer1.0.bn1.IN.weight``,
``layer1.0.bn1.BN.running_mean``), so its released ``resnet50_ibn_a`` weights load as is.
"""

from __future__ import annotations

from torch import nn

from reidkit.models.ibn import IBN
from reidkit.models.resnet import build_resnet

__all__ = ["IBN", "resnet50_ibn_a", "resnet101_ibn_a", "resnet18_ibn_a", "resnet34_ibn_a"]


def _build(depth: int, **kwargs) -> nn.Module:
    return build_resnet(depth, ibn=True, **kwargs)


def resnet18_ibn_a(**kwargs) -> nn.Module:
    """ResNet-18 with IBN-a blocks in layer1-3 (see :func:`reidkit.models.resnet.build_resnet`)."""
    return _build(18, **kwargs)


def resnet34_ibn_a(**kwargs) -> nn.Module:
    """ResNet-34 with IBN-a blocks in layer1-3."""
    return _build(34, **kwargs)


def resnet50_ibn_a(**kwargs) -> nn.Module:
    """ResNet-50 with IBN-a bottlenecks in layer1-3."""
    return _build(50, **kwargs)


def resnet101_ibn_a(**kwargs) -> nn.Module:
    """ResNet-101 with IBN-a bottlenecks in layer1-3."""
    return _build(101, **kwargs)
