"""Every shipped config validates, and its method builds (no typo hides behind a default)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reidkit.config import load_config
from reidkit.methods import build_method

# configs/fewshot/ holds few-shot configs (a different schema), tested in test_fewshot.py
CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml")
    if p.parent.name != "fewshot"
)


def test_configs_exist() -> None:
    assert len(CONFIGS) > 50
    assert {p.parent.name for p in CONFIGS} >= {"bot", "agw", "cama", "cge", "synth"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads_and_builds(path: Path) -> None:
    cfg = load_config(path, ["model.pretrained=null"])
    assert cfg.data.batch_size % cfg.data.num_instances == 0 or cfg.data.sampler != "pk"
    torch.manual_seed(0)
    model = build_method(cfg, num_classes=5)
    assert sum(p.numel() for p in model.parameters()) > 0
