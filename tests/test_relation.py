"""IANet receptive-field maps: rows of R in row-major order, capture from a model, the
part-following property on a two-part input, positions, and the picture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reidkit.models import build_backbone
from reidkit.models.interaction import IABlock, SpatialIA, spatial_relation
from reidkit.viz.relation import (
    find_spatial_ia,
    position_cells,
    relation_grid,
    relation_maps,
    save_relation_grid,
    sub_relation_maps,
)

torch.set_num_threads(1)


def test_sub_relation_maps_are_rows_in_row_major_order() -> None:
    h, w = 3, 2
    rel = torch.arange(2 * 36, dtype=torch.float32).view(2, 6, 6)
    maps = sub_relation_maps(rel, h, w, [(0, 0), (2, 1), (1, 0)])
    assert maps.shape == (2, 3, 3, 2)
    for b in range(2):
        for i, (r, c) in enumerate([(0, 0), (2, 1), (1, 0)]):
            p = r * w + c
            for q in range(6):
                assert maps[b, i, q // w, q % w] == rel[b, p, q]
    with pytest.raises(ValueError, match="outside the 3x2 grid"):
        sub_relation_maps(rel, h, w, [(3, 0)])


def test_position_cells() -> None:
    assert position_cells(16, 8, [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.12, 0.5)]) == [
        (0, 0), (8, 4), (15, 7), (1, 4),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        position_cells(4, 4, [(1.5, 0.2)])


class TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.ia = IABlock(8, ax=2.0, ay=4.0)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ia(self.stem(x))).mean(dim=(2, 3))


def test_relation_maps_capture_the_block_input() -> None:
    model = TwoStage().train()
    images = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(1))
    maps, cells = relation_maps(model, images, "ia", positions=[(0.1, 0.5), (0.9, 0.2)])
    assert model.training  # mode restored
    with torch.no_grad():
        rel = spatial_relation(model.stem(images), 2.0, 4.0)
    assert cells == [(0, 2), (7, 0)] and maps.shape == (2, 2, 8, 4)
    torch.testing.assert_close(maps, sub_relation_maps(rel, 8, 4, cells))
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 2))
    # the same by module, by its SpatialIA, and found automatically
    for module in (model.ia, model.ia.spatial, "ia.spatial", None):
        torch.testing.assert_close(relation_maps(model, images, module, cells=cells)[0], maps)
    assert [n for n, _ in find_spatial_ia(model)] == ["ia.spatial"]
    with pytest.raises(ValueError, match="not a SpatialIA"):
        relation_maps(model, images, "stem")


def test_relation_follows_the_part_and_is_bounded() -> None:
    """A map with two 'parts' (orthogonal features, top and bottom): a top position relates
    more to the top part. And the code's double softmax bounds max/min within a row by e."""
    u, v = torch.zeros(16), torch.zeros(16)
    u[:8], v[8:] = 1.0, 1.0
    x = torch.empty(1, 16, 8, 4)
    x[0, :, :4] = 3 * u[:, None, None]
    x[0, :, 4:] = 3 * v[:, None, None]
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    rel = spatial_relation(x, ax=100.0, ay=100.0)  # flat prior: appearance decides
    maps = sub_relation_maps(rel, 8, 4, [(1, 1), (6, 2)])[0]
    assert maps[0, :4].sum() > maps[0, 4:].sum()
    assert maps[1, 4:].sum() > maps[1, :4].sum()
    ratio = rel.amax(dim=-1) / rel.amin(dim=-1)
    assert float(ratio.max()) <= math.e + 1e-4


def test_relation_grid_picture(tmp_path: Path) -> None:
    backbone = build_backbone("resnet18", width=8)
    model = nn.Sequential(
        backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool, backbone.layer1
    )
    model.add_module("ia", IABlock(8, ax=10.0, ay=20.0))
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    maps, cells = relation_maps(model, images)
    assert maps.shape == (2, 5, 16, 8)
    grid = relation_grid(images, maps, cells, row_labels=["a", "b"])
    assert grid.size[1] > 2 * 64 and grid.size[0] > 6 * 32
    path = save_relation_grid(images, maps, cells, tmp_path / "rel" / "relation.png")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # not blank
    with pytest.raises(ValueError, match="maps must be"):
        relation_grid(images, maps[:, :2], cells)
    with pytest.raises(ValueError, match="pick the spatial IA block"):
        relation_maps(nn.Sequential(IABlock(3), SpatialIA(3, 1.0, 1.0)), images)
