"""Residual Attention Network 56 / 92 (Wang et al., CVPR 2017): attention residual learning.

Follows the authors' published ImageNet definition (``Attention-56-deploy.prototxt``,
Caffe): pre-activation bottleneck units everywhere (BN-ReLU before each unit's
convolutions; a projection shortcut takes the pre-activated input), and attention modules
with ``p = 1`` pre-processing unit, ``t = 2`` trunk units and ``r = 1`` unit between
poolings in the mask branch::

    stem:   conv 7x7/2 (64) - BN - ReLU - max-pool 3x3/2
    layer1: unit 64 -> 256,              attention module (3 poolings in its mask) x 1
    layer2: unit 256 -> 512, stride 2,   attention module (2 poolings)            x 1 | 2
    layer3: unit 512 -> 1024, stride 2,  attention module (1 pooling)             x 1 | 3
    layer4: unit 1024 -> 2048, stride ``last_stride``, 2 more units;  tail: BN - ReLU
            (Attention-56: 1, 1, 1 modules; Attention-92: 1, 2, 3)

Attention module with input ``x``::

    x' = pre(x)                 T = trunk(x')              (2 units)
    mask branch on x': max-pool, units, max-pool, units, ... (bottom-up); at the lowest
    resolution 2 units; back up by bilinear interpolation to the size of the level above,
    adding that level's skip unit, then one unit (top-down); a last interpolation to the
    size of T, then BN-ReLU-1x1 conv-BN-ReLU-1x1 conv-sigmoid -> M in (0, 1)
    out = post((1 + M) * T)     (attention residual learning; post = 1 unit)

The published Attention-92 definition gates the second and third modules of a stage
(``AttentionB_2``, ``AttentionC_2``, ``AttentionC_3``) with tanh instead of the sigmoid
(``M`` in (-1, 1)); the first module of each stage, like every module of Attention-56,
uses the sigmoid. reidkit does the same (``AttentionModule(gate=...)``).

Max-pools are Caffe's (3x3/2, ceil mode, no padding), interpolation is bilinear with
aligned corners (Caffe's ``Interp``), as in the published definition. Only Caffe weights
were published, so the state-dict layout is reidkit's own (documented in
``docs/backbones.md``): ``conv1``, ``bn1``, ``layerN.i`` units (``norm1, conv1, norm2,
conv2, norm3, conv3, shortcut``) and modules (``pre``, ``trunk``, ``mask_down``,
``mask_skip``, ``mask_up``, ``mask_out``, ``post``), ``norm_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.models.backbones.base import Backbone, init_conv_bn_

__all__ = ["ResidualAttentionNet", "AttentionModule", "PreActBottleneck", "RESATTNET_MODULES"]

# name -> attention modules in layer1, layer2, layer3
RESATTNET_MODULES: dict[str, tuple[int, int, int]] = {
    "resattnet56": (1, 1, 1),
    "resattnet92": (1, 2, 3),
}


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit (He et al., 2016): BN-ReLU-conv1x1, BN-ReLU-conv3x3
    (stride), BN-ReLU-conv1x1, plus the input (or a 1x1 projection of the pre-activated
    input when the shape changes). The output is the raw sum (no activation).

    Shape: ``(B, in_ch, H, W) -> (B, out_ch, H / stride, W / stride)``; bottleneck
    ``out_ch // 4``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        mid = out_ch // 4
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            if in_ch != out_ch or stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.norm2(out)))
        out = self.conv3(self.relu(self.norm3(out)))
        return out + shortcut


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(PreActBottleneck(channels, channels) for _ in range(n)))


def _caffe_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Caffe's 3x3/2 max-pool: ceil mode, no padding (``(H - 3) / 2`` rounded up, + 1)."""
    return F.max_pool2d(x, kernel_size=3, stride=2, ceil_mode=True)


