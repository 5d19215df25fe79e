"""Exact resume: 4 epochs in one go == 2 epochs + resume for 2 more; atomic checkpoints;
a non-finite loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from engine_fakes import FakeMethod, fake_config, write_market_folder

import reidkit.methods.base as method_base
from reidkit.engine import NonFiniteLossError, train
from reidkit.engine.checkpoint import atomic_save, get_rng_state, load_checkpoint, set_rng_state
from reidkit.engine.log import read_jsonl


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_market_folder(tmp_path_factory.mktemp("market"))


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        # classifier-only warm phase + center loss with its own optimiser + per-iter cosine
        # schedule + gradient clipping
        {
            "solver.classifier_warm_epochs": 1,
            "solver.max_epochs": 3,
            "loss.center_weight": 0.01,
            "solver.schedule_per_iter": True,
            "solver.scheduler": "cosine",
            "solver.grad_clip": 1.0,
        },
    ],
)
def test_resume_is_exact(data_root, tmp_path, extra):
    torch.set_num_threads(1)
    full = train(fake_config(data_root, tmp_path / "full", **extra), progress=False)
    part_cfg = fake_config(data_root, tmp_path / "part", **extra)
    train(part_cfg, stop_after_epochs=2, progress=False)
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "part" / "metrics.json").exists()  # interrupted: no final metrics
    train(part_cfg, resume=True, progress=False)

    a, b = _params(full), _params(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{k} differs after resume")
    ca = load_checkpoint(full / "checkpoints" / "last.pt")
    cb = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ca["global_step"] == cb["global_step"] == 16
    assert ca["best"] == cb["best"]
    rows = read_jsonl(tmp_path / "part" / "log.jsonl")
    assert [r["type"] for r in rows].count("resume") == 1
    assert (tmp_path / "part" / "metrics.json").is_file()


def test_existing_run_needs_resume_or_overwrite(data_root, tmp_path):
    cfg = fake_config(data_root, tmp_path / "run", **{"solver.max_epochs": 1})
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, progress=False)
    train(cfg, overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(fake_config(data_root, tmp_path / "other"), resume=True, progress=False)


def test_atomic_save_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    real_fsync = os.fsync

    def crash(fd):  # the new file is partly written when the "power fails"
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(os, "fsync", real_fsync)

    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checkpoint_loads_weights_only_and_rng_roundtrip(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = get_rng_state()
    atomic_save({"rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    steps_before_nan = 4 * 2 + 3  # 2 epochs of 4 iterations, then 3rd iteration of epoch 3

    class NaNAfter(FakeMethod):
        def __init__(self, cfg, n):
            super().__init__(cfg, n)
            self.nan_at_step = steps_before_nan

    spec = method_base._METHODS["_engine_fake"]
    monkeypatch.setitem(method_base._METHODS, "_engine_fake", replace(spec, cls=NaNAfter))
    cfg = fake_config(data_root, tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "epoch 3/4" in msg and "iteration 3/4" in msg and "ce=nan" in msg and "triplet=" in msg
    assert "last.pt" in msg
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1  # written after epoch 2; never overwritten with NaN weights
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    rows = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert rows[-1]["type"] == "error"
