"""IANet receptive fields: which cells a position aggregates (the slides' visualisation).

For a spatial IA block with relation ``R (B, HW, HW)`` (:func:`reidkit.models.interaction.
spatial_relation`), the sub-relation map of a position ``p`` is the row ``R[b, p]``
reshaped to the ``(h, w)`` grid: how much ``p``'s output takes from every cell. The slides
show it over the image for a few positions (head, torso, legs...) to argue that SIA
adapts the receptive field to the body's pose and scale.

Note on the relation of the authors' code: ``R = softmax_q(L * A)`` applies a softmax to
products of two probabilities, which lie in [0, 1], so within a row
``max R / min R <= e``: the aggregation is a mild re-weighting of a global average. The
maps are therefore shown min-max normalised per position (``normalize="minmax"``), which
shows where the relation is larger; ``"max"`` keeps the absolute scale.

Entry points: :func:`relation_maps` (model + images -> maps of chosen positions),
:func:`sub_relation_maps` (from a relation tensor), :func:`relation_grid` /
:func:`save_relation_grid` (the picture: one row per image, the image with the positions
marked, then one overlay per position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from reidkit.models.interaction import IABlock, SpatialIA
from reidkit.viz.cam import eval_mode
from reidkit.viz.grad_cam import resolve_layer
from reidkit.viz.grid import IMAGENET_MEAN, IMAGENET_STD, image_grid, overlay_map, to_uint8_images

__all__ = [
    "DEFAULT_POSITIONS",
    "find_spatial_ia",
    "position_cells",
    "sub_relation_maps",
    "relation_maps",
    "relation_grid",
    "save_relation_grid",
]

#: Relative ``(y, x)`` positions (fractions of the image height / width): head, chest,
#: waist, knees on the centre line, and one off-centre (an arm or a bag).
DEFAULT_POSITIONS: tuple[tuple[float, float], ...] = (
    (0.12, 0.5),
    (0.32, 0.5),
    (0.5, 0.5),
    (0.75, 0.5),
    (0.4, 0.2),
)

_MARK_COLOURS = [
    (255, 255, 255),
    (255, 0, 255),
    (0, 255, 255),
    (255, 255, 0),
    (0, 255, 0),
    (255, 128, 0),
]


def find_spatial_ia(model: nn.Module) -> list[tuple[str, SpatialIA]]:
    """All spatial IA modules of ``model`` with their dotted names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SpatialIA)]


def _spatial_module(model: nn.Module, module: nn.Module | str | None) -> SpatialIA:
    if module is None:
        found = find_spatial_ia(model)
        if len(found) != 1:
            names = ", ".join(n for n, _ in found) or "none"
            raise ValueError(
                f"relation maps: pick the spatial IA block by name ({len(found)} found: {names})"
            )
        return found[0][1]
    mod = resolve_layer(model, module)
    if isinstance(mod, IABlock):
        if mod.spatial is None:
            raise ValueError("relation maps: this IA block has no spatial part (parts='cia')")
        return mod.spatial
    if not isinstance(mod, SpatialIA):
        raise ValueError(
            f"relation maps: {module!r} is a {type(mod).__name__}, not a SpatialIA or IABlock"
        )
    return mod


def position_cells(
    height: int, width: int, positions: Sequence[tuple[float, float]]
) -> list[tuple[int, int]]:
    """Relative ``(y, x)`` positions in [0, 1] -> ``(row, col)`` cells of an ``h x w`` grid."""
    cells = []
    for y, x in positions:
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise ValueError(f"relative positions must lie in [0, 1], got ({y}, {x})")
        cells.append((min(int(y * height), height - 1), min(int(x * width), width - 1)))
    return cells


