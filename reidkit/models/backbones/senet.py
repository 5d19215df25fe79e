"""SE-ResNet-50/101 and SE-ResNeXt-50/101 (32x4d): squeeze-and-excitation networks
(Hu et al., CVPR 2018).

State-dict keys follow timm's ``seresnet50`` / ``seresnext50_32x4d`` (torchvision's ResNet
names plus ``layerX.Y.se.fc1`` / ``se.fc2``): ``conv1``, ``bn1``, ``layer1.0.conv1`` ..
``bn3``, ``layer1.0.se.fc1.weight``, ``layer1.0.downsample.0`` (conv) / ``.1`` (BN).

The other layout users have is Cadene's ``pretrainedmodels`` (also torchreid's ``senet``):
``layer0.conv1``, ``layer0.bn1``, ``layerX.Y.se_module.fc1``, ``last_linear``.
:func:`convert_pretrainedmodels_senet` renames such a file into the timm layout, and
:meth:`SENet.adapt_pretrained_state` does it automatically when a file in that layout is
loaded. Those checkpoints were trained with the Caffe-style network, which differs from
timm's without changing any tensor shape: the stem max-pool uses ``ceil_mode=True``
without padding, and SE-ResNet (not SE-ResNeXt) puts the block's stride in the first 1x1
convolution instead of the 3x3. ``caffe_style`` selects it; left at ``None`` it is chosen
from the file (Cadene layout -> Caffe style, logged), so a ``pretrainedmodels`` file gives
the same features as its own definition.

SE module: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, 1x1 convolutions with bias, a
reduction of 16, applied to the residual branch before the addition.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from reidkit.models.backbones.base import Backbone, init_conv_bn_

__all__ = [
    "SEModule",
    "SEBottleneck",
    "SENet",
    "SENET_CONFIGS",
    "convert_pretrainedmodels_senet",
    "is_pretrainedmodels_senet",
]

logger = logging.getLogger(__name__)

# name -> (blocks per stage, cardinality, base width)
SENET_CONFIGS: dict[str, tuple[tuple[int, int, int, int], int, int]] = {
    "se_resnet50": ((3, 4, 6, 3), 1, 64),
    "se_resnet101": ((3, 4, 23, 3), 1, 64),
    "se_resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "se_resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
}


class SEModule(nn.Module):
    """Squeeze-and-excitation channel gate.

    Args:
        channels: channels ``C`` of the gated map.
        reduction: ``fc1`` maps ``C`` to ``C // reduction`` channels.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``:
    ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class SEBottleneck(nn.Module):
    """ResNet / ResNeXt bottleneck with an SE gate on the residual branch.

    Args:
        inplanes: input channels; ``planes``: stage width (output ``planes * 4``).
        stride: spatial stride; in ``conv2`` (timm) or in ``conv1`` when
            ``stride_in_1x1`` (Caffe-style SE-ResNet).
        downsample: shortcut projection (``None``: identity).
        cardinality, base_width: 3x3 groups and width per group (1/64: SE-ResNet;
            32/4: SE-ResNeXt 32x4d); the 3x3 width is ``floor(planes * base_width / 64) *
            cardinality``.

    Shape: ``(B, inplanes, H, W) -> (B, planes * 4, H / stride, W / stride)``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        cardinality: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0)) * cardinality)
        if width < 1:
            raise ValueError(
                f"SE bottleneck with {planes} planes and base width {base_width} has no "
                "3x3 channels; use a larger width"
            )
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.se = SEModule(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.set_stride_in_1x1(stride_in_1x1)

    def set_stride_in_1x1(self, flag: bool) -> None:
        """Put the block's stride in ``conv1`` (Caffe style) or ``conv2`` (timm); no
        parameter changes shape."""
        self.stride_in_1x1 = flag
        self.conv1.stride = (self.stride, self.stride) if flag else (1, 1)
        self.conv2.stride = (1, 1) if flag else (self.stride, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


class SENet(Backbone):
    """SE-ResNet / SE-ResNeXt trunk without the classifier (timm key layout).

    Args:
        layers: blocks per stage (``(3, 4, 6, 3)``: 50 layers; ``(3, 4, 23, 3)``: 101).
        cardinality, base_width: 1/64 for SE-ResNet, 32/4 for SE-ResNeXt 32x4d.
        last_stride: stride of ``layer4`` (1: re-ID 16x8 map at 256x128; 2: ImageNet).
        caffe_style: ``pretrainedmodels`` variant (ceil-mode stem max-pool; SE-ResNet: stride
            in the first 1x1). ``None``: timm style unless a Cadene-layout file is loaded.
        width: planes of layer1 (64 = the published networks; smaller only for tests).

    ``forward(x)``: ``(B, 3, H, W) -> (B, 2048, H/16, W/16)`` (``last_stride=1``).
    """

    pretrained_ignore_prefixes = ("fc.", "last_linear.", "classifier.")

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        cardinality: int = 1,
        base_width: int = 64,
        last_stride: int = 1,
        caffe_style: bool | None = None,
        width: int = 64,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.last_stride = last_stride
        self.cardinality, self.base_width = cardinality, base_width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        for i, (name, n_blocks, stride) in enumerate(
            zip(self.stage_names, layers, (1, 2, 2, last_stride))
        ):
            setattr(self, name, self._make_layer(width * 2**i, n_blocks, stride))
        self.stage_channels = [width * 2**i * SEBottleneck.expansion for i in range(4)]
        self.out_channels = self.stage_channels[-1]
        self._caffe_style_requested = caffe_style
        self.set_caffe_style(bool(caffe_style))
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * SEBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out),
            )
        kw = dict(cardinality=self.cardinality, base_width=self.base_width)
        mods = [SEBottleneck(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = out
        mods += [SEBottleneck(out, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        init_conv_bn_(self)

    def set_caffe_style(self, flag: bool) -> None:
        """Switch between timm's network and the ``pretrainedmodels`` (Caffe-style) one.

        Caffe style: stem max-pool ``MaxPool2d(3, 2, ceil_mode=True)`` without padding and,
        for SE-ResNet (cardinality 1), the stride of each block in ``conv1``. Parameters are
        untouched (same shapes, same values).
        """
        self.caffe_style = flag
        self.maxpool = (
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
            if flag
            else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        for name in self.stage_names:
            for block in getattr(self, name):
                block.set_stride_in_1x1(flag and self.cardinality == 1)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> maxpool: ``(B, 3, H, W) -> (B, 64, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def adapt_pretrained_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a ``pretrainedmodels`` file into timm keys; pick the Caffe style for it
        unless ``caffe_style`` was given explicitly."""
        cadene = is_pretrainedmodels_senet(state)
        if cadene:
            state = convert_pretrainedmodels_senet(state)
        if self._caffe_style_requested is None and cadene != self.caffe_style:
            self.set_caffe_style(cadene)
            if cadene:
                logger.info(
                    "pretrainedmodels (Cadene) SE-Net weights: using their Caffe-style network "
                    "(ceil-mode stem max-pool%s) so the features match that definition; "
                    "pass caffe_style=False to keep timm's",
                    ", stride in the first 1x1 convolution" if self.cardinality == 1 else "",
                )
        return state


