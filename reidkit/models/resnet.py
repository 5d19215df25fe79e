"""ResNet-18/34/50/101 backbones with torchvision-compatible state-dict keys.

The module layout follows torchvision's ``resnet`` (v1.5: the stride of a bottleneck sits
in its 3x3 ``conv2``), so a local ImageNet file saved from torchvision loads without
renaming: ``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` (conv) /
``.1`` (BN), ... There is no ``fc``: a re-ID head replaces it.

Re-ID options:

- ``last_stride``: stride of layer4's first block (and its downsample). 1 (the re-ID
  default) keeps a 16x8 final map for 256x128 inputs; 2 is the ImageNet network.
- ``ibn``: IBN-a normalisation in the first BN of every block of layer1-3
  (:class:`reidkit.models.resnet_ibn.IBN`).
- ``non_local_layers``: ``{"layer2": [2, 3], "layer3": [3, 4, 5]}`` inserts a
  :class:`~reidkit.models.non_local.NonLocalBlock` after those (0-based) blocks. The
  blocks live in ``nl_layer1`` .. ``nl_layer4`` ``ModuleList``s (one entry per listed
  index, in sorted order), so the torchvision keys are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from reidkit.models.backbone import Backbone, init_conv_bn_
from reidkit.models.ibn import IBN
from reidkit.models.non_local import NonLocalBlock

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_resnet", "RESNET_DEPTHS"]

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """Constructor signature and residual ``forward`` shared by the two block types.

    ``BasicBlock(inplanes, planes, stride=1, downsample=None, ibn=False)``: the subclass's
    :meth:`_build` registers the residual branch's layers (in torchvision's order, so the
    state-dict keys and their order match), then ``downsample`` and ``stride`` are stored.
    ``forward(x)``: ``(B, inplanes, H, W) -> (B, planes * expansion, H / stride, W / stride)``
    computed as ``relu(branch(x) + (x or downsample(x)))``; ``ibn`` puts IBN-a in ``bn1``.
    """

    expansion: int = 1
    relu: nn.ReLU

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        ibn: bool = False,
    ) -> None:
        super().__init__()
        self._build(inplanes, planes, stride, IBN(planes) if ibn else nn.BatchNorm2d(planes))
        self.downsample = downsample
        self.stride = stride

    def _build(self, inplanes: int, planes: int, stride: int, bn1: nn.Module) -> None:
        """Register the branch's modules (``bn1`` is the first normalisation layer)."""
        raise NotImplementedError

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch, without the final ReLU."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self._branch(x) + identity)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def _build(self, inplanes: int, planes: int, stride: int, bn1: nn.Module) -> None:
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a residual connection (ResNet-50/101)."""

    expansion = 4

    def _build(self, inplanes: int, planes: int, stride: int, bn1: nn.Module) -> None:
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = bn1
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(Backbone):
    """ResNet trunk without the classifier.

    Attributes:
        out_channels: channels of the layer4 map (512 for 18/34, 2048 for 50/101).
        stage_channels: channels of the layer1..layer4 maps.

    ``forward(x)``: ``(B, 3, H, W) -> (B, out_channels, H/16 or H/32, ...)``; with
    ``last_stride=1`` a 256x128 input gives a 16x8 map. ``forward_stages(x)`` returns the
    four stage maps ``[layer1, layer2, layer3, layer4]`` (strides 4, 8, 16, 16/32).
    Blocks can be inserted after any block (:meth:`~reidkit.models.backbone.Backbone.insert_blocks`).
    """

    stage_names = STAGES

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        last_stride: int = 1,
        ibn: bool = False,
        non_local_layers: Mapping[str, Sequence[int]] | None = None,
        non_local_inner_channels: int | None = 1,
        width: int = 64,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.inplanes = width
        self.ibn = ibn
        self.last_stride = last_stride
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, last_stride)
        for i, (name, n_blocks, stride) in enumerate(zip(STAGES, layers, strides)):
            # IBN-a: layers 1-3 only (layer4 keeps plain BN), as in the IBN-Net code.
            layer = self._make_layer(block, width * 2**i, n_blocks, stride, ibn and i < 3)
            setattr(self, name, layer)
        self.stage_channels = [width * 2**i * block.expansion for i in range(4)]
        self.out_channels = self.stage_channels[-1]

        nl = {k: list(v) for k, v in (non_local_layers or {}).items()}
        for name in nl:
            if name not in STAGES:
                raise ValueError(
                    f"non_local_layers: unknown stage '{name}' (expected one of {', '.join(STAGES)})"
                )
        try:
            self.insert_blocks("nl", nl, lambda c: NonLocalBlock(c, non_local_inner_channels))
        except ValueError as exc:
            raise ValueError(f"{exc} (config: model.non_local_layers)") from None
        self._init_weights()

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int, ibn: bool
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample, ibn=ibn)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, ibn=ibn) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        init_conv_bn_(self, skip_prefixes=("nl_",))  # non-local blocks keep their identity init

    @property
    def non_local_layers(self) -> dict[str, list[int]]:
        """Stage -> block indices followed by a non-local block."""
        return self.inserted_groups.get("nl", {})

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> maxpool: ``(B, 3, H, W) -> (B, 64, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def build_resnet(
    depth: int,
    last_stride: int = 1,
    ibn: bool = False,
    non_local_layers: Mapping[str, Sequence[int]] | None = None,
    non_local_inner_channels: int | None = 1,
    width: int = 64,
) -> ResNet:
    """A ResNet of ``depth`` in {18, 34, 50, 101} (random init; see ``load_pretrained``).

    ``width`` (default 64, torchvision's) scales every stage; small widths give tiny
    models for tests (their state dicts then of course do not match ImageNet files).
    """
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(RESNET_DEPTHS)}")
    block, layers = RESNET_DEPTHS[depth]
    return ResNet(
        block,
        layers,
        last_stride=last_stride,
        ibn=ibn,
        non_local_layers=non_local_layers,
        non_local_inner_channels=non_local_inner_channels,
        width=width,
    )
