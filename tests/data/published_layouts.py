"""Expected state-dict tables (key -> shape) of the published backbone definitions.

Written from the published architecture definitions (facts, not their code) and shared
with nothing in ``reidkit``:

- ResNeSt: ``zhanghang1989/ResNeSt`` ``resnest/torch/models/{resnet,splat,resnest}.py``
  (deep stem ``conv1.{0,1,3,4,6}``, ``SplAtConv2d`` ``conv/bn0/fc1/bn1/fc2`` with
  ``inter = max(in * radix // 4, 32)``, avg-down ``downsample.{1,2}``, ``fc``);
- SE-ResNet/ResNeXt: timm ``resnet.py`` ``Bottleneck(attn_layer='se')`` (``se.fc1/fc2``,
  ``fc``) and Cadene ``pretrainedmodels`` ``senet.py`` (``layer0.conv1/bn1``,
  ``se_module.fc1/fc2``, ``last_linear``);
- OSNet / OSNet-AIN: torchreid ``osnet.py`` / ``osnet_ain.py`` (``conv1.conv/bn``,
  ``conv2a``..``conv2d`` or ``conv2.{t}.layers.{j}``, ``gate.fc1/fc2``, ``conv3``, ``IN``,
  transitions ``conv2.2`` / ``pool2``, ``conv5``, ``fc.0/fc.1``, ``classifier``);
- ViT/DeiT: timm ``vision_transformer.py`` (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``, ``head``);
- Residual Attention Network: the authors' ``Attention-56-deploy.prototxt`` /
  ``Attention-92-deploy.prototxt`` unit by unit, written in reidkit's key names (only Caffe
  weights exist): pre-activation units ``norm1 conv1 norm2 conv2 norm3 conv3 [shortcut]``,
  attention modules ``pre trunk mask_down mask_skip mask_up mask_out post``.

``PUBLISHED_PARAMS`` are the parameter counts (millions, with the ImageNet classifier)
published for these models: timm model cards (ResNeSt, SE-Nets, ViT/DeiT), torchreid's
model zoo (OSNet, with its 512-d ``fc`` embedding but without an ImageNet classifier, at
its reported precision) and the Residual Attention Network paper (Attention-56 only; see
``docs/backbones.md`` for Attention-92).
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]
Table = dict[str, Shape]

PUBLISHED_PARAMS: dict[str, tuple[float, float]] = {
    # name: (millions, tolerance in millions)
    "resnest50": (27.5, 0.05),
    "resnest101": (48.3, 0.05),
    "resnest200": (70.2, 0.05),
    "resnest269": (110.9, 0.05),
    "se_resnet50": (28.1, 0.05),
    "se_resnet101": (49.3, 0.05),
    "se_resnext50_32x4d": (27.6, 0.05),
    "se_resnext101_32x4d": (49.0, 0.05),
    "vit_base_patch16": (86.6, 0.05),
    "vit_small_patch16": (22.1, 0.05),
    "deit_small_patch16": (22.1, 0.05),
    "osnet_x1_0": (2.2, 0.05),
    "osnet_x0_75": (1.3, 0.05),
    "osnet_x0_5": (0.6, 0.05),
    "osnet_x0_25": (0.2, 0.05),
    "osnet_ain_x1_0": (2.2, 0.05),
    "resattnet56": (31.9, 0.15),
}

# keys of the published classifier / embedding heads, which the backbones do not have
HEAD_PREFIXES = ("fc.", "last_linear.", "classifier.", "head.")


def _conv(t: Table, key: str, out: int, inp: int, k: int, bias: bool = False) -> None:
    t[f"{key}.weight"] = (out, inp, k, k)
    if bias:
        t[f"{key}.bias"] = (out,)


def _bn(t: Table, key: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t[f"{key}.{name}"] = (c,)
    t[f"{key}.num_batches_tracked"] = ()


def _affine_in(t: Table, key: str, c: int) -> None:
    """``InstanceNorm2d(c, affine=True)``: weight and bias, no running statistics."""
    t[f"{key}.weight"] = (c,)
    t[f"{key}.bias"] = (c,)


def _linear(t: Table, key: str, out: int, inp: int) -> None:
    t[f"{key}.weight"] = (out, inp)
    t[f"{key}.bias"] = (out,)


def count_params(table: Table) -> int:
    """Learnable parameters of a table (BN running statistics excluded)."""
    return sum(
        math.prod(shape)
        for key, shape in table.items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


# ----------------------------------------------------------------------------- ResNeSt
RESNEST = {
    "resnest50": ((3, 4, 6, 3), 32),
    "resnest101": ((3, 4, 23, 3), 64),
    "resnest200": ((3, 24, 36, 3), 64),
    "resnest269": ((3, 30, 48, 8), 64),
}


def resnest_table(name: str, width: int = 64, num_classes: int = 1000) -> Table:
    layers, stem = RESNEST[name]
    radix = 2
    t: Table = {}
    _conv(t, "conv1.0", stem, 3, 3)
    _bn(t, "conv1.1", stem)
    _conv(t, "conv1.3", stem, stem, 3)
    _bn(t, "conv1.4", stem)
    _conv(t, "conv1.6", 2 * stem, stem, 3)
    _bn(t, "bn1", 2 * stem)
    inplanes = 2 * stem
    for i, n in enumerate(layers):
        planes = width * 2**i
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            gw = planes  # bottleneck_width 64, cardinality 1
            _conv(t, f"{p}.conv1", gw, inplanes, 1)
            _bn(t, f"{p}.bn1", gw)
            # SplAtConv2d: grouped conv with groups = cardinality * radix
            _conv(t, f"{p}.conv2.conv", gw * radix, gw // radix, 3)
            _bn(t, f"{p}.conv2.bn0", gw * radix)
            inter = max(gw * radix // 4, 32)
            _conv(t, f"{p}.conv2.fc1", inter, gw, 1, bias=True)
            _bn(t, f"{p}.conv2.bn1", inter)
            _conv(t, f"{p}.conv2.fc2", gw * radix, inter, 1, bias=True)
            _conv(t, f"{p}.conv3", planes * 4, gw, 1)
            _bn(t, f"{p}.bn3", planes * 4)
            if b == 0 and (i > 0 or inplanes != planes * 4):
                _conv(t, f"{p}.downsample.1", planes * 4, inplanes, 1)
                _bn(t, f"{p}.downsample.2", planes * 4)
            inplanes = planes * 4
    _linear(t, "fc", num_classes, inplanes)
    return t


# ----------------------------------------------------------------------------- SE-Nets
SENET = {
    "se_resnet50": ((3, 4, 6, 3), 1, 64),
    "se_resnet101": ((3, 4, 23, 3), 1, 64),
    "se_resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "se_resnext101_32x4d": ((3, 4, 23, 3), 32, 4),
}


def senet_table(name: str, layout: str = "timm", width: int = 64, num_classes: int = 1000) -> Table:
    """``layout``: ``"timm"`` or ``"pretrainedmodels"`` (Cadene)."""
    layers, groups, base_width = SENET[name]
    cadene = layout == "pretrainedmodels"
    se = "se_module" if cadene else "se"
    t: Table = {}
    _conv(t, "layer0.conv1" if cadene else "conv1", width, 3, 7)
    _bn(t, "layer0.bn1" if cadene else "bn1", width)
    inplanes = width
    for i, n in enumerate(layers):
        planes = width * 2**i
        mid = int(math.floor(planes * base_width / 64) * groups)
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            _conv(t, f"{p}.conv1", mid, inplanes, 1)
            _bn(t, f"{p}.bn1", mid)
            _conv(t, f"{p}.conv2", mid, mid // groups, 3)
            _bn(t, f"{p}.bn2", mid)
            _conv(t, f"{p}.conv3", planes * 4, mid, 1)
            _bn(t, f"{p}.bn3", planes * 4)
            _conv(t, f"{p}.{se}.fc1", planes * 4 // 16, planes * 4, 1, bias=True)
            _conv(t, f"{p}.{se}.fc2", planes * 4, planes * 4 // 16, 1, bias=True)
            if b == 0 and (i > 0 or inplanes != planes * 4):
                _conv(t, f"{p}.downsample.0", planes * 4, inplanes, 1)
                _bn(t, f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    _linear(t, "last_linear" if cadene else "fc", num_classes, inplanes)
    return t


# ----------------------------------------------------------------------------- OSNet
OSNET = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_75": (48, 192, 288, 384),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
    "osnet_ain_x1_0": (64, 256, 384, 512),
}
# OSNet-AIN: OSBlockINin (True) / OSBlock (False) per stage
AIN_BLOCKS = ((True, True), (False, True), (True, False))


def _lite(t: Table, key: str, c: int) -> None:
    _conv(t, f"{key}.conv1", c, c, 1)
    t[f"{key}.conv2.weight"] = (c, 1, 3, 3)  # depth-wise
    _bn(t, f"{key}.bn", c)


def _osblock(t: Table, p: str, cin: int, cout: int, ain: bool, inin: bool) -> None:
    mid = cout // 4
    _conv(t, f"{p}.conv1.conv", mid, cin, 1)
    _bn(t, f"{p}.conv1.bn", mid)
    if ain:
        for s in range(4):
            for j in range(s + 1):
                _lite(t, f"{p}.conv2.{s}.layers.{j}", mid)
    else:
        _lite(t, f"{p}.conv2a", mid)
        for name, depth in (("conv2b", 2), ("conv2c", 3), ("conv2d", 4)):
            for j in range(depth):
                _lite(t, f"{p}.{name}.{j}", mid)
    _conv(t, f"{p}.gate.fc1", mid // 16, mid, 1, bias=True)
    _conv(t, f"{p}.gate.fc2", mid, mid // 16, 1, bias=True)
    _conv(t, f"{p}.conv3.conv", cout, mid, 1)
    if inin:
        _affine_in(t, f"{p}.IN", cout)
    else:
        _bn(t, f"{p}.conv3.bn", cout)
    if cin != cout:
        _conv(t, f"{p}.downsample.conv", cout, cin, 1)
        _bn(t, f"{p}.downsample.bn", cout)


def osnet_table(name: str, num_classes: int | None = None) -> Table:
    """torchreid layout; ``fc`` (512-d embedding) always, ``classifier`` if ``num_classes``."""
    c = OSNET[name]
    ain = name.startswith("osnet_ain")
    t: Table = {}
    _conv(t, "conv1.conv", c[0], 3, 7)
    if ain:
        _affine_in(t, "conv1.bn", c[0])
    else:
        _bn(t, "conv1.bn", c[0])
    for s in range(3):
        stage = f"conv{s + 2}"
        kinds = AIN_BLOCKS[s] if ain else (False, False)
        for b, inin in enumerate(kinds):
            _osblock(t, f"{stage}.{b}", c[s] if b == 0 else c[s + 1], c[s + 1], ain, inin)
        if s < 2:
            trans = f"pool{s + 2}.0" if ain else f"{stage}.2.0"
            _conv(t, f"{trans}.conv", c[s + 1], c[s + 1], 1)
            _bn(t, f"{trans}.bn", c[s + 1])
    _conv(t, "conv5.conv", c[3], c[3], 1)
    _bn(t, "conv5.bn", c[3])
    _linear(t, "fc.0", 512, c[3])
    _bn(t, "fc.1", 512)
    if num_classes:
        _linear(t, "classifier", num_classes, 512)
    return t


# ----------------------------------------------------------------------------- ViT
VIT = {
    "vit_base_patch16": (768, 12, 4),
    "vit_small_patch16": (384, 12, 4),
    "deit_small_patch16": (384, 12, 4),
}


def vit_table(
    dim: int, depth: int, mlp_ratio: int = 4, grid: tuple[int, int] = (14, 14), num_classes=1000
) -> Table:
    """timm layout; ``grid`` is the patch grid of ``pos_embed`` (14x14 at 224)."""
    t: Table = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid[0] * grid[1], dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        t[f"{p}.norm1.weight"] = t[f"{p}.norm1.bias"] = (dim,)
        _linear(t, f"{p}.attn.qkv", 3 * dim, dim)
        _linear(t, f"{p}.attn.proj", dim, dim)
        t[f"{p}.norm2.weight"] = t[f"{p}.norm2.bias"] = (dim,)
        _linear(t, f"{p}.mlp.fc1", mlp_ratio * dim, dim)
        _linear(t, f"{p}.mlp.fc2", dim, mlp_ratio * dim)
    t["norm.weight"] = t["norm.bias"] = (dim,)
    if num_classes:
        _linear(t, "head", num_classes, dim)
    return t


# ----------------------------------------------------------------------------- RAN
RESATTNET = {"resattnet56": (1, 1, 1), "resattnet92": (1, 2, 3)}


def _unit(t: Table, p: str, cin: int, cout: int, stride: int = 1) -> None:
    """Caffe ``*/branch1`` (+ ``*/branch2`` projection) pre-activation unit."""
    mid = cout // 4
    _bn(t, f"{p}.norm1", cin)  # the "<input>/bn" layer that pre-activates this unit
    _conv(t, f"{p}.conv1", mid, cin, 1)
    _bn(t, f"{p}.norm2", mid)
    _conv(t, f"{p}.conv2", mid, mid, 3)
    _bn(t, f"{p}.norm3", mid)
    _conv(t, f"{p}.conv3", cout, mid, 1)
    if cin != cout or stride != 1:
        _conv(t, f"{p}.shortcut", cout, cin, 1)


def _attention(t: Table, p: str, c: int, depth: int) -> None:
    _unit(t, f"{p}.pre", c, c)  # trunk/res1
    for j in range(2):  # trunk/res2, res3
        _unit(t, f"{p}.trunk.{j}", c, c)
    for level in range(depth):  # down_sample/res{level}_*
        for j in range(2 if level == depth - 1 else 1):
            _unit(t, f"{p}.mask_down.{level}.{j}", c, c)
    for level in range(depth - 1):
        _unit(t, f"{p}.mask_skip.{level}.0", c, c)  # skip/res{level}
        _unit(t, f"{p}.mask_up.{level}.0", c, c)  # up_sample/res{level}_1
    _bn(t, f"{p}.mask_out.0", c)  # interp_1/bn
    _conv(t, f"{p}.mask_out.2", c, c, 1)  # linear_1
    _bn(t, f"{p}.mask_out.3", c)  # linear_1/bn
    _conv(t, f"{p}.mask_out.5", c, c, 1)  # linear_2
    _unit(t, f"{p}.post", c, c)  # branch1 after the fusion


def resattnet_table(name: str, num_classes: int = 1000) -> Table:
    modules = RESATTNET[name]
    t: Table = {}
    _conv(t, "conv1", 64, 3, 7)
    _bn(t, "bn1", 64)
    chans = (256, 512, 1024, 2048)
    cin = 64
    for s in range(3):
        _unit(t, f"layer{s + 1}.0", cin, chans[s], stride=1 if s == 0 else 2)  # pre_res_N
        for m in range(modules[s]):
            _attention(t, f"layer{s + 1}.{m + 1}", chans[s], depth=3 - s)
        cin = chans[s]
    for j in range(3):  # post_res_4_1..3
        _unit(t, f"layer4.{j}", cin if j == 0 else 2048, 2048, stride=2 if j == 0 else 1)
    _bn(t, "norm_out.0", 2048)  # post_res_4_3/bn
    _linear(t, "fc", num_classes, 2048)
    return t


def published_table(name: str) -> Table:
    """The published table of a registered backbone name (with its classifier/head)."""
    if name in RESNEST:
        return resnest_table(name)
    if name in SENET:
        return senet_table(name)
    if name in OSNET:
        return osnet_table(name)
    if name in VIT:
        dim, depth, ratio = VIT[name]
        return vit_table(dim, depth, ratio)
    if name in RESATTNET:
        return resattnet_table(name)
    raise KeyError(name)