def is_pretrainedmodels_senet(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` uses the ``pretrainedmodels`` layout (``layer0.*``/``se_module``)."""
    return any(k.startswith("layer0.") or ".se_module." in k for k in state)


def convert_pretrainedmodels_senet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Cadene ``pretrainedmodels`` SE-ResNet/SE-ResNeXt state dict to timm's keys.

    ``layer0.conv1`` -> ``conv1``, ``layer0.bn1`` -> ``bn1``, ``.se_module.`` -> ``.se.``,
    ``last_linear`` -> ``fc``; every other key (``layerX.Y.convN``, ``bnN``,
    ``downsample.0/1``) is already the same. Tensors are not copied.

    Raises:
        ValueError: a key that has no place in the timm layout (e.g. the 3-conv
            ``layer0.conv2`` stem of SENet-154, which is not supported).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if key.startswith("layer0."):
            rest = key[len("layer0.") :]
            if not rest.startswith(("conv1.", "bn1.")):
                raise ValueError(
                    f"pretrainedmodels SE-Net key '{key}' has no timm equivalent (only the "
                    "7x7 stem of SE-ResNet/SE-ResNeXt is supported, not SENet-154's)"
                )
            new = rest
        elif key.startswith("last_linear."):
            new = "fc." + key[len("last_linear.") :]
        new = new.replace(".se_module.", ".se.")
        out[new] = value
    return out
