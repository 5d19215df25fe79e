"""ResNeSt-50/101/200/269: split-attention networks (Zhang et al., 2020).

Layout and state-dict keys of the published ResNeSt PyTorch checkpoints, which timm's
``resnest50d`` / ``resnest101e`` / ``resnest200e`` / ``resnest269e`` share, so those files
load as they are:

- deep stem ``conv1`` = ``Sequential(conv3x3/2, BN, ReLU, conv3x3, BN, ReLU, conv3x3)``
  (keys ``conv1.0``, ``conv1.1``, ``conv1.3``, ``conv1.4``, ``conv1.6``), then ``bn1``,
  ReLU and a 3x3/2 max-pool; stem width 32 (ResNeSt-50) or 64 (the others);
- bottleneck ``conv1`` (1x1) ``bn1`` -> ``conv2`` = :class:`SplitAttention` (radix 2) ->
  average-pool downsampling (``avd``: a 3x3 average pool carries the stride instead of the
  convolution) -> ``conv3`` (1x1) ``bn3``;
- "avg-down" shortcut: ``downsample = Sequential(AvgPool(stride), conv1x1, BN)`` (keys
  ``downsample.1``, ``downsample.2``).

``last_stride`` is the stride of ``layer4``. As in the published code, the first block of
layers 2-4 always has its ``avd`` average pool (3x3, stride = the block's stride), so with
``last_stride=1`` layer4's first block keeps a stride-1 3x3 average pool (fast-reid's
ResNeSt behaves the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.models.backbones.base import Backbone, init_conv_bn_

__all__ = ["ResNeSt", "ResNeStBottleneck", "SplitAttention", "RESNEST_CONFIGS"]

# name -> (blocks per stage, stem width)
RESNEST_CONFIGS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "resnest50": ((3, 4, 6, 3), 32),
    "resnest101": ((3, 4, 23, 3), 64),
    "resnest200": ((3, 24, 36, 3), 64),
    "resnest269": ((3, 30, 48, 8), 64),
}


class SplitAttention(nn.Module):
    """Split-attention 3x3 convolution (ResNeSt's ``SplAtConv2d``).

    A grouped convolution produces ``radix`` splits of ``channels`` channels each; their
    sum is globally pooled, squeezed by ``fc1`` (BN, ReLU) and expanded by ``fc2`` to one
    logit per split and channel; a softmax over the splits (per channel and cardinal group)
    weights the splits, which are then summed::

        U_r = relu(bn0(conv(x)))[:, r*C:(r+1)*C]            r = 0..radix-1
        s   = relu(bn1(fc1(mean_hw(sum_r U_r))))
        a   = softmax_r(fc2(s))   (sigmoid if radix == 1)
        out = sum_r a_r * U_r

    Args:
        in_channels, channels: input and output channels ``C``.
        stride: of the grouped convolution (1 when the block uses ``avd``).
        groups: cardinality ``K`` (1 for the standard ResNeSt models).
        radix: number of splits ``R``.
        reduction_factor: ``fc1`` width is ``max(in_channels * radix // 4, 32)``.

    Shape: ``(B, in_channels, H, W) -> (B, channels, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        radix: int = 2,
        reduction_factor: int = 4,
    ) -> None:
        super().__init__()
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.cardinality = groups
        self.channels = channels
        self.conv = nn.Conv2d(
            in_channels,
            channels * radix,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=groups * radix,
            bias=False,
        )
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, kernel_size=1, groups=groups)
        self.bn1 = nn.BatchNorm2d(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, kernel_size=1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        b = x.shape[0]
        splits = x.view(b, self.radix, self.channels, *x.shape[2:])  # (B, R, C, H, W)
        gap = splits.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        logits = self.fc2(self.relu(self.bn1(self.fc1(gap))))  # (B, R*C, 1, 1)
        if self.radix > 1:
            # fc2's channels are ordered (group, radix, channel-in-group); the softmax runs
            # over radix, and the result is laid out radix-major like the splits.
            logits = logits.view(b, self.cardinality, self.radix, -1).transpose(1, 2)
            attn = F.softmax(logits, dim=1).reshape(b, self.radix, self.channels, 1, 1)
        else:
            attn = torch.sigmoid(logits).view(b, 1, self.channels, 1, 1)
        return (attn * splits).sum(dim=1)


class ResNeStBottleneck(nn.Module):
    """ResNeSt bottleneck: 1x1 -> split-attention 3x3 -> (avd pool) -> 1x1, residual.

    Args:
        inplanes: input channels; ``planes``: bottleneck width before ``expansion`` (4).
        stride: spatial stride of the block (carried by the ``avd`` pool).
        downsample: the shortcut projection (``None``: identity).
        avd: whether this block has the 3x3 average pool after ``conv2`` (the published
            code: every strided block and the first block of layers 2-4).
        radix, cardinality, base_width: split-attention hyper-parameters.

    Shape: ``(B, inplanes, H, W) -> (B, planes * 4, H / stride, W / stride)``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        avd: bool = False,
        radix: int = 2,
        cardinality: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        group_width = int(planes * (base_width / 64.0)) * cardinality
        self.conv1 = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = SplitAttention(
            group_width,
            group_width,
            stride=1 if avd else stride,
            groups=cardinality,
            radix=radix,
        )
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if avd else None
        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.avd_layer is not None:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNeSt(Backbone):
    """ResNeSt trunk without the classifier (``avgpool``/``fc``).

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNeSt-50.
        stem_width: width of the deep stem's first two convolutions (its output has twice
            that many channels).
        last_stride: stride of ``layer4`` (1: 16x8 map at 256x128; 2: ImageNet network).
        width: planes of layer1 (64 = the published models; smaller only for tests; the
            other stages double it).
        radix, cardinality, base_width: split-attention hyper-parameters (2, 1, 64).

    ``forward(x)``: ``(B, 3, H, W) -> (B, 2048, H/16, W/16)`` (``last_stride=1``).
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        stem_width: int = 64,
        last_stride: int = 1,
        width: int = 64,
        radix: int = 2,
        cardinality: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.last_stride = last_stride
        self.radix, self.cardinality, self.base_width = radix, cardinality, base_width
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width * 2, 3, stride=1, padding=1, bias=False),
        )
        self.inplanes = stem_width * 2
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, last_stride)
        for i, (name, n_blocks, stride) in enumerate(zip(self.stage_names, layers, strides)):
            # layer1's first block is not "is_first" in the published code: no avd pool
            layer = self._make_layer(width * 2**i, n_blocks, stride, first_avd=i > 0)
            setattr(self, name, layer)
        self.stage_channels = [width * 2**i * ResNeStBottleneck.expansion for i in range(4)]
        self.out_channels = self.stage_channels[-1]
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, first_avd: bool) -> nn.Sequential:
        out = planes * ResNeStBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            pool = (
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                if stride != 1
                else nn.Identity()
            )
            downsample = nn.Sequential(
                pool,
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(out),
            )
        kwargs = dict(radix=self.radix, cardinality=self.cardinality, base_width=self.base_width)
        mods = [
            ResNeStBottleneck(
                self.inplanes,
                planes,
                stride,
                downsample,
                avd=stride > 1 or first_avd,
                **kwargs,
            )
        ]
        self.inplanes = out
        mods += [ResNeStBottleneck(out, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        init_conv_bn_(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Deep stem + max-pool: ``(B, 3, H, W) -> (B, 2 * stem_width, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))
