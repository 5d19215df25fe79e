"""``reidkit tune``: the validation split carved from the training identities, parameter
parsing, and whole sweeps (train per value, and train once / evaluate per value) on a tiny
fake Market folder with the engine's fake method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_fakes import fake_config, write_market_folder

from reidkit.cli import main
from reidkit.config import dump_config
from reidkit.data.records import ImageRecord, ReIDDataset
from reidkit.engine.tune import parse_sweep_param, validation_split

torch.set_num_threads(1)


def _dataset(num_ids=10, cams=3, per_cam=2, single_cam_ids=(9,)) -> ReIDDataset:
    train = []
    for pid in range(num_ids):
        for cam in range(1 if pid in single_cam_ids else cams):
            for k in range(per_cam):
                train.append(ImageRecord(f"/x/{pid:04d}_c{cam}_{k}.jpg", pid, cam))
    return ReIDDataset("fake", "/x", train, [], [])


def test_validation_split_holds_out_identities_and_splits_by_camera():
    ds = _dataset()
    split, info = validation_split(ds, num_ids=4, seed=3)
    held = {r.pid for r in split.query} | {r.pid for r in split.gallery}
    assert len(held) == 4
    originals = {r.path: r.pid for r in ds.train}
    train_orig = {originals[r.path] for r in split.train}
    assert not held & train_orig and len(train_orig) == 6  # disjoint, every other id trains
    assert sorted({r.pid for r in split.train}) == list(range(6))  # relabelled 0..N-1
    assert {r.path for r in split.train} | {r.path for r in (*split.query, *split.gallery)} == set(
        originals
    )
    # per held-out identity seen by several cameras: one query per camera, and each query has
    # a gallery image of its identity from another camera
    for pid in held:
        q = [r for r in split.query if r.pid == pid]
        g = [r for r in split.gallery if r.pid == pid]
        cams = {r.camid for r in ds.train if r.pid == pid}
        if len(cams) == 1:
            assert not q and len(g) == 2  # a distractor identity
            continue
        assert sorted(r.camid for r in q) == sorted(cams)
        for r in q:
            assert any(x.camid != r.camid for x in g)
    assert info["query_images"] == len(split.query) and info["val_ids"] == 4
    # deterministic by seed
    again, _ = validation_split(ds, num_ids=4, seed=3)
    assert [r.path for r in again.query] == [r.path for r in split.query]
    with pytest.raises(ValueError, match="between 1 and 9"):
        validation_split(ds, num_ids=10)
    with pytest.raises(ValueError, match="two cameras"):
        validation_split(_dataset(num_ids=3, single_cam_ids=(0, 1, 2)), num_ids=2)


def test_parse_sweep_param():
    assert parse_sweep_param("model.mgre.lam=0.1,0.5,1.0") == (
        "model.mgre.lam",
        ["0.1", "0.5", "1.0"],
    )
    assert parse_sweep_param("model.mgre.stages=[1],[2, 3]") == (
        "model.mgre.stages",
        ["[1]", "[2, 3]"],
    )
    assert parse_sweep_param("output_dir='a,b',c")[1] == ["'a,b'", "c"]
    for bad in ("model.mgre.lam", "=1,2", "a=1,,2", "a=1,1"):
        with pytest.raises(ValueError, match="--param"):
            parse_sweep_param(bad)


@pytest.fixture(scope="module")
def tune_config(tmp_path_factory) -> Path:
    root = write_market_folder(tmp_path_factory.mktemp("market"), num_ids=8, cams=2, per_cam=2)
    base = tmp_path_factory.mktemp("cfg")
    cfg = fake_config(root, base / "run", **{"solver.max_epochs": 1, "solver.warmup_epochs": 0})
    path = base / "cfg.yaml"
    dump_config(cfg, path)
    return path


def test_tune_sweeps_a_value_and_writes_table_plot_json(tune_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["tune", "-c", str(tune_config), "--param", "solver.lr=0.01,0.001", "--val-ids", "3"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| solver.lr | mAP | R1 | R5 | mINP |" in printed and "best mAP" in printed
    data = json.loads((out / "tune.json").read_text())
    assert [p["values"]["solver.lr"] for p in data["points"]] == ["0.01", "0.001"]
    assert data["split"]["val_ids"] == 3 and data["split"]["train_ids"] == 5
    for p in data["points"]:
        assert 0 <= p["metrics"]["mAP"] <= 1
        run_cfg = (Path(p["run"]) / "config.yaml").read_text()
        assert f"lr: {p['values']['solver.lr']}" in run_cfg
        # one evaluation, at the end, on the held-out split
        log = [json.loads(line) for line in (Path(p["run"]) / "log.jsonl").read_text().splitlines()]
        assert sum(e.get("type") == "eval" for e in log) == 1
    assert (out / "tune.png").stat().st_size > 1000 and (out / "tune.md").is_file()
    # a second sweep into the same folder is refused
    assert main([*argv, "--out", str(out), "--no-progress"]) == 1


def test_tune_eval_only_trains_once(tune_config, tmp_path):
    out = tmp_path / "sweep"
    argv = ["tune", "-c", str(tune_config), "--param", "test.metric=cosine,euclidean"]
    assert main([*argv, "--val-ids", "3", "--eval-only", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "tune.json").read_text())
    assert data["eval_only"] and len(data["points"]) == 2
    assert {p["run"] for p in data["points"]} == {str(out / "train")}
    assert sorted(p.name for p in out.iterdir()) == ["train", "tune.json", "tune.md", "tune.png"]


def test_tune_rejects_a_bad_value_before_training(tune_config, tmp_path, capsys):
    argv = ["tune", "-c", str(tune_config), "--param", "solver.lr=0.01,-1"]
    assert main([*argv, "--out", str(tmp_path / "s"), "--no-progress"]) == 1
    assert "solver.lr" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
