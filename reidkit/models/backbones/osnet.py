"""OSNet x1.0 / x0.75 / x0.5 / x0.25 and OSNet-AIN x1.0 (Zhou et al., ICCV 2019 / TPAMI 2021).

State-dict keys are torchreid's (``torchreid/models/osnet.py`` and ``osnet_ain.py``), so its
ImageNet files (``osnet_x1_0_imagenet.pth``, ...) and re-ID checkpoints load as they are;
their ``fc.*`` (512-d embedding layer) and ``classifier.*`` keys are ignored.

Network (channels ``c0..c3`` = 64/256/384/512 for x1.0, scaled for the others)::

    conv1: 7x7/2 conv-BN-ReLU (OSNet-AIN: affine InstanceNorm instead of BN) -> 3x3/2 max-pool
    conv2: 2 OS blocks c0 -> c1, then transition (1x1 conv-BN-ReLU + 2x2/2 average pool)
    conv3: 2 OS blocks c1 -> c2, then transition
    conv4: 2 OS blocks c2 -> c3
    conv5: 1x1 conv-BN-ReLU c3 -> c3          (the feature map torchreid pools)

An OS block has a 1x1 reduction to ``c/4``, four streams of 1, 2, 3, 4 "lite" 3x3 layers
(1x1 conv + depth-wise 3x3 + BN + ReLU), a channel gate shared by the streams
(``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, reduction 16) whose gated outputs are summed,
a linear 1x1 expansion and a residual connection. OSNet keeps the transitions inside
``conv2``/``conv3`` (keys ``conv2.2.0``); OSNet-AIN keeps them outside as ``pool2``/``pool3``
(here the stage tails of ``conv2``/``conv3``), names the four streams ``conv2.{0..3}.layers``
and uses "IN-in" blocks (affine InstanceNorm on the residual branch, no BN after ``conv3``)
at the positions its search found.

Stages for methods are ``conv2``, ``conv3``, ``conv4`` and ``conv5``. The ImageNet network
already ends at stride 16 (16x8 at 256x128) and has no strided last stage, so
``last_stride`` (1 or 2) changes nothing here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.models.backbones.base import Backbone, init_conv_bn_

__all__ = ["OSNet", "OSBlock", "ChannelGate", "OSNET_CHANNELS"]

OSNET_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_75": (48, 192, 288, 384),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
    "osnet_ain_x1_0": (64, 256, 384, 512),
}

# OSNet-AIN's block types per stage (True: OSBlockINin), from its architecture search
_AIN_BLOCKS = ((True, True), (False, True), (True, False))


def _conv_norm_act(
    in_ch: int,
    out_ch: int,
    kernel: int = 1,
    stride: int = 1,
    padding: int = 0,
    instance_norm: bool = False,
    act: bool = True,
) -> nn.Sequential:
    """``conv`` (no bias) -> ``bn`` (BatchNorm, or affine InstanceNorm) -> ``relu``,
    named so the keys are torchreid's ``<name>.conv.weight`` / ``<name>.bn.*``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
    layers["bn"] = (
        nn.InstanceNorm2d(out_ch, affine=True) if instance_norm else nn.BatchNorm2d(out_ch)
    )
    if act:
        layers["relu"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class LightConv3x3(nn.Module):
    """1x1 conv (linear) -> depth-wise 3x3 conv -> BN -> ReLU: ``(B, in, H, W) -> (B, out, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, groups=out_ch, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class LightConvStream(nn.Module):
    """``depth`` stacked :class:`LightConv3x3` (OSNet-AIN's key layout: ``layers.N``)."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(LightConv3x3(channels, channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ChannelGate(nn.Module):
    """Channel gate shared by the OS streams: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``; ``fc1``/``fc2`` are 1x1 convs with bias,
    ``C -> C // 16 -> C``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class OSBlock(nn.Module):
    """Omni-scale residual block.

    Args:
        in_ch, out_ch: input / output channels (bottleneck ``out_ch // 4``).
        ain_layout: OSNet-AIN's key layout (streams in ``conv2.{t}.layers``) instead of
            OSNet's (``conv2a``, ``conv2b``, ``conv2c``, ``conv2d``).
        instance_norm_in: OSNet-AIN's "IN-in" block: ``conv3`` without BN, followed by an
            affine InstanceNorm (``IN``) on the residual branch.

    Shape: ``(B, in_ch, H, W) -> (B, out_ch, H, W)``:
    ``relu(expand(sum_t gate(stream_t(reduce(x)))) + shortcut(x))``.
    """

    def __init__(
        self, in_ch: int, out_ch: int, ain_layout: bool = False, instance_norm_in: bool = False
    ) -> None:
        super().__init__()
        mid = out_ch // 4
        self.ain_layout = ain_layout
        self.conv1 = _conv_norm_act(in_ch, mid)
        if ain_layout:
            self.conv2 = nn.ModuleList(LightConvStream(mid, t) for t in range(1, 5))
        else:
            self.conv2a = LightConv3x3(mid, mid)
            self.conv2b = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(2)))
            self.conv2c = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(3)))
            self.conv2d = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(4)))
        self.gate = ChannelGate(mid)
        if instance_norm_in:
            self.conv3 = nn.Sequential(OrderedDict(conv=nn.Conv2d(mid, out_ch, 1, bias=False)))
            self.IN = nn.InstanceNorm2d(out_ch, affine=True)
        else:
            self.conv3 = _conv_norm_act(mid, out_ch, act=False)
            self.IN = None
        self.downsample = _conv_norm_act(in_ch, out_ch, act=False) if in_ch != out_ch else None

    def streams(self) -> list[nn.Module]:
        """The four streams (1, 2, 3, 4 lite layers)."""
        if self.ain_layout:
            return list(self.conv2)
        return [self.conv2a, self.conv2b, self.conv2c, self.conv2d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        x2 = sum(self.gate(stream(x1)) for stream in self.streams())
        x3 = self.conv3(x2)
        if self.IN is not None:
            x3 = self.IN(x3)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(x3 + shortcut)


def _transition(channels: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU then 2x2/2 average pool (halves H and W)."""
    return nn.Sequential(_conv_norm_act(channels, channels), nn.AvgPool2d(2, stride=2))


class OSNet(Backbone):
    """OSNet / OSNet-AIN trunk up to ``conv5`` (torchreid's ``featuremaps``).

    Args:
        channels: ``(c0, c1, c2, c3)``, e.g. ``(64, 256, 384, 512)`` for x1.0.
        ain: OSNet-AIN x1.0 (InstanceNorm stem, IN-in blocks, ``pool2``/``pool3`` layout).
        last_stride: accepted for interface compatibility (1 or 2); OSNet has no strided
            last stage, so both give the torchreid network (stride 16).

    ``forward(x)``: ``(B, 3, H, W) -> (B, c3, H/16, W/16)`` (16x8 for 256x128).
    """

    stage_names = ("conv2", "conv3", "conv4", "conv5")
    pretrained_ignore_prefixes = ("fc.", "classifier.")

    def __init__(
        self, channels: tuple[int, int, int, int], ain: bool = False, last_stride: int = 2
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.last_stride = last_stride
        self.ain = ain
        c0, c1, c2, c3 = channels
        self.conv1 = _conv_norm_act(3, c0, 7, stride=2, padding=3, instance_norm=ain)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks = _AIN_BLOCKS if ain else ((False, False),) * 3
        self.conv2 = self._make_stage(c0, c1, blocks[0])
        if ain:
            self.pool2 = _transition(c1)
        else:
            self.conv2.append(_transition(c1))
        self.conv3 = self._make_stage(c1, c2, blocks[1])
        if ain:
            self.pool3 = _transition(c2)
        else:
            self.conv3.append(_transition(c2))
        self.conv4 = self._make_stage(c2, c3, blocks[2])
        self.conv5 = _conv_norm_act(c3, c3)
        self.stage_tails = {"conv2": "pool2", "conv3": "pool3"} if ain else {}
        self.stage_channels = [c1, c2, c3, c3]
        self.out_channels = c3
        self._init_weights()

    def _make_stage(self, in_ch: int, out_ch: int, ins: tuple[bool, ...]) -> nn.Sequential:
        return nn.Sequential(
            *(
                OSBlock(in_ch if i == 0 else out_ch, out_ch, self.ain, instance_norm_in=flag)
                for i, flag in enumerate(ins)
            )
        )

    def _init_weights(self) -> None:
        init_conv_bn_(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> max-pool: ``(B, 3, H, W) -> (B, c0, H/4, W/4)``."""
        return self.maxpool(self.conv1(x))
