"""User errors, one item of issue 19 each (the CLI catalogue is tests/test_bad_inputs.py):
one-line messages, truncated images, disk full, stale partial files, run folders as
weights, synthetic presets on disk, string pids, override blame and hints, resume
messages and time, skipped-image counts, report numbers, the README snippet, packaging."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fakes import fake_config, write_market_folder
from PIL import Image

from reidkit.config import ConfigError, load_config
from reidkit.data.datasets import DatasetError, build_dataset
from reidkit.data.images import check_image, find_bad_images
from reidkit.engine import train
from reidkit.engine.checkpoint import (
    atomic_save,
    clean_stale_tmp,
    load_checkpoint,
    resolve_weights,
)
from reidkit.engine.log import read_jsonl
from reidkit.errors import DiskFullError, MissingExtraError, one_line, require_extra

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_market_folder(tmp_path_factory.mktemp("market"))


# ------------------------------------------------------------------ one line
def test_one_line_keeps_the_original_message_of_a_worker_error():
    from reidkit.data.loader import CorruptImageError

    wrapped = CorruptImageError(
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1, in f\n    raise X\n'
        "reidkit.data.loader.CorruptImageError: /d/a.jpg: cannot read image (OSError: bad); "
        "set data.skip_corrupt=true to skip unreadable images\n"
    )
    assert one_line(wrapped) == (
        "/d/a.jpg: cannot read image (OSError: bad); set data.skip_corrupt=true to skip "
        "unreadable images"
    )
    assert one_line(ValueError("a\n  b\n")) == "a; b"
    err = OSError(errno.ENOSPC, "No space left on device", "/x/metrics.json")
    assert one_line(err).startswith("No space left on device: /x/metrics.json (free some")


def test_missing_extra_names_the_pip_extra():
    with pytest.raises(MissingExtraError, match=r"needs no_such_module_xyz.*reidkit\[faiss\]"):
        require_extra("faiss", "the index", modules=("no_such_module_xyz",))
    require_extra("plot", "figures")  # matplotlib is a core dependency


def test_gallery_index_without_faiss(monkeypatch):
    from reidkit.retrieval import GalleryIndex

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r"needs faiss.*pip install 'reidkit\[faiss\]'"):
        GalleryIndex(8, kind="ivf")


# ------------------------------------------------------------------ configs
def test_override_errors_blame_the_override_and_hint_the_syntax(tmp_path):
    base = REPO / "configs" / "synth" / "bot.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(base, ["solver.lr.x=1"])
    msg = str(info.value)
    assert "'solver.lr' is a single value" in msg and str(base) not in msg
    with pytest.raises(ConfigError) as info:
        load_config(base, ["solver.foo.x=1"])
    assert "[set in override solver.foo.x=1]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(base, ["solver.milestones=4,5"])
    msg = str(info.value)
    assert "solver.milestones=[4,5]" in msg and "\n" not in msg
    # dict-valued fields still take keys (they are not "single values")
    cfg = load_config(base, ["model.non_local_layers.layer2=[1]"])
    assert cfg.model.non_local_layers["layer2"] == [1]


def test_run_folder_is_a_config(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("solver:\n  lr: 0.5\n")
    assert load_config(tmp_path / "run").solver.lr == 0.5
    with pytest.raises(ConfigError, match="folder without config.yaml"):
        load_config(tmp_path)


# ------------------------------------------------------------------ images
def _jpeg(path: Path, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((32, 16, 3)) * 255).astype(np.uint8)).save(path, quality=90)
    return path.read_bytes()


def test_start_up_check_catches_truncated_files_cheaply(tmp_path):
    data = _jpeg(tmp_path / "ok.jpg")
    cases = {
        "half.jpg": (data[: len(data) // 2], "truncated"),
        "no_eoi.jpg": (data[:-2], "truncated"),
        "padded.jpg": (data + b"\x00" * 64, None),  # some cameras pad after EOI: fine
        "text.jpg": (b"not an image at all", "not a recognised image format"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        got = check_image(str(tmp_path / name))
        assert (got is None) if reason is None else (reason in got), (name, got)
    png = tmp_path / "a.png"
    Image.new("RGB", (16, 32), (9, 9, 9)).save(png)
    assert check_image(str(png)) is None
    png.write_bytes(png.read_bytes()[:-12])  # no IEND chunk
    assert "truncated" in check_image(str(png))
    # damage in the middle of the scan keeps the end marker: only decoding (--verify) sees it
    mid = bytearray(data)
    sos = mid.index(b"\xff\xda")
    mid[sos + 2 : sos + 14] = b"\xff" * 12
    (tmp_path / "mid.jpg").write_bytes(bytes(mid))
    assert check_image(str(tmp_path / "mid.jpg")) is None
    assert "corrupt image" in check_image(str(tmp_path / "mid.jpg"), verify=True)
    bad = find_bad_images([str(tmp_path / n) for n in ("ok.jpg", "half.jpg", "padded.jpg")])
    assert [Path(b.path).name for b in bad] == ["half.jpg"]


# ------------------------------------------------------------------ checkpoints
def test_disk_full_names_the_file_and_space_and_keeps_the_previous(tmp_path, monkeypatch):
    import reidkit.engine.checkpoint as ckpt

    target = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(ckpt, "open", lambda p, m="r": Full(real_open(p, m)), raising=False)
    with pytest.raises(DiskFullError) as info:
        atomic_save({"epoch": 2, "w": torch.zeros(1000)}, target)
    msg = str(info.value)
    assert str(target) in msg and "No space left on device" in msg and "bytes" in msg
    assert "free" in msg and "the previous last.pt is intact" in msg
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_clean_stale_tmp_removes_dead_writers_files_only(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)  # fmt: skip
    dead = int(proc.stdout)  # that process has exited
    stale = tmp_path / f".best.pt.tmp-{dead}"
    stale.write_bytes(b"partial")
    live = tmp_path / f".last.pt.tmp-{os.getppid()}"  # a running process (pytest's parent)
    live.write_bytes(b"being written")
    assert clean_stale_tmp(tmp_path) == [stale]
    assert live.exists()


def test_resolve_weights_accepts_run_folders(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"x")
    assert resolve_weights(tmp_path / "run") == ckpt / "last.pt"
    (ckpt / "best.pt").write_bytes(b"x")
    assert resolve_weights(tmp_path / "run") == ckpt / "best.pt"
    assert resolve_weights(ckpt) == ckpt / "best.pt"
    with pytest.raises(FileNotFoundError, match="without checkpoints/best.pt"):
        resolve_weights(tmp_path)


def test_safetensors_garbage_is_a_value_error(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"w\.safetensors: not a valid \.safetensors file"):
        load_checkpoint(bad)


# ------------------------------------------------------------------ datasets
def test_synth_finds_the_preset_on_disk(tmp_path):
    write_market_folder(tmp_path / "m")
    market = tmp_path / "m" / "Market-1501-v15.09.15"
    with pytest.raises(DatasetError, match="no synthetic set under"):
        build_dataset("synth", tmp_path)
    shutil.copytree(market, tmp_path / "synth-tiny")
    ds = build_dataset("synth", tmp_path)  # the only one there
    assert ds.dataset_dir.endswith("synth-tiny")
    assert build_dataset("synth", tmp_path / "synth-tiny").dataset_dir.endswith("synth-tiny")
    with pytest.raises(DatasetError, match=r"preset 'small' not found.*presets on disk: tiny"):
        build_dataset("synth", tmp_path, preset="small")
    shutil.copytree(market, tmp_path / "synth-small")
    with pytest.raises(DatasetError, match=r"2 synthetic sets .*synth-small, synth-tiny"):
        build_dataset("synth", tmp_path)


def test_unreadable_image_message_is_one_line(tmp_path):
    write_market_folder(tmp_path)
    img = next((tmp_path / "Market-1501-v15.09.15" / "query").iterdir())
    img.write_bytes(img.read_bytes()[:-30])
    with pytest.raises(DatasetError) as info:
        build_dataset("market1501", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and img.name in msg and "truncated" in msg
    assert "data.skip_corrupt=true" in msg


# ------------------------------------------------------------------ metrics
def test_evaluate_rank_string_pids_is_a_value_error():
    from reidkit.metrics.rank import evaluate_rank

    with pytest.raises(ValueError, match=r"q_pids: labels must be integers.*'a'"):
        evaluate_rank(np.ones((2, 3)), ["a", "b"], ["a", "b", "c"], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"g_camids: labels must be integers"):
        evaluate_rank(np.ones((2, 3)), [1, 2], [1, 2, 3], [0, 0], np.array(["c1", "c2", "c3"]))


def test_percentages_round_half_up_everywhere():
    from reidkit.metrics.rank import evaluate_rank
    from reidkit.metrics.table import format_metrics_table, format_percent

    assert format_percent(0.0625) == "6.25" and format_percent(0.0625, 1) == "6.3"
    assert format_percent(0.00125) == "0.13" and format_percent(1 / 3) == "33.33"
    # 16 queries; only query 0 finds its match within rank 5 (at rank 3): R5 = 6.25 %
    dist = 1 + 0.01 * torch.arange(20, dtype=torch.float32).repeat(16, 1)
    dist[torch.arange(16), torch.arange(16)] = 10.0  # the matches come last ...
    dist[0, 0] = 1.025  # ... except query 0's
    g_pids = torch.cat([torch.arange(16), torch.arange(100, 104)])
    res = evaluate_rank(dist, torch.arange(16), g_pids, torch.zeros(16), torch.ones(20))
    assert res.rank(5) == 1 / 16
    assert "| 0.00 | 6.25 | 6.25 |" in format_metrics_table({"x": res})  # not 6.2


# ------------------------------------------------------------------ training
def test_resume_messages_and_cumulative_train_time(data_root, tmp_path, capsys):
    cfg = fake_config(data_root, tmp_path / "run", **{"solver.max_epochs": 2})
    train(cfg, stop_after_epochs=1, progress=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["train_time_s"] = 1000.0  # as if the first session had trained for 1000 s
    atomic_save(state, last)
    capsys.readouterr()
    train(cfg, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "resuming" in out and "at epoch 2/2" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_time_s"] >= 1000.0  # both sessions count
    # resuming a finished run says so, and nothing else
    train(cfg, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "already finished all 2 epochs" in out and "resuming" not in out


def test_resume_keeps_the_original_config(data_root, tmp_path, capsys):
    """A resume with other settings no longer overwrites config.yaml before the checkpoint
    is read; the original settings stay in a file the warning names."""
    cfg = fake_config(data_root, tmp_path / "run", **{"solver.max_epochs": 2})
    train(cfg, stop_after_epochs=1, progress=False)
    capsys.readouterr()
    changed = fake_config(data_root, tmp_path / "run", **{"solver.max_epochs": 2, "solver.lr": 0.5})
    train(changed, resume=True, progress=False)
    kept = tmp_path / "run" / "config.before_resume_002.yaml"
    assert f"-c {kept} to keep the original settings" in capsys.readouterr().out
    assert load_config(kept).solver.lr == 0.01
    assert load_config(tmp_path / "run").solver.lr == 0.5


def test_resume_does_not_need_the_imagenet_file(data_root, tmp_path):
    from reidkit.engine.trainer import Trainer
    from reidkit.models import PretrainedLoadError

    cfg = fake_config(data_root, tmp_path / "run", **{"model.pretrained": "gone/resnet50.pth"})
    with pytest.raises(PretrainedLoadError, match=r"model.pretrained: .*gone/resnet50.pth"):
        Trainer(cfg)._check_folder()  # before any data is read
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"x")
    Trainer(cfg, resume=True)._check_folder()  # the checkpoint has every weight


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 2 : sos + 14] = b"\xff" * 12
    path.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
@pytest.mark.parametrize("workers", [0, 1])
def test_skip_corrupt_counts_in_log_and_metrics(tmp_path, workers, capsys):
    root = write_market_folder(tmp_path / "data")
    train_dir = root / "Market-1501-v15.09.15" / "bounding_box_train"
    for path in sorted(train_dir.glob("0001_*.jpg")):
        _damage(path)  # passes the start-up check, fails when decoded: skipped in batches
    zero = sorted(train_dir.glob("0002_*.jpg"))[0]
    zero.write_bytes(b"")  # caught by the start-up check: dropped from the dataset
    over = {"data.skip_corrupt": True, "data.num_workers": workers, "solver.max_epochs": 1}
    with pytest.warns(UserWarning):
        run = train(fake_config(root, tmp_path / "run", **over), progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [r for r in read_jsonl(run / "log.jsonl") if r["type"] == "skipped_images"]
    stages = {r["stage"]: r for r in rows}
    assert stages["dataset check"]["count"] == 1
    assert stages["dataset check"]["images"][0]["path"] == str(zero)
    assert stages["training"]["count"] >= 2  # both damaged images of pid 1, each sampled once
    assert metrics["skipped_images"] == 1 + stages["training"]["count"]
    out = capsys.readouterr().out
    assert "data.skip_corrupt: skipped 1 unreadable image(s)" in out
    assert f"{metrics['skipped_images']} unreadable image(s) were skipped" in out


# ------------------------------------------------------------------ CLI: run folders
def test_eval_and_report_take_run_folders(data_root, tmp_path, capsys):
    from reidkit.cli import main

    run = train(
        fake_config(data_root, tmp_path / "run", **{"solver.max_epochs": 1}), progress=False
    )
    capsys.readouterr()
    assert main(["eval", "-c", str(run), "--weights", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"weights: {run / 'checkpoints' / 'best.pt'} (best mAP checkpoint of {run})" in out
    assert "| market1501 |" in out  # the row label is the dataset, as in train
    assert main(["eval", "-c", str(run)]) == 0  # -c run folder: its weights by default
    assert "best.pt" in capsys.readouterr().out
    assert main(["report", "-c", str(run), "--out", str(tmp_path / "rep"), "--queries", "2",
                 "--topk", "3", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "weights:" in out and (tmp_path / "rep" / "report.html").is_file()


# ------------------------------------------------------------------ docs, packaging
def test_errors_doc_lists_every_catalogue_row():
    from test_bad_inputs import ROWS

    doc = (REPO / "docs" / "errors.md").read_text()
    missing = [row.id for row in ROWS if f"`{row.id}`" not in doc]
    assert not missing, f"docs/errors.md lacks {missing}"


def test_pyproject_license_needs_no_deprecation_banner(tmp_path):
    """setuptools builds the metadata without its `project.license` table warning (which
    `make` printed twice, once per build hook)."""
    proc = subprocess.run(
        [sys.executable, "-c",
         f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r})"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "deprecat" not in (proc.stderr + proc.stdout).lower()
    meta = next(tmp_path.glob("*.dist-info")) / "METADATA"
    text = meta.read_text()
    assert "License-Expression: Apache-2.0" in text
    assert re.search(r"^Requires-Dist: matplotlib", text, re.M)  # plots are core


@pytest.mark.slow
def test_readme_python_snippet_runs_as_printed(tmp_path):
    """The README's Python API block, verbatim, in a fresh folder: the synthetic set it
    trains on is generated on first use (and says so)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generating the 'tiny' synthetic set" in proc.stdout
    assert "mAP" in proc.stdout and (tmp_path / "data" / "synth-tiny" / "meta.json").is_file()
