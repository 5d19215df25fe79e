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

from reidkit.models.backbone import Backbone, init_conv_bn_

__all__ = ["Backbone", "init_conv_bn_"]