def sub_relation_maps(
    relation: torch.Tensor, height: int, width: int, cells: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Rows of ``relation (B, HW, HW)`` for ``cells`` (``(row, col)``) as maps ``(B, P, h, w)``."""
    if relation.dim() != 3 or relation.shape[1:] != (height * width, height * width):
        raise ValueError(
            f"relation must be (B, {height * width}, {height * width}) for a {height}x{width} "
            f"grid, got {tuple(relation.shape)}"
        )
    for r, c in cells:
        if not (0 <= r < height and 0 <= c < width):
            raise ValueError(f"cell ({r}, {c}) outside the {height}x{width} grid")
    rows = torch.tensor([r * width + c for r, c in cells], device=relation.device, dtype=torch.long)
    return relation[:, rows].reshape(relation.shape[0], len(cells), height, width)


@torch.no_grad()
def relation_maps(
    model: nn.Module,
    images: torch.Tensor,
    module: nn.Module | str | None = None,
    positions: Sequence[tuple[float, float]] = DEFAULT_POSITIONS,
    cells: Sequence[tuple[int, int]] | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Sub-relation maps of a spatial IA block for chosen positions (eval mode).

    Args:
        model: a model containing :class:`~reidkit.models.interaction.SpatialIA` blocks.
        images: ``(B, 3, H, W)`` input batch.
        module: the block (a ``SpatialIA``, an ``IABlock``, or a dotted name); ``None``
            when the model has exactly one.
        positions: relative ``(y, x)`` positions in [0, 1] (ignored when ``cells`` given).
        cells: exact ``(row, col)`` cells of the block's grid.
        forward: how to run the model (default: ``model.encode({"images": images})`` for
            a reidkit method, else ``model(images)``); it only has to reach the block.

    Returns:
        ``(maps (B, P, h, w) float32, cells)``; each map sums to 1 over the grid.
    """
    block = _spatial_module(model, module)
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())

    handle = block.register_forward_pre_hook(hook)
    try:
        with eval_mode(model):
            if forward is not None:
                forward(images)
            elif hasattr(model, "encode"):  # a reidkit method: batches are dicts
                model.encode({"images": images})
            else:
                model(images)
    finally:
        handle.remove()
    if not captured:
        raise ValueError("relation maps: the forward never reached the chosen spatial IA block")
    x = captured[0]
    h, w = x.shape[-2:]
    chosen = list(cells) if cells is not None else position_cells(h, w, positions)
    return sub_relation_maps(block.relation(x), h, w, chosen), chosen


def _normalise(maps: np.ndarray, mode: str) -> np.ndarray:
    flat = maps.reshape(maps.shape[0], -1)
    if mode == "minmax":
        lo, hi = flat.min(axis=1), flat.max(axis=1)
    elif mode == "max":
        lo, hi = np.zeros(flat.shape[0], dtype=flat.dtype), flat.max(axis=1)
    else:
        raise ValueError(f"normalize must be 'minmax' or 'max', got {mode!r}")
    scale = np.where(hi > lo, hi - lo, 1.0)
    return (maps - lo[:, None, None]) / scale[:, None, None]


def _mark(
    image: np.ndarray, cells: Sequence[tuple[int, int]], grid: tuple[int, int], first: int = 0
) -> np.ndarray:
    """Outline each cell's pixel box on the image; position ``first + i`` picks the colour."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    ch, cw = image.shape[0] / grid[0], image.shape[1] / grid[1]
    for i, (r, c) in enumerate(cells):
        x0, y0 = int(c * cw), int(r * ch)
        box = (x0, y0, max(int((c + 1) * cw) - 1, x0 + 1), max(int((r + 1) * ch) - 1, y0 + 1))
        draw.rectangle(box, outline=(0, 0, 0), width=3)
        draw.rectangle(box, outline=_MARK_COLOURS[(first + i) % len(_MARK_COLOURS)], width=1)
    return np.asarray(pil)


def relation_grid(
    images: torch.Tensor | np.ndarray,
    maps: torch.Tensor,
    cells: Sequence[tuple[int, int]],
    *,
    normalize: str = "minmax",
    alpha: float = 0.55,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """The receptive-field picture: per image, the image with the positions outlined,
    then for each position its sub-relation map over the image (its cell outlined).

    ``images``: normalised ``(B, 3, H, W)`` (as the model saw them) or uint8
    ``(B, H, W, 3)``; ``maps (B, P, h, w)`` from :func:`relation_maps`.
    """
    if maps.dim() != 4 or maps.shape[1] != len(cells):
        raise ValueError(f"maps must be (B, {len(cells)}, h, w), got {tuple(maps.shape)}")
    pixels = to_uint8_images(images, mean, std) if isinstance(images, torch.Tensor) else images
    if len(pixels) != maps.shape[0]:
        raise ValueError(f"relation_grid: {len(pixels)} images but {maps.shape[0]} map sets")
    grid_hw = (maps.shape[-2], maps.shape[-1])
    values = maps.detach().float().cpu().numpy()
    rows = []
    for b, image in enumerate(pixels):
        shown = _normalise(values[b], normalize)
        row = [_mark(image, cells, grid_hw)]
        for i, cell in enumerate(cells):
            overlay = overlay_map(image, shown[i], alpha=alpha)
            row.append(_mark(overlay, [cell], grid_hw, first=i))
        rows.append(row)
    col_labels = ["image"] + [f"({r},{c})" for r, c in cells]
    return image_grid(rows, row_labels=row_labels, col_labels=col_labels)


def save_relation_grid(
    images: torch.Tensor | np.ndarray,
    maps: torch.Tensor,
    cells: Sequence[tuple[int, int]],
    path: str | Path,
    **kwargs: Any,
) -> Path:
    """:func:`relation_grid` written to ``path`` (PNG/JPEG; folders created)."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"save_relation_grid: {out}: expected a .png, .jpg or .webp file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    relation_grid(images, maps, cells, **kwargs).save(out)
    return out
