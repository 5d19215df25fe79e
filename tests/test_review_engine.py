"""Review fixes in the training engine."""

from __future__ import annotations

import torch
from engine_fakes import fake_config, write_market_folder

from reidkit.engine import train
from reidkit.engine.log import read_jsonl


def test_resume_with_changed_schedule_warns_and_is_logged(tmp_path, capsys):
    """Resuming with other training settings than the checkpoint's (e.g. forgetting an
    override like solver.max_epochs) used to continue silently with a different schedule."""
    torch.set_num_threads(1)
    root = write_market_folder(tmp_path / "market")
    base = {"solver.max_epochs": 2, "test.eval_period": 5}
    train(fake_config(root, tmp_path / "run", **base), stop_after_epochs=1, progress=False)
    capsys.readouterr()
    # same settings (plus a harmless change of the evaluation period): no warning
    same = fake_config(root, tmp_path / "run", **{**base, "test.eval_period": 1})
    train(same, resume=True, stop_after_epochs=1, progress=False)
    assert "differs from the checkpoint" not in capsys.readouterr().out

    train(fake_config(root, tmp_path / "run2", **base), stop_after_epochs=1, progress=False)
    capsys.readouterr()
    changed = fake_config(root, tmp_path / "run2", **{**base, "solver.lr": 0.5})
    train(changed, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "differs from the checkpoint" in out
    assert "solver.lr: 0.01 -> 0.5" in out
    rows = [r for r in read_jsonl(tmp_path / "run2" / "log.jsonl") if r["type"] == "config_changed"]
    assert len(rows) == 1 and rows[0]["changes"] == {"solver.lr": [0.01, 0.5]}
