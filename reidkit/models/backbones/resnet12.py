"""ResNet-12 as in the CAN authors' code (``torchFewShot/models/resnet12.py``).

Checked against that code (the slides only say "ResNet-12"):

- a stem ``conv3x3(3 -> 64) -> BN -> ReLU`` at full resolution (stride 1);
- four stages of one residual block each, widths 64 / 128 / 256 / 512. A block is
  ``conv3x3 -> BN -> ReLU -> conv3x3 (stride 2) -> BN -> ReLU -> conv3x3 -> BN``, plus a
  shortcut ``conv1x1 (stride 2) -> BN``, then ``ReLU(branch + shortcut)``;
- **ReLU**, not LeakyReLU (other ResNet-12s, e.g. MetaOptNet's, use LeakyReLU 0.1);
- **no max-pooling anywhere**: each stage halves the map with the stride-2 *middle* conv
  (MetaOptNet-style ResNet-12s max-pool after each block instead). With padding 1 a stride-2
  3x3 conv maps ``n -> ceil(n / 2)``, so 84x84 gives 42, 21, 11 and finally 6x6 (512 x 6 x 6);
- no dropout / DropBlock; He (fan-out) init for convolutions, BN weight 1 and bias 0.

Module names match the authors' (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer4.0.downsample.1``), so their backbone weights load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ResNet12", "ResNet12Block", "resnet12"]

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)


class ResNet12Block(nn.Module):
    """Three 3x3 conv + BN layers (the middle one strided) with a 1x1 projection shortcut.

    ``forward(x)``: ``(B, inplanes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet12(nn.Module):
    """The CAN code's ResNet-12 trunk (no classifier).

    Args:
        channels: output widths of the four stages (the code: 64, 128, 256, 512).
        stem_channels: width of the stem conv (the code: 64).
        in_channels: input image channels.

    Attributes:
        out_channels: channels of the final map (``channels[-1]``).
        stage_channels: channels of the four stage maps.

    ``forward(x)``: ``(B, 3, H, W) -> (B, out_channels, h, w)`` with ``(h, w) =
    output_size(H, W)`` (6x6 at 84x84). ``forward_stages(x)`` returns the four stage maps.
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512),
        stem_channels: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1 or stem_channels < 1:
            raise ValueError(
                f"ResNet12: channels must be 4 positive widths and stem_channels positive, got "
                f"{channels}, {stem_channels}"
            )
        self.conv1 = _conv3x3(in_channels, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem_channels
        for name, planes in zip(STAGES, channels):
            setattr(self, name, nn.Sequential(ResNet12Block(inplanes, planes, stride=2)))
            inplanes = planes
        self.stage_channels = list(channels)
        self.out_channels = channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def output_size(height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the final map for an ``height x width`` input (four ``ceil(n / 2)``)."""
        h, w = int(height), int(width)
        for _ in STAGES:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def stem(self, x: Tensor) -> Tensor:
        """``conv1 -> bn1 -> relu``: ``(B, 3, H, W) -> (B, stem_channels, H, W)``."""
        return self.relu(self.bn1(self.conv1(x)))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[layer1, layer2, layer3, layer4]`` maps (strides 2, 4, 8, 16)."""
        x = self.stem(x)
        outs = []
        for name in STAGES:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, out_channels, h, w)`` final map."""
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
        return x


def resnet12(
    width: int = 64,
    channels: Sequence[int] | None = None,
    stem_channels: int | None = None,
    **kwargs: object,
) -> ResNet12:
    """The CAN ResNet-12 (random init).

    ``width`` scales the network: stages ``(w, 2w, 4w, 8w)`` and a stem of ``w`` channels
    (64 is the authors' network; small widths are for CPU tests and demos). ``channels`` /
    ``stem_channels`` set the widths explicitly instead. Other keyword arguments go to
    :class:`ResNet12` (``in_channels``).
    """
    if width < 1:
        raise ValueError(f"resnet12: width must be >= 1, got {width}")
    if channels is None:
        channels = (width, 2 * width, 4 * width, 8 * width)
    if stem_channels is None:
        stem_channels = channels[0]
    unknown = set(kwargs) - {"in_channels"}
    if unknown:
        raise TypeError(f"resnet12: unexpected keyword arguments {sorted(unknown)}")
    return ResNet12(channels, stem_channels=stem_channels, **kwargs)  # type: ignore[arg-type]
