"""What every backbone offers the methods, and the surgery they do on it.

A :class:`Backbone` is a stem followed by named stages (``stage_names``, each an
``nn.Sequential`` of blocks). On top of ``forward(x) -> final map`` it gives:

- ``forward_stages(x)``: every stage's output map (MGRe reads all four);
- :meth:`Backbone.insert_blocks`: extra blocks run after given blocks of given stages
  (non-local blocks for AGW / TKP, interaction-aggregation blocks for IANet). They live
  in ``ModuleList`` s named ``<group>_<stage>`` (``nl_layer2``), one entry per listed block
  index in sorted order, so the original state-dict keys are untouched and a pretrained
  file still loads as is;
- :func:`split_backbone`: the shared trunk up to a block and ``n`` independent copies of
  the rest (CAMA copies ``layer4``, SCR ``layer3[1:]`` + ``layer4``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Backbone", "BackboneTail", "init_conv_bn_", "split_backbone", "parse_block_position"]


def init_conv_bn_(module: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> None:
    """The torchvision / timm ResNet init of every sub-module: He normal (fan-out) convs
    with zero bias, norm layers (BN, affine IN) at weight 1 and bias 0. Sub-modules whose
    name starts with one of ``skip_prefixes`` keep their own init (e.g. non-local blocks)."""
    for name, m in module.named_modules():
        if skip_prefixes and name.startswith(skip_prefixes):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Base class of every backbone (``ResNet`` and the zoo in ``models.backbones``).

    Subclasses set ``stage_names`` (attribute names of the stages, in order; each an
    ``nn.Sequential`` of blocks), ``stage_channels``, ``out_channels`` and ``last_stride``,
    and implement :meth:`stem`. ``stage_tails`` maps a stage name to the attribute of a
    module applied after that stage where the published network has one (OSNet-AIN's
    transitions, the Residual Attention Network's final BN-ReLU, ViT's final norm): a
    split copies it with its stage.

    Loading weights (:func:`reidkit.models.load_pretrained`) asks the backbone
    :meth:`adapt_pretrained_state` (rename / resize a file's tensors into this layout),
    ``pretrained_ignore_prefixes`` (classifier keys of the file the backbone lacks on
    purpose) and ``new_layer_prefixes`` (keys of layers the published network does not
    have, so their absence from a file is expected).
    """

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
    stage_channels: list[int]
    out_channels: int
    last_stride: int = 2
    stage_tails: dict[str, str] = {}
    # "map": stem / run_stage pass (B, C, H, W) maps; "tokens": (B, N, C) sequences (ViT)
    stage_format: str = "map"
    pretrained_ignore_prefixes: tuple[str, ...] = ("fc.",)
    new_layer_prefixes: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        # stage -> block index -> [(group attribute, entry)] run after that block
        self._inserted: dict[str, dict[int, list[tuple[str, int]]]] = {}
        self.inserted_groups: dict[str, dict[str, list[int]]] = {}

    # ---------------------------------------------------------------- forward
    def stem(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``(B, 3, H, W)`` -> input of the first stage."""
        raise NotImplementedError

    def stage_tail(self, name: str) -> nn.Module | None:
        """The module applied after stage ``name`` (``None`` if the stage has none)."""
        attr = self.stage_tails.get(name)
        return None if attr is None else getattr(self, attr)

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Apply stage ``name`` with the blocks inserted into it, then its tail."""
        if name not in self.stage_names:
            raise ValueError(f"unknown stage '{name}' (stages: {', '.join(self.stage_names)})")
        stage: nn.Module = getattr(self, name)
        inserted = self._inserted.get(name)
        if not inserted:
            x = stage(x)
        else:
            for i, block in enumerate(stage):
                x = block(x)
                for attr, j in inserted.get(i, ()):
                    x = getattr(self, attr)[j](x)
        tail = self.stage_tail(name)
        return x if tail is None else tail(x)

    def adapt_pretrained_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bring a weights file's tensors into this model's layout (default: unchanged)."""
        return state

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> the output map of every stage, in order."""
        x = self.stem(x)
        outs = []
        for name in self.stage_names:
            x = self.run_stage(name, x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, out_channels, h, w)``: the last stage's map."""
        x = self.stem(x)
        for name in self.stage_names:
            x = self.run_stage(name, x)
        return x

    # ---------------------------------------------------------------- surgery
    def insert_blocks(
        self,
        group: str,
        positions: Mapping[str, Any],
        make_block: Callable[[int], nn.Module] | None = None,
    ) -> None:
        """Insert blocks after given (0-based) blocks of given stages.

        Args:
            group: name of the group; the blocks live in ``<group>_<stage>`` ModuleLists.
            positions: ``{"layer2": [1, 3], "layer3": [1, 3, 5]}`` (with ``make_block``) or
                ``{"layer2": {3: module}}`` (explicit modules).
            make_block: ``channels -> module`` for list positions; called with the stage's
                output channels (the input of the inserted block).

        Raises ``ValueError`` naming the stage / index when a position does not exist or a
        group is inserted twice into a stage.
        """
        for stage, where in positions.items():
            if stage not in self.stage_names:
                raise ValueError(
                    f"{group} blocks: unknown stage '{stage}' (expected one of "
                    f"{', '.join(self.stage_names)})"
                )
            n_blocks = len(getattr(self, stage))
            if isinstance(where, Mapping):
                items = sorted((int(i), m) for i, m in where.items())
            else:
                if make_block is None:
                    raise ValueError(f"{group} blocks: give make_block for index lists")
                channels = self.stage_channels[self.stage_names.index(stage)]
                items = [(i, make_block(channels)) for i in sorted({int(i) for i in where})]
            bad = [i for i, _ in items if not 0 <= i < n_blocks]
            if bad:
                raise ValueError(
                    f"{group} blocks in {stage}: block indices {bad} out of range; {stage} has "
                    f"{n_blocks} blocks (valid 0..{n_blocks - 1})"
                )
            if not items:
                continue
            attr = f"{group}_{stage}"
            if hasattr(self, attr):
                raise ValueError(f"{group} blocks were already inserted into {stage}")
            setattr(self, attr, nn.ModuleList(m for _, m in items))
            slots = self._inserted.setdefault(stage, {})
            for j, (i, _) in enumerate(items):
                slots.setdefault(i, []).append((attr, j))
            self.inserted_groups.setdefault(group, {})[stage] = [i for i, _ in items]


def parse_block_position(backbone: Backbone, at: str) -> tuple[int, int]:
    """``"layer3.1"`` -> (stage index 2, block 1); ``"layer4"`` -> (3, 0)."""
    stage, _, block = at.partition(".")
    if stage not in backbone.stage_names:
        raise ValueError(
            f"split position '{at}': unknown stage '{stage}' (expected one of "
            f"{', '.join(backbone.stage_names)})"
        )
    s = backbone.stage_names.index(stage)
    b = int(block) if block else 0
    n_blocks = len(getattr(backbone, stage))
    if not 0 <= b < n_blocks:
        raise ValueError(f"split position '{at}': {stage} has blocks 0..{n_blocks - 1}")
    return s, b


class BackboneTail(nn.Module):
    """The part of a backbone after a split position: stages (or the rest of one) run in
    order. ``stages`` is a ModuleList of Sequentials."""

    def __init__(self, stages: list[nn.Module], out_channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def split_backbone(
    backbone: Backbone, at: str, num_branches: int
) -> tuple[Backbone, nn.ModuleList]:
    """Split ``backbone`` into a shared trunk and ``num_branches`` copies of the rest.

    Args:
        backbone: a :class:`Backbone` (pretrained weights already loaded, so every branch
            starts from the same weights).
        at: the first block of the branches: ``"layer4"`` (CAMA) or ``"layer3.1"`` (SCR).
        num_branches: number of deep copies.

    Returns:
        ``(trunk, branches)``: ``trunk`` is ``backbone`` itself with the blocks from ``at``
        on removed (its ``forward`` ends at the split, inserted blocks before it are kept);
        each branch maps the trunk's output to a final map. When ``at`` is a whole last
        stage the branch *is* that stage (``branches.i.<block>`` keys, as a plain copy).
    """
    if num_branches < 1:
        raise ValueError(f"split_backbone: num_branches must be >= 1, got {num_branches}")
    s, b = parse_block_position(backbone, at)
    names = backbone.stage_names
    for stage, slots in backbone._inserted.items():
        k = names.index(stage)
        late = [i for i in slots if k > s or (k == s and i >= b)]
        if late:
            raise ValueError(
                f"split_backbone at '{at}': blocks inserted after {stage} blocks {late} would "
                "be split off; insert them before the split point (or into the branches)"
            )
    if backbone.stage_format != "map":
        raise ValueError(
            f"split_backbone: {type(backbone).__name__} passes {backbone.stage_format} between "
            "stages; only map-based backbones can be split into branches"
        )
    tail: list[nn.Module] = []

    def take_tail(name: str) -> None:
        # a stage's tail (e.g. OSNet-AIN's transition) goes with the stage into the branch
        module = backbone.stage_tail(name)
        if module is not None:
            tail.append(module)
            setattr(backbone, backbone.stage_tails[name], nn.Identity())

    first = getattr(backbone, names[s])
    if b > 0:
        tail.append(nn.Sequential(*list(first)[b:]))
        setattr(backbone, names[s], nn.Sequential(*list(first)[:b]))
    else:
        tail.append(first)
        setattr(backbone, names[s], nn.Sequential())
    take_tail(names[s])
    for name in names[s + 1 :]:
        tail.append(getattr(backbone, name))
        setattr(backbone, name, nn.Sequential())
        take_tail(name)
    out_channels = backbone.out_channels
    trunk_channels = backbone.stage_channels[s - 1] if b == 0 and s > 0 else None
    if b > 0:
        trunk_channels = backbone.stage_channels[s]
    backbone.trunk_channels = trunk_channels
    if len(tail) == 1:
        template: nn.Module = tail[0]
    else:
        template = BackboneTail(tail, out_channels)
    branches = nn.ModuleList(copy.deepcopy(template) for _ in range(num_branches))
    return backbone, branches
