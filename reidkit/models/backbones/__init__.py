"""Backbone zoo: one architecture per file, built by name.

:func:`register_backbone` registers a factory ``factory(last_stride=..., **options) ->
nn.Module``; :func:`create_backbone` builds one (random init) and
:func:`reidkit.models.build_backbone` builds one and loads ``pretrained`` weights. Every
backbone has the interface of :class:`~reidkit.models.backbones.base.Backbone`
(``out_channels``, ``stage_channels``, ``stage_names``, ``stem``, ``run_stage``,
``forward_stages``, ``forward``).

=====================  ==============================================  =====================
name                   network                                         key layout
=====================  ==============================================  =====================
resnest50/101/200/269  ResNeSt, radix 2, deep stem, avg-down           published ResNeSt/timm
se_resnet50/101        SE-ResNet                                       timm (+ pretrainedmodels)
se_resnext50/101_32x4d SE-ResNeXt 32x4d                                timm (+ pretrainedmodels)
resattnet56/92         Residual Attention Network (Wang et al. 2017)   reidkit (Caffe-faithful)
osnet_x1_0 .. x0_25    OSNet                                           torchreid
osnet_ain_x1_0         OSNet-AIN                                       torchreid
vit_base_patch16       ViT-B/16                                        timm
vit_small_patch16      ViT-S/16                                        timm
deit_small_patch16     DeiT-S/16                                       timm / DeiT
resnet12               ResNet-12 (CAN's few-shot backbone, 84x84)      CAN code
=====================  ==============================================  =====================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from reidkit.models.backbones.base import Backbone
from reidkit.models.backbones.osnet import OSNET_CHANNELS, OSNet
from reidkit.models.backbones.resattnet import RESATTNET_MODULES, ResidualAttentionNet
from reidkit.models.backbones.resnest import RESNEST_CONFIGS, ResNeSt
from reidkit.models.backbones.senet import (
    SENET_CONFIGS,
    SENet,
    convert_pretrainedmodels_senet,
)
from reidkit.models.backbones.vit import VIT_CONFIGS, VisionTransformer, resize_pos_embed

__all__ = [
    "Backbone",
    "BackboneEntry",
    "available",
    "backbone_entry",
    "convert_pretrainedmodels_senet",
    "create_backbone",
    "register_backbone",
    "resize_pos_embed",
]

BackboneFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its ``factory`` and a one-line ``description``."""

    name: str
    factory: BackboneFactory
    description: str = ""

    def options(self) -> list[str]:
        """Keyword options the factory accepts (besides ``last_stride``)."""
        params = inspect.signature(self.factory).parameters
        return [p for p in params if p != "last_stride"]


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str, description: str = ""
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(last_stride: int = 1, **options) -> nn.Module`` as
    ``name``. Re-registering a name is an error."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone '{name}' is already registered")
        _REGISTRY[name] = BackboneEntry(name, factory, description)
        return factory

    return decorator


def available() -> list[str]:
    """Registered backbone names (sorted)."""
    return sorted(_REGISTRY)


def backbone_entry(name: str) -> BackboneEntry:
    """The registry entry of ``name`` (``KeyError`` if unknown)."""
    return _REGISTRY[name]


def create_backbone(name: str, last_stride: int = 1, **options) -> nn.Module:
    """Build registered backbone ``name`` with random weights.

    Raises:
        KeyError: unknown name.
        ValueError: an option the backbone does not take (the message lists its options).
    """
    entry = _REGISTRY[name]
    accepted = entry.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"model.backbone_options: backbone '{name}' has no option(s) {unknown} "
            f"(its options: {', '.join(accepted) or 'none'})"
        )
    return entry.factory(last_stride=last_stride, **options)


# ----------------------------------------------------------------------------- registry
def _register_resnest(name: str) -> None:
    layers, stem_width = RESNEST_CONFIGS[name]

    def factory(last_stride: int = 1, width: int = 64) -> ResNeSt:
        return ResNeSt(layers, stem_width=stem_width, last_stride=last_stride, width=width)

    depth = name.removeprefix("resnest")
    register_backbone(name, f"ResNeSt-{depth} (split attention, radix 2)")(factory)


def _register_senet(name: str) -> None:
    layers, cardinality, base_width = SENET_CONFIGS[name]

    def factory(last_stride: int = 1, caffe_style: bool | None = None, width: int = 64) -> SENet:
        return SENet(
            layers,
            cardinality=cardinality,
            base_width=base_width,
            last_stride=last_stride,
            caffe_style=caffe_style,
            width=width,
        )

    kind = "SE-ResNeXt 32x4d" if cardinality > 1 else "SE-ResNet"
    register_backbone(name, f"{kind}, {sum(layers) * 3 + 2} layers")(factory)


def _register_resattnet(name: str) -> None:
    modules = RESATTNET_MODULES[name]

    def factory(last_stride: int = 1, width: int = 64) -> ResidualAttentionNet:
        return ResidualAttentionNet(modules, last_stride=last_stride, width=width)

    register_backbone(name, f"Residual Attention Network {name.removeprefix('resattnet')}")(factory)


def _register_osnet(name: str) -> None:
    channels = OSNET_CHANNELS[name]
    ain = name.startswith("osnet_ain")

    def factory(last_stride: int = 1) -> OSNet:
        return OSNet(channels, ain=ain, last_stride=last_stride)

    register_backbone(name, ("OSNet-AIN " if ain else "OSNet ") + name.rsplit("_x", 1)[1])(factory)


def _register_vit(name: str) -> None:
    dim, depth, heads, mlp_ratio = VIT_CONFIGS[name]

    def factory(
        last_stride: int = 1,
        img_size: tuple[int, int] = (256, 128),
        stride: int = 16,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        pos_embed_interp: str = "bicubic",
        embed_dim: int = dim,
        depth: int = depth,
        num_heads: int = heads,
    ) -> VisionTransformer:
        return VisionTransformer(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            img_size=img_size,
            stride=stride,
            drop_path_rate=drop_path_rate,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            pos_embed_interp=pos_embed_interp,
            last_stride=last_stride,
        )

    register_backbone(name, f"{name.split('_')[0].upper()} ({dim}-d, {depth} blocks)")(factory)


for _name in RESNEST_CONFIGS:
    _register_resnest(_name)
for _name in SENET_CONFIGS:
    _register_senet(_name)
for _name in RESATTNET_MODULES:
    _register_resattnet(_name)
for _name in OSNET_CHANNELS:
    _register_osnet(_name)
for _name in VIT_CONFIGS:
    _register_vit(_name)


@register_backbone("resnet12", "ResNet-12 (CAN's few-shot backbone: 84x84 -> 512 x 6 x 6)")
def _resnet12(last_stride: int = 2, width: int = 64) -> nn.Module:
    # the network has no last stride to change: every block halves the map (84 -> 6)
    from reidkit.models.backbones.resnet12 import resnet12

    return resnet12(width=width)
