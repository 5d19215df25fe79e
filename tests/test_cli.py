"""The train / eval / demo / flops subcommands, run in-process through reidkit.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_fakes import fake_config, write_market_folder
from torch import nn

from reidkit.cli import main
from reidkit.config import dump_config

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_market_folder(tmp_path_factory.mktemp("market"))


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "r"
    cfg = fake_config(data_root, run, **{"solver.max_epochs": 2})
    cfg_path = run.parent / "cfg.yaml"
    dump_config(cfg, cfg_path)
    assert main(["train", "-c", str(cfg_path), "--no-progress"]) == 0
    return run


def test_train_writes_run_folder(trained_run, capsys):
    assert (trained_run / "config.yaml").is_file() and (trained_run / "log.jsonl").is_file()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics) >= {"final", "best"} and metrics["final"]["epoch"] == 2
    assert (trained_run / "checkpoints" / "best.pt").is_file()
    # a second plain train into the same folder is refused with a hint
    assert main(["train", "-c", str(trained_run / "config.yaml"), "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err


def test_bad_config_key_suggests(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "_base_: " + str(REPO / "configs" / "synth" / "bot.yaml") + "\nsolver:\n  lrr: 0.1\n"
    )
    assert main(["train", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "solver.lrr" in err and "did you mean 'solver.lr'" in err and str(bad) in err
    assert main(["train", "-c", str(REPO / "configs/synth/bot.yaml"), "solver.max_epoch=3"]) == 1
    assert "did you mean 'solver.max_epochs'" in capsys.readouterr().err
    # overrides may also follow option flags
    assert (
        main(["train", "-c", str(REPO / "configs/synth/bot.yaml"), "--no-progress", "solver.lrr=1"])
        == 1
    )
    assert "did you mean 'solver.lr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "-c", str(REPO / "configs/synth/bot.yaml"), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["train", "-c", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_eval_bad_weights_path(trained_run, tmp_path, capsys):
    cfg = str(trained_run / "config.yaml")
    assert main(["eval", "-c", cfg, "--weights", str(tmp_path / "nope.pt")]) == 1
    assert "--weights: file not found" in capsys.readouterr().err
    assert main(["eval", "-c", cfg, "--weights", str(tmp_path)]) == 1  # a folder, no run
    assert "without checkpoints/best.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["eval", "-c", cfg, "--weights", str(junk)]) == 1
    assert "weights_only" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    assert main(["eval", "-c", cfg, "--weights", str(wrong)]) == 1
    assert "do not match" in capsys.readouterr().err


def test_eval_prints_table_and_saves_features(trained_run, tmp_path, capsys):
    from reidkit.engine import FeatureSet

    out = tmp_path / "feats"
    res = tmp_path / "m.json"
    cfg = str(trained_run / "config.yaml")
    last = str(trained_run / "checkpoints" / "last.pt")
    assert (
        main(
            ["eval", "-c", cfg, "--weights", last, "--save-features", str(out), "--json", str(res)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "mAP" in text and "R1" in text
    final = json.loads((trained_run / "metrics.json").read_text())["final"]
    assert json.loads(res.read_text())["mAP"] == pytest.approx(final["mAP"], abs=1e-6)
    q, g = FeatureSet.load(out / "query"), FeatureSet.load(out / "gallery")
    assert len(q) == 8 and len(g) == 24 and q.paths[0].endswith(".jpg")
    assert main(["eval", "-c", cfg, "--weights", last, "--rerank"]) == 0
    assert "re-ranked" in capsys.readouterr().out


def _conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Independent count: multiply-adds of every Conv2d / Linear call, via forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k
        else:
            total += output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.encode({"images": x})
    for h in handles:
        h.remove()
    return total


def test_flops_resnet18(tmp_path, capsys):
    from reidkit.config import load_config
    from reidkit.methods import build_method

    over = ["data.height=64", "data.width=32", "device=cpu"]
    out = tmp_path / "flops.json"
    argv = ["flops", "-c", str(REPO / "configs/synth/bot.yaml"), *over]
    assert (
        main([*argv, "--batch-sizes", "1", "4", "--warmup", "0", "--runs", "1", "--json", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "GFLOPs" in text and "latency batch   4" in text
    info = json.loads(out.read_text())
    model = build_method(load_config(REPO / "configs/synth/bot.yaml", over), 751).eval()
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["flops"] == 2 * _conv_linear_macs(model, torch.zeros(1, 3, 64, 32))
    assert info["latency"]["4"]["ms_per_image"] > 0


def test_demo_on_tiny_preset(tmp_path, capsys):
    over = [
        "solver.max_epochs=1",
        "solver.iters_per_epoch=2",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
    ]
    argv = [
        "demo",
        "--config",
        str(REPO / "configs/synth/bot.yaml"),
        "--data-root",
        str(tmp_path / "data"),
    ]
    assert main([*argv, "--output-dir", str(tmp_path / "demo"), "--no-progress", *over]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "data" / "synth-tiny" / "meta.json").is_file()
    assert "run folder:" in out and "mAP" in out
    assert (tmp_path / "demo" / "metrics.json").is_file()
    report = tmp_path / "demo" / "report" / "report.html"
    assert f"ranking report: {report.resolve()}" in out and report.stat().st_size > 10_000
