"""End to end on a tiny generated set: ``reidkit fewshot train`` + ``eval`` + exact resume,
and cached vs streamed evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reidkit.cli import main
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.log import read_jsonl
from reidkit.fewshot.config import load_fewshot_config
from reidkit.fewshot.datasets import load_fewshot_dataset
from reidkit.fewshot.engine import evaluate_fewshot, load_fewshot_weights, train_fewshot

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "synth_5w1s.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from reidkit.data.synth import generate

    root = tmp_path_factory.mktemp("fewshot")
    generate(
        root / "synth-tiny", preset="tiny", seed=0, workers=1, progress=False, height=32, width=16
    )
    return root


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.reid_options={preset: tiny}",
        "data.height=32",
        "data.width=16",
        "data.pad=2",
        "data.num_workers=0",
        f"output_dir={out}",
        "model.width=2",
        "episode.way=3",
        "episode.train_queries=2",
        "episode.test_queries=3",
        "episode.batch=2",
        "solver.lr_schedule=[[2, 0.05], [3, 0.005]]",
        "solver.episodes_per_epoch=4",
        "eval.episodes=12",
        "eval.batch=4",
        "eval.period=2",
        "eval.val_episodes=6",
        "log_period=1",
        *extra,
    ]


def test_train_resume_and_eval_end_to_end(data_root, tmp_path, capsys):
    torch.set_num_threads(1)
    full = tmp_path / "full"
    part = tmp_path / "part"
    assert (
        main(["fewshot", "train", "-c", str(CONFIG), *_overrides(data_root, full), "--no-progress"])
        == 0
    )
    assert (
        main(
            [
                "fewshot",
                "train",
                "-c",
                str(CONFIG),
                *_overrides(data_root, part),
                "--stop-after",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert load_checkpoint(part / "checkpoints" / "last.pt")["epoch"] == 0
    assert not (part / "metrics.json").exists()
    # an existing run is not silently overwritten
    assert (
        main(["fewshot", "train", "-c", str(CONFIG), *_overrides(data_root, part), "--no-progress"])
        == 1
    )
    assert "already holds a run" in capsys.readouterr().err
    assert (
        main(
            [
                "fewshot",
                "train",
                "-c",
                str(CONFIG),
                *_overrides(data_root, part),
                "--resume",
                "--no-progress",
            ]
        )
        == 0
    )

    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs after resume"
    assert a["best"] == b["best"] and a["best"]["epoch"] in (2, 3)
    assert (full / "checkpoints" / "best.pt").is_file()

    metrics = json.loads((full / "metrics.json").read_text())
    resumed = json.loads((part / "metrics.json").read_text())
    test = metrics["test"]
    timing = ("seconds",)
    assert {k: v for k, v in test.items() if k not in timing} == {
        k: v for k, v in resumed["test"].items() if k not in timing
    }
    assert test["episodes"] == 12 and test["way"] == 3 and 0 <= test["accuracy"] <= 100
    assert "transductive" in test and test["transductive"]["counts"] == [4, 8]
    rows = read_jsonl(full / "log.jsonl")
    kinds = [r["type"] for r in rows]
    assert kinds.count("train") == 6 and kinds.count("epoch") == 3 and "val" in kinds
    assert [r["lr"] for r in rows if r["type"] == "epoch"] == [0.05, 0.05, 0.005]

    assert "per_episode" not in test and (full / "test_episodes.npz").is_file()
    out = capsys.readouterr().out
    assert "CAN+T" in out
    assert (
        main(["fewshot", "eval", "-c", str(CONFIG), *_overrides(data_root, full), "--no-progress"])
        == 0
    )
    evaluated = json.loads((full / "eval_test.json").read_text())
    assert evaluated["accuracy"] == test["accuracy"]  # same weights, same seeded episodes
    assert "CAN" in capsys.readouterr().out
    # identical weights on identical episodes: a paired difference of exactly 0
    assert main(["fewshot", "compare", str(full), str(part)]) == 0
    out = capsys.readouterr().out
    assert "A - B  +0.00 +- 0.00 (paired, 12 episodes)" in out and "transductive" in out
    other = tmp_path / "other" / "e.json"
    args = [*_overrides(data_root, full), "eval.seed=5", "--out", str(other), "--no-progress"]
    assert main(["fewshot", "eval", "-c", str(CONFIG), *args]) == 0
    assert main(["fewshot", "compare", str(full), str(other.with_name("e_episodes.npz"))]) == 1
    assert "not the same episodes" in capsys.readouterr().err


def test_cached_and_streamed_evaluation_agree(data_root, tmp_path):
    torch.set_num_threads(1)
    cfg = load_fewshot_config(CONFIG, _overrides(data_root, tmp_path / "run", "eval.period=0"))
    train_fewshot(cfg, progress=False)
    model = load_fewshot_weights(cfg, tmp_path / "run" / "checkpoints" / "last.pt")
    split = load_fewshot_dataset(cfg.data).split("test")
    cached = evaluate_fewshot(model, split, cfg, progress=False)
    cfg.eval.feature_cache_mb = 0.0
    streamed = evaluate_fewshot(model, split, cfg, progress=False)
    assert cached["feature_cache"] and not streamed["feature_cache"]
    for key in ("accuracy", "ci95"):
        assert cached[key] == pytest.approx(streamed[key], abs=1e-9)
        assert cached["transductive"][key] == pytest.approx(streamed["transductive"][key], abs=1e-9)
    # the prototype baseline loads into a different network: a clear error
    cfg.model.name = "proto"
    with pytest.raises(ValueError, match=r"do not fit model.name=proto.*unexpected"):
        load_fewshot_weights(cfg, tmp_path / "run" / "checkpoints" / "last.pt")


def test_fewshot_command_is_registered(capsys):
    with pytest.raises(SystemExit):
        main(["fewshot", "train", "--help"])
    assert "episode.shot=5" in capsys.readouterr().out
    assert main(["fewshot", "eval", "-c", str(CONFIG), "output_dir=/nonexistent/run"]) == 1
    assert "no weights" in capsys.readouterr().err
