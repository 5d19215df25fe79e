"""The interface every reidkit backbone offers, so that any method can use any backbone.

It is the interface of :class:`reidkit.models.resnet.ResNet`:

- ``out_channels``: channels ``C`` of the final map; ``stage_channels``: channels of the four
  stage outputs; ``stage_names``: the attribute names of the four stages. Each stage is an
  ``nn.Sequential`` of blocks, so a method can insert blocks after block ``i`` or copy a
  stage into several branches.
- ``stem(x)``: everything before the first stage.
- ``run_stage(name, x)``: one stage, followed by its *tail* where the published network
  has one (:meth:`Backbone.stage_tail`: OSNet-AIN's transition after ``conv2``/``conv3``,
  the final BN-ReLU of the pre-activation Residual Attention Network, ViT's final
  LayerNorm). A method that copies a stage into branches copies its tail with it.
- ``forward_stages(x)``: the four stage outputs as ``(B, C_i, h_i, w_i)`` maps;
  ``forward(x)``: the final map ``(B, out_channels, h, w)``.
- ``last_stride`` (1 or 2): stride of the last stage where the network has one; 2 gives
  the ImageNet network.

Loading weights (:func:`reidkit.models.load_pretrained`) asks the backbone three things:
:meth:`Backbone.adapt_pretrained_state` (rename or resize a file's tensors into this
model's layout, e.g. the ``pretrainedmodels`` SE-Net layout or a ViT position embedding of
another grid), ``pretrained_ignore_prefixes`` (classifier keys of the file that the
backbone deliberately lacks; reported at info level) and ``new_layer_prefixes`` (keys of
layers the published network does not have, so their absence from a file is expected).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """Base class of the backbones in :mod:`reidkit.models.backbones`.

    Subclasses set ``stage_names``, ``stage_channels``, ``out_channels`` and ``last_stride``
    in ``__init__``, register the four stages under ``stage_names`` and implement
    :meth:`stem`. ``stage_tails`` maps a stage name to the attribute holding the module
    applied after that stage (if any).
    """

    stage_names: tuple[str, str, str, str] = ("layer1", "layer2", "layer3", "layer4")
    stage_channels: list[int]
    out_channels: int
    last_stride: int = 2
    stage_tails: dict[str, str] = {}
    # "map": stem/run_stage pass (B, C, H, W) maps; "tokens": (B, N, C) sequences (ViT)
    stage_format: str = "map"
    pretrained_ignore_prefixes: tuple[str, ...] = ("fc.",)
    new_layer_prefixes: tuple[str, ...] = ()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> input of the first stage."""
        raise NotImplementedError

    def stage_tail(self, name: str) -> nn.Module | None:
        """The module applied after stage ``name`` (``None`` if the stage has none)."""
        attr = self.stage_tails.get(name)
        return None if attr is None else getattr(self, attr)

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Apply stage ``name`` (one of ``stage_names``) and its tail."""
        if name not in self.stage_names:
            raise ValueError(f"unknown stage '{name}' (stages: {', '.join(self.stage_names)})")
        x = getattr(self, name)(x)
        tail = self.stage_tail(name)
        return x if tail is None else tail(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> the four stage output maps ``[(B, C_i, h_i, w_i)]``."""
        x = self.stem(x)
        outs = []
        for name in self.stage_names:
            x = self.run_stage(name, x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> final map ``(B, out_channels, h, w)``."""
        x = self.stem(x)
        for name in self.stage_names:
            x = self.run_stage(name, x)
        return x

    def adapt_pretrained_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bring a weights file's tensors into this model's layout (default: unchanged)."""
        return state