def _resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of ``x`` to ``ref``'s spatial size (Caffe ``Interp``)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class AttentionModule(nn.Module):
    """Trunk branch + bottom-up top-down soft mask branch, combined as ``(1 + M) * T``.

    Args:
        channels: input = output channels ``C``.
        depth: number of max-poolings in the mask branch (3, 2, 1 in stages 1, 2, 3).
        gate: ``"sigmoid"`` (``M`` in (0, 1)) or ``"tanh"`` (``M`` in (-1, 1); the later
            modules of a stage in the published Attention-92).

    Attributes:
        pre, trunk, post: the ``p = 1``, ``t = 2`` and ``p = 1`` units.
        mask_down: ``depth`` unit sequences, one after each max-pool (the lowest: 2 units).
        mask_skip: ``depth - 1`` skip units on the bottom-up maps above the lowest level.
        mask_up: ``depth - 1`` units after each up-sampling + skip addition.
        mask_out: BN-ReLU-conv1x1-BN-ReLU-conv1x1, followed by a sigmoid.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``. ``return_mask=True`` in :meth:`forward` also
    returns ``M`` ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, depth: int, gate: str = "sigmoid") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"attention module depth must be >= 1, got {depth}")
        if gate not in ("sigmoid", "tanh"):
            raise ValueError(f"attention gate must be sigmoid or tanh, got {gate}")
        self.depth = depth
        self.gate = gate
        self.pre = PreActBottleneck(channels, channels)
        self.trunk = _units(channels, 2)
        self.mask_down = nn.ModuleList(
            _units(channels, 2 if level == depth - 1 else 1) for level in range(depth)
        )
        self.mask_skip = nn.ModuleList(_units(channels, 1) for _ in range(depth - 1))
        self.mask_up = nn.ModuleList(_units(channels, 1) for _ in range(depth - 1))
        self.mask_out = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.post = PreActBottleneck(channels, channels)

    def soft_mask(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Mask branch on the pre-processed input ``x``; ``ref`` (the trunk output) gives
        the output size. Returns ``M = sigmoid(...)`` (or ``tanh``) shaped like ``ref``."""
        downs = []
        m = x
        for level in range(self.depth):
            m = self.mask_down[level](_caffe_max_pool(m))
            downs.append(m)
        for level in reversed(range(self.depth - 1)):
            m = _resize_to(m, downs[level]) + self.mask_skip[level](downs[level])
            m = self.mask_up[level](m)
        logits = self.mask_out(_resize_to(m, ref))
        return torch.sigmoid(logits) if self.gate == "sigmoid" else torch.tanh(logits)

    def forward(self, x: torch.Tensor, return_mask: bool = False):
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.soft_mask(x, trunk)
        out = self.post((1.0 + mask) * trunk)
        return (out, mask) if return_mask else out


class ResidualAttentionNet(Backbone):
    """Residual Attention Network trunk without the classifier.

    Args:
        modules_per_stage: attention modules in layer1..layer3 (``(1, 1, 1)``: Attention-56;
            ``(1, 2, 3)``: Attention-92).
        last_stride: stride of layer4's first unit (1: 16x8 map at 256x128; 2: ImageNet).
        width: stem width (64 = the published networks; smaller only for tests; stage
            outputs are ``4, 8, 16, 32`` times it).

    ``forward(x)``: ``(B, 3, H, W) -> (B, 2048, H/16, W/16)`` (``last_stride=1``), after the
    final BN-ReLU (the tail of layer4).
    """

    stage_tails = {"layer4": "norm_out"}

    def __init__(
        self,
        modules_per_stage: tuple[int, int, int] = (1, 1, 1),
        last_stride: int = 1,
        width: int = 64,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.last_stride = last_stride
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        chans = [width * 4 * 2**i for i in range(4)]
        in_ch = width
        for i, (name, n_modules) in enumerate(zip(self.stage_names[:3], modules_per_stage)):
            unit = PreActBottleneck(in_ch, chans[i], stride=1 if i == 0 else 2)
            mods = [
                AttentionModule(chans[i], depth=3 - i, gate="sigmoid" if j == 0 else "tanh")
                for j in range(n_modules)
            ]
            setattr(self, name, nn.Sequential(unit, *mods))
            in_ch = chans[i]
        self.layer4 = nn.Sequential(
            PreActBottleneck(in_ch, chans[3], stride=last_stride),
            PreActBottleneck(chans[3], chans[3]),
            PreActBottleneck(chans[3], chans[3]),
        )
        self.norm_out = nn.Sequential(nn.BatchNorm2d(chans[3]), nn.ReLU(inplace=True))
        self.stage_channels = chans
        self.out_channels = chans[3]
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn_(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> Caffe max-pool: ``(B, 3, H, W) -> (B, 64, H/4, W/4)``."""
        return _caffe_max_pool(self.relu(self.bn1(self.conv1(x))))

    def attention_masks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft masks of every attention module for ``x`` ``(B, 3, H, W)``, keyed
        ``"layerN.i"`` (block index in the stage), each ``(B, C, h, w)`` in (0, 1)
        (sigmoid gate) or (-1, 1) (tanh gate)."""
        masks: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for name in self.stage_names[:3]:
            for i, block in enumerate(getattr(self, name)):
                if isinstance(block, AttentionModule):
                    x, masks[f"{name}.{i}"] = block(x, return_mask=True)
                else:
                    x = block(x)
        return masks
