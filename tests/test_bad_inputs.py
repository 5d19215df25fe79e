"""The bad-input catalogue: every mistake a user can make, through the real command line.

Each :class:`Row` of :data:`ROWS` runs ``python -m reidkit.cli ...`` in a subprocess, on
small trees generated once per module, and checks what the user sees:

* the exit status (1 for errors, 3 for a non-finite loss);
* exactly one line on stderr, without a traceback (``--debug`` shows it);
* that line names the file / field and the fix (the row's ``expect`` substrings);
* nothing already on disk changed: every file that existed before the command (the shared
  trees and the row's own inputs) has the same checksum after it.

Faults a user cannot type (a full disk, ``kill -9`` in the middle of a checkpoint write,
a missing optional package) are injected into the subprocess by
``tests/cli_site/sitecustomize.py``; the tiny ``_engine_fake`` method of
``tests/engine_fakes.py`` is registered there too, so training rows take a second.

Adding a case: append a ``Row`` (and a line to ``docs/errors.md``). Rows run in parallel
(a thread pool of subprocesses) so the whole file stays around a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from engine_fakes import write_market_folder
from safetensors.torch import save_file

from reidkit.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "cli_site"
# one more subprocess than cores: part of each one's start-up waits on the disk
WORKERS = 1 + max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
TIMEOUT = 300


# ------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Row:
    """One bad input.

    ``cmd`` and ``expect`` are templates: ``{repo}``, ``{data}`` (a Market-layout tree),
    ``{cfg}`` (a config of the fake method on it), ``{bot_cfg}`` (BoT / ResNet-18),
    ``{run}`` (a trained run folder), ``{files}`` (weights files, good and bad) and
    ``{tmp}`` (this row's own folder, also the working directory) are filled in.
    ``setup(trees, tmp)`` writes the row's inputs; ``check(trees, tmp, result)`` adds
    assertions; ``then`` is a command run after ``cmd`` (e.g. ``--resume``), which must
    succeed. ``expect=None``: no stderr line is expected (a killed process).
    """

    id: str
    cmd: str
    expect: tuple[str, ...] | None
    rc: int = 1
    setup: Callable[[Trees, Path], None] | None = None
    check: Callable[[Trees, Path, Result], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    then: str | None = None
    between: Callable[[Trees, Path], dict] | None = None  # state after cmd, before then
    heavy: bool = False  # trains: started first


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    then: subprocess.CompletedProcess | None
    changed: list[str]
    seconds: float
    between: dict = field(default_factory=dict)


@dataclass
class Trees:
    root: Path
    data: Path
    cfg: Path
    bot_cfg: Path
    run: Path
    files: Path

    def vars(self, tmp: Path) -> dict[str, str]:
        return {
            "repo": str(REPO),
            "data": str(self.data),
            "cfg": str(self.cfg),
            "bot_cfg": str(self.bot_cfg),
            "run": str(self.run),
            "files": str(self.files),
            "tmp": str(tmp),
        }


# --------------------------------------------------------------------- row helpers
def _write(rel: str, text: str) -> Callable[[Trees, Path], None]:
    def setup(trees: Trees, tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(**trees.vars(tmp)))

    return setup


def _data_copy(change: Callable[[Path], None]) -> Callable[[Trees, Path], None]:
    """A copy of the Market tree in ``{tmp}/data``, changed by ``change(dataset_folder)``."""

    def setup(trees: Trees, tmp: Path) -> None:
        shutil.copytree(trees.data, tmp / "data")
        change(tmp / "data" / "Market-1501-v15.09.15")

    return setup


TRAIN_IMAGE = "bounding_box_train/0002_c1s1_000005_00.jpg"


def _truncate(folder: Path) -> None:
    path = folder / TRAIN_IMAGE
    path.write_bytes(path.read_bytes()[:-40])  # cut inside the entropy-coded data


def _damage_middle(folder: Path) -> None:
    """Zeros over the middle of the scan: the end marker is intact (the cheap start-up
    check passes), decoding fails."""
    path = folder / TRAIN_IMAGE
    data = bytearray(path.read_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 2 : sos + 14] = b"\xff" * 12  # a broken scan header: decoding fails
    path.write_bytes(bytes(data))


def _empty_query(folder: Path) -> None:
    for p in (folder / "query").iterdir():
        p.unlink()


def _bad_name(folder: Path) -> None:
    shutil.copy(folder / TRAIN_IMAGE, folder / "query" / "frame1.jpg")


def _zero_byte(folder: Path) -> None:
    (folder / TRAIN_IMAGE).write_bytes(b"")


def _synth_sets(*names: str) -> Callable[[Trees, Path], None]:
    def setup(trees: Trees, tmp: Path) -> None:
        for name in names:
            shutil.copytree(trees.data / "Market-1501-v15.09.15", tmp / f"synth-{name}")

    return setup


def _evil_run(which: str, config: str) -> Callable[[Trees, Path], None]:
    """A run folder whose ``checkpoints/<which>`` is a pickle that would run code."""

    def setup(trees: Trees, tmp: Path) -> None:
        (tmp / "r" / "checkpoints").mkdir(parents=True)
        (tmp / "r" / "config.yaml").write_text(config.format(**trees.vars(tmp)))
        shutil.copy(trees.files / "evil.pt", tmp / "r" / "checkpoints" / which)

    return setup


def _no_marker(trees: Trees, tmp: Path, result: Result) -> None:
    assert not (trees.root / "PWNED").exists(), "a pickled payload was executed"


def _after_failure(trees: Trees, tmp: Path) -> dict:
    ckpt = tmp / "out" / "checkpoints"
    return {
        "partial": [p.name for p in ckpt.glob(".*.tmp-*")],
        "last_epoch": load_checkpoint(ckpt / "last.pt")["epoch"],
    }


def _disk_full_check(trees: Trees, tmp: Path, result: Result) -> None:
    assert result.between["partial"] == [], "the partial checkpoint was left behind"
    assert result.between["last_epoch"] == 0  # epoch 1's checkpoint, intact
    assert result.then is not None and "resuming" in result.then.stdout
    assert (tmp / "out" / "metrics.json").is_file()


def _kill_check(trees: Trees, tmp: Path, result: Result) -> None:
    assert result.rc == -9
    ckpt = tmp / "out" / "checkpoints"
    assert result.then is not None
    assert "removed" in result.then.stdout and ".last.pt.tmp-" in result.then.stdout
    assert not list(ckpt.glob(".*.tmp-*")), "--resume left the partial file of the killed run"
    # the resumed run ends exactly where an uninterrupted one does
    resumed = load_checkpoint(ckpt / "last.pt")
    reference = load_checkpoint(trees.run / "checkpoints" / "last.pt")
    assert resumed["global_step"] == reference["global_step"]
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)


def _corrupt_check(trees: Trees, tmp: Path, result: Result) -> None:
    assert (tmp / "out" / "checkpoints" / "last.pt").is_file() or "no checkpoint" in result.stderr


CGE_RUN = (
    "_base_: {repo}/configs/synth/cge_bot.yaml\ndata:\n  dataset: market1501\n  root: {data}\n"
)
FAKE_RUN = "_base_: {cfg}\n"
TRAIN = "train -c {cfg} --no-progress output_dir={tmp}/out"
BOT_TRAIN = "train -c {bot_cfg} --no-progress output_dir={tmp}/out"
HIDE_EXTRAS = "onnx,onnxruntime,faiss,scipy,h5py,matplotlib"

ROWS: list[Row] = [
    # ---------------------------------------------------------------- configs
    Row(
        "config-unknown-key-in-file",
        "train -c {tmp}/c.yaml",
        ("solver.max_epoch", "did you mean 'solver.max_epochs'", "{tmp}/c.yaml"),
        setup=_write("c.yaml", "_base_: {cfg}\nsolver:\n  max_epoch: 3\n"),
    ),
    Row(
        "config-unknown-key-override",
        "train -c {cfg} solver.lrr=0.1",
        ("solver.lrr", "did you mean 'solver.lr'", "override solver.lrr=0.1"),
    ),
    Row(
        "config-bad-type-in-file",
        "train -c {tmp}/c.yaml",
        ("'solver.lr'", "valid number", "'fast'", "[set in {tmp}/c.yaml]"),
        setup=_write("c.yaml", "_base_: {cfg}\nsolver:\n  lr: fast\n"),
    ),
    Row(
        "config-bad-type-override",
        "train -c {cfg} data.batch_size=many",
        ("'data.batch_size'", "valid integer", "override data.batch_size=many"),
    ),
    Row(
        "config-missing-base",
        "train -c {tmp}/c.yaml",
        ("config file not found", "{tmp}/nowhere.yaml", "a _base_ of {tmp}/c.yaml"),
        setup=_write("c.yaml", "_base_: nowhere.yaml\n"),
    ),
    Row(
        "config-circular-base",
        "train -c {tmp}/a.yaml",
        ("circular _base_", "{tmp}/a.yaml -> {tmp}/b.yaml -> {tmp}/a.yaml"),
        setup=lambda t, tmp: (
            _write("a.yaml", "_base_: b.yaml\n")(t, tmp),
            _write("b.yaml", "_base_: a.yaml\n")(t, tmp),
        ),
    ),
    Row(
        "config-not-found", "train -c {tmp}/missing.yaml", ("config file not found", "missing.yaml")
    ),
    Row(
        "config-invalid-yaml",
        "train -c {tmp}/c.yaml",
        ("{tmp}/c.yaml:3:1: not valid YAML", "expected ',' or ']'"),
        setup=_write("c.yaml", "solver:\n  milestones: [1, 2\n"),
    ),
    Row(
        "config-folder-without-config",
        "train -c {tmp}",
        ("{tmp} is a folder without config.yaml", "run folder"),
    ),
    Row(
        "override-without-equals",
        "train -c {cfg} solver.lr",
        ("override 'solver.lr'", "expected key=value"),
    ),
    Row(
        "override-key-inside-a-value",
        "train -c {cfg} solver.lr.x=1",
        ("override 'solver.lr.x=1'", "'solver.lr' is a single value", "write solver.lr=VALUE"),
    ),
    Row(
        "override-unknown-section-key",
        "train -c {cfg} solver.foo.x=1",
        ("unknown key 'solver.foo'", "[set in override solver.foo.x=1]"),
    ),
    Row(
        "override-list-without-brackets",
        "train -c {cfg} solver.milestones=4,5",
        ("'solver.milestones'", "solver.milestones=[4,5]"),
    ),
    Row(
        "override-bad-yaml-value",
        "train -c {cfg} solver.milestones=[4",
        ("override 'solver.milestones=[4'", "not valid YAML", "[a, b]"),
    ),
    Row(
        "unknown-method", "train -c {cfg} model.name=bott", ("model.name", "unknown method 'bott'")
    ),
    Row(
        "test-feature-of-another-method",
        "train -c {cfg} test.feature=global",
        ("test.feature='global'", "it offers: ", "pre_bn", "post_bn"),
    ),
    Row(
        "unknown-backbone",
        BOT_TRAIN + " model.backbone=resnet19",
        ("model.backbone", "unknown backbone 'resnet19'", "did you mean"),
        heavy=True,
    ),
    # ---------------------------------------------------------------- datasets
    Row(
        "dataset-root-missing",
        TRAIN + " data.root={tmp}/nowhere",
        ("market1501: dataset not found", "{tmp}/nowhere", "does not exist", "data.root"),
    ),
    Row(
        "dataset-empty-split",
        TRAIN + " data.root={tmp}/data",
        ("the query split is empty", "{tmp}/data"),
        setup=_data_copy(_empty_query),
    ),
    Row(
        "dataset-unparsable-names",
        TRAIN + " data.root={tmp}/data",
        ("do not match the expected pattern", "'frame1.jpg'", "0002_c1s1_000451_03.jpg"),
        setup=_data_copy(_bad_name),
    ),
    Row(
        "dataset-zero-byte-image",
        TRAIN + " data.root={tmp}/data",
        ("1 unreadable image", TRAIN_IMAGE, "empty file (0 bytes)", "data.skip_corrupt=true"),
        setup=_data_copy(_zero_byte),
    ),
    Row(
        "dataset-truncated-jpeg-at-start-up",
        TRAIN + " data.root={tmp}/data",
        ("1 unreadable image", TRAIN_IMAGE, "truncated", "data.skip_corrupt=true"),
        setup=_data_copy(_truncate),
    ),
    Row(
        "dataset-truncated-jpeg-stats",
        "datasets stats --name market1501 --root {tmp}/data",
        (TRAIN_IMAGE, "truncated", "--skip-corrupt"),
        setup=_data_copy(_truncate),
    ),
    Row(
        "dataset-damaged-jpeg-verify",
        "datasets stats --name market1501 --root {tmp}/data --verify",
        (TRAIN_IMAGE, "corrupt image", "--skip-corrupt"),
        setup=_data_copy(_damage_middle),
    ),
    Row(
        "dataset-damaged-jpeg-in-training",
        TRAIN + " data.root={tmp}/data data.num_workers=1",
        (TRAIN_IMAGE, "cannot read image", "data.skip_corrupt=true", "(epoch 1, iteration"),
        setup=_data_copy(_damage_middle),
        check=_corrupt_check,
        heavy=True,
    ),
    Row(
        "dataset-unknown-name",
        "datasets stats --name market1510 --root {data}",
        ("unknown dataset 'market1510'", "did you mean 'market1501'"),
    ),
    Row(
        "synth-none-on-disk",
        "datasets stats --name synth --root {tmp}",
        ("no synthetic set under data root", "reidkit synth --preset tiny --out {tmp}/synth-tiny"),
    ),
    Row(
        "synth-several-on-disk",
        "datasets stats --name synth --root {tmp}",
        ("2 synthetic sets", "synth-a, synth-b", "--option preset=NAME"),
        setup=_synth_sets("a", "b"),
    ),
    Row(
        "synth-preset-not-on-disk",
        "datasets stats --name synth --root {tmp} --option preset=small",
        ("preset 'small' not found", "presets on disk: a", "reidkit synth --preset small"),
        setup=_synth_sets("a"),
    ),
    # ---------------------------------------------------------------- keypoint files
    Row(
        "keypoints-file-missing",
        TRAIN + " data.keypoints={tmp}/kp.json",
        ("cannot read keypoint file {tmp}/kp.json", "No such file"),
    ),
    Row(
        "keypoints-invalid-json",
        "datasets stats --name market1501 --root {data} --option keypoints={tmp}/kp.json",
        ("{tmp}/kp.json", "JSON"),
        setup=_write("kp.json", "{{bad json"),
    ),
    Row(
        "keypoints-wrong-row-count",
        "datasets stats --name market1501 --root {data} --option keypoints={tmp}/kp.json",
        ("{tmp}/kp.json", "17"),
        setup=_write("kp.json", '{{"' + TRAIN_IMAGE + '": [[1, 2, 2], [3, 4, 2]]}}'),
    ),
    Row(
        "keypoints-match-no-image",
        "datasets stats --name market1501 --root {data} --option keypoints={tmp}/kp.json",
        ("{tmp}/kp.json", "other.jpg"),
        setup=_write("kp.json", '{{"other.jpg": ' + str([[1.0, 2.0, 2]] * 17) + "}}"),
    ),
    # ---------------------------------------------------------------- weights
    Row(
        "pretrained-missing",
        "train -c {repo}/configs/bot/market1501.yaml data.root={data}",
        (
            "model.pretrained",
            "pretrained/resnet50.pth",
            "(relative to {tmp})",
            "model.pretrained=null",
        ),
    ),
    Row(
        "pretrained-truncated",
        BOT_TRAIN + " model.pretrained={files}/truncated.pth",
        ("model.pretrained", "{files}/truncated.pth", "corrupt or truncated"),
    ),
    Row(
        "pretrained-wrong-architecture",
        BOT_TRAIN + " model.pretrained={files}/resnet18_w8.pth",
        ("model.pretrained", "resnet18_w8.pth", "wrong shape", "model.backbone"),
        heavy=True,
    ),
    Row(
        "pretrained-pickled-code",
        BOT_TRAIN + " model.pretrained={files}/evil.pth",
        ("model.pretrained", "evil.pth", "pickled Python code", "posix.mkdir"),
        check=_no_marker,
    ),
    Row(
        "pretrained-garbage-safetensors",
        BOT_TRAIN + " model.pretrained={files}/garbage.safetensors",
        ("model.pretrained", "garbage.safetensors", "not a valid .safetensors"),
    ),
    Row(
        "eval-pickled-code",
        "eval -c {run} --weights {files}/evil.pt",
        ("{files}/evil.pt", "weights_only", "pickled Python code"),
        check=_no_marker,
    ),
    Row(
        "eval-garbage-safetensors",
        "eval -c {run} --weights {files}/garbage.safetensors",
        ("garbage.safetensors", "not a valid .safetensors file"),
    ),
    Row(
        "eval-wrong-shape-safetensors",
        "eval -c {run} --weights {files}/wrong_shape.safetensors",
        ("wrong_shape.safetensors", "do not match", "other shapes", "-c RUN_FOLDER"),
    ),
    Row(
        "eval-wrong-architecture",
        "eval -c {run} --weights {files}/resnet18_w8.pth",
        ("resnet18_w8.pth", "do not match model '_engine_fake'", "missing"),
    ),
    Row(
        "eval-weights-not-found",
        "eval -c {run} --weights {tmp}/nope.pt",
        ("--weights: file not found", "{tmp}/nope.pt", "run folder"),
    ),
    Row(
        "eval-weights-folder-without-checkpoints",
        "eval -c {run} --weights {tmp}",
        ("--weights", "{tmp} is a folder without checkpoints/best.pt"),
    ),
    Row(
        "eval-yaml-without-weights",
        "eval -c {cfg}",
        ("--weights is required", "{cfg}", "run folder as -c"),
    ),
    Row("eval-occlude-out-of-range", "eval -c {run} --occlude 2", ("--occlude", "[0, 1]")),
    Row(
        "eval-json-over-config",
        "eval -c {run} --json {run}/config.yaml",
        ("--json", "is an input", "outputs never overwrite inputs"),
    ),
    Row(
        "report-pickled-code",
        "report -c {run} --weights {files}/evil.pt --out {tmp}/rep",
        ("{files}/evil.pt", "pickled Python code"),
        check=_no_marker,
    ),
    Row(
        "report-garbage-safetensors",
        "report -c {run} --weights {files}/garbage.safetensors --out {tmp}/rep",
        ("garbage.safetensors", "not a valid .safetensors file"),
    ),
    Row(
        "export-pickled-code",
        "export -c {run} --weights {files}/evil.pt --out {tmp}/m.onnx",
        ("{files}/evil.pt", "pickled Python code"),
        check=_no_marker,
    ),
    Row(
        "export-out-over-weights",
        "export -c {run} --weights {tmp}/w.pt --out {tmp}/w.pt",
        ("--out {tmp}/w.pt is an input", "choose another output path"),
        setup=lambda t, tmp: shutil.copy(t.run / "checkpoints" / "best.pt", tmp / "w.pt"),
    ),
    Row(
        "resume-pickled-checkpoint",
        "train -c {cfg} output_dir={tmp}/r --resume --no-progress",
        ("{tmp}/r/checkpoints/last.pt", "pickled Python code"),
        setup=_evil_run("last.pt", FAKE_RUN),
        check=_no_marker,
        heavy=True,
    ),
    Row(
        "analyze-pickled-checkpoint",
        "analyze cge --run {tmp}/r --out {tmp}/o --device cpu",
        ("{tmp}/r/checkpoints/best.pt", "pickled Python code"),
        setup=_evil_run("best.pt", CGE_RUN),
        check=_no_marker,
    ),
    # ---------------------------------------------------------------- runs and faults
    Row(
        "train-into-existing-run",
        "train -c {run} --no-progress",
        ("already holds a run", "--resume", "--overwrite"),
    ),
    Row(
        "resume-without-checkpoint",
        TRAIN + " --resume",
        ("--resume: no checkpoint", "{tmp}/out/checkpoints/last.pt"),
    ),
    Row(
        "non-finite-loss",
        TRAIN + " solver.lr=1e30 solver.warmup_epochs=0",
        ("non-finite loss at epoch 1/2", "total=nan", "solver.lr"),
        rc=3,
        heavy=True,
    ),
    Row(
        "disk-full-while-checkpointing",
        TRAIN,
        (
            "{tmp}/out/checkpoints/last.pt",
            "No space left on device",
            "bytes",
            "nothing was lost: the previous last.pt is intact",
            "continue with --resume",
        ),
        env={"REIDKIT_TEST_FAULT": "enospc:last.pt:2"},
        then=TRAIN + " --resume",
        between=_after_failure,
        check=_disk_full_check,
        heavy=True,
    ),
    Row(
        "kill-9-while-checkpointing-then-resume",
        TRAIN,
        None,
        rc=-9,
        env={"REIDKIT_TEST_FAULT": "kill:last.pt:2"},
        then=TRAIN + " --resume",
        check=_kill_check,
        heavy=True,
    ),
    # ---------------------------------------------------------------- optional packages
    Row(
        "export-without-onnx",
        "export -c {run} --out {tmp}/m.onnx",
        ("reidkit export needs onnx and onnxruntime", "pip install 'reidkit[onnx]'"),
        env={"REIDKIT_TEST_HIDE": HIDE_EXTRAS},
    ),
    Row(
        "keypoints-without-onnxruntime",
        "keypoints --onnx {tmp}/pose.onnx --dataset market1501 --root {data} --out {tmp}/kp.json",
        ("onnxruntime", "pip install 'reidkit[onnx]'"),
        env={"REIDKIT_TEST_HIDE": HIDE_EXTRAS},
    ),
    Row(
        "analyze-without-matplotlib",
        "analyze cge --run {run} --out {tmp}/o",
        ("matplotlib", "pip install 'reidkit[plot]'"),
        env={"REIDKIT_TEST_HIDE": HIDE_EXTRAS},
    ),
    Row(
        "cuhk03-mat-without-h5py",
        "datasets stats --name cuhk03 --root {tmp} --option source=mat",
        ("h5py", "pip install 'reidkit[cuhk03]'"),
        setup=lambda t, tmp: (
            _write("cuhk03/cuhk03_release/cuhk-03.mat", "not read")(t, tmp),
            _write("cuhk03/cuhk03_new_protocol_config_labeled.mat", "not read")(t, tmp),
        ),
        env={"REIDKIT_TEST_HIDE": HIDE_EXTRAS},
    ),
]


# ------------------------------------------------------------------------ running
def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REIDKIT_TEST_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(SITE), str(REPO)]),
        REIDKIT_TEST_FAKE_METHOD="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    env.update(extra)
    return env


def _cli(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reidkit.cli", *shlex.split(cmd)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def checksums(*roots: Path) -> dict[str, str]:
    """``{path: sha1}`` of every file under ``roots``."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [p for p, digest in before.items() if after.get(p) != digest]


def run_row(row: Row, trees: Trees) -> Result:
    tmp = trees.root / "rows" / row.id
    tmp.mkdir(parents=True)
    if row.setup is not None:
        row.setup(trees, tmp)
    fmt = trees.vars(tmp)
    env = _env(row.env)
    before = checksums(trees.root / "shared", tmp)
    start = time.perf_counter()
    proc = _cli(row.cmd.format(**fmt), tmp, env)
    seconds = time.perf_counter() - start
    after = checksums(trees.root / "shared", tmp)
    between = row.between(trees, tmp) if row.between else {}
    then = _cli(row.then.format(**fmt), tmp, _env({})) if row.then else None
    changed = _changed(before, after)
    return Result(proc.returncode, proc.stdout, proc.stderr, then, changed, seconds, between)


# ------------------------------------------------------------------------ fixtures
class _Evil:
    """Unpickling this would create the marker folder ``PWNED``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _make_files(files: Path, run: Path, marker: Path) -> None:
    from reidkit.models import build_backbone

    files.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil(marker)}, files / "evil.pt")
    shutil.copy(files / "evil.pt", files / "evil.pth")
    torch.manual_seed(0)
    small = build_backbone("resnet18", width=8).state_dict()
    torch.save(small, files / "resnet18_w8.pth")
    data = (files / "resnet18_w8.pth").read_bytes()
    (files / "truncated.pth").write_bytes(data[: len(data) // 2])
    (files / "garbage.safetensors").write_bytes(os.urandom(64) + b'{"not": "a header"}')
    state = dict(load_checkpoint(run / "checkpoints" / "best.pt")["model"])
    key = next(k for k, v in state.items() if v.dim() == 4)  # the first convolution
    state[key] = torch.zeros(*state[key].shape[:2], 5, 5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(files / "wrong_shape.safetensors"))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Trees:
    root = tmp_path_factory.mktemp("bad_inputs")
    shared = root / "shared"
    data = write_market_folder(shared / "data")
    cfg = shared / "fake.yaml"
    cfg.write_text(
        "model:\n  name: _engine_fake\n"
        f"data:\n  dataset: market1501\n  root: {data}\n  height: 32\n  width: 16\n"
        "  batch_size: 8\n  num_instances: 2\n  test_batch_size: 16\n  num_workers: 0\n"
        "  pad: 2\n"
        f"output_dir: {shared / 'runs' / 'default'}\ndevice: cpu\n"
        "solver:\n  max_epochs: 2\n  warmup_epochs: 1\n  milestones: [2]\n  lr: 0.01\n"
        "test:\n  eval_period: 1\ncheckpoint_period: 1\nlog_period: 1\n"
    )
    bot_cfg = shared / "bot.yaml"
    bot_cfg.write_text(
        f"_base_: {REPO / 'configs/synth/bot.yaml'}\n"
        f"data:\n  dataset: market1501\n  root: {data}\n  height: 32\n  width: 16\n"
        "  batch_size: 8\n  num_instances: 2\n"
        f"output_dir: {shared / 'runs' / 'bot'}\ndevice: cpu\n"
    )
    run = shared / "run"
    proc = _cli(f"train -c {cfg} --no-progress output_dir={run}", root, _env({}))
    assert proc.returncode == 0, proc.stderr
    trees = Trees(root, data, cfg, bot_cfg, run, shared / "files")
    _make_files(trees.files, run, root / "PWNED")
    return trees


@pytest.fixture(scope="module")
def results(trees, request) -> dict[str, Future]:
    """Every selected row, submitted at once to a pool of subprocesses (heavy rows first)."""
    selected = {
        item.callspec.params["row"].id: item.callspec.params["row"]
        for item in request.session.items
        if item.module is sys.modules[__name__]
        and hasattr(item, "callspec")
        and "row" in item.callspec.params
    }
    order = sorted(selected.values(), key=lambda r: not r.heavy)
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {row.id: pool.submit(run_row, row, trees) for row in order}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, trees: Trees, results: dict[str, Future]) -> None:
    result = results[row.id].result(timeout=TIMEOUT)
    fmt = trees.vars(trees.root / "rows" / row.id)
    context = f"\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.rc == row.rc, f"exit status {result.rc}, expected {row.rc}{context}"
    if row.expect is not None:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}{context}"
        line = lines[0]
        assert "Traceback" not in line and line.startswith("reidkit "), line
        for text in row.expect:
            assert text.format(**fmt) in line, f"{text.format(**fmt)!r} not in:\n{line}"
    assert not result.changed, f"files changed on disk: {result.changed}"
    if row.then is not None:
        then = result.then
        assert then is not None and then.returncode == 0, then.stderr if then else ""
    if row.check is not None:
        row.check(trees, trees.root / "rows" / row.id, result)


def test_debug_shows_the_traceback(trees: Trees, tmp_path: Path) -> None:
    proc = _cli(f"train -c {trees.cfg} solver.lrr=1 --debug", tmp_path, _env({}))
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError" in proc.stderr and "did you mean 'solver.lr'" in proc.stderr


def test_commands_work_without_the_extras(trees: Trees, tmp_path: Path) -> None:
    """With onnx, onnxruntime, faiss, scipy, h5py and matplotlib unimportable, every
    command starts (``--help``) and evaluation, reports and dataset checks run."""
    env = _env({"REIDKIT_TEST_HIDE": HIDE_EXTRAS})
    probe = subprocess.run(
        [sys.executable, "-c", "import onnx"], env=env, capture_output=True, text=True
    )
    assert probe.returncode == 1 and "No module named 'onnx'" in probe.stderr  # the hook works
    from reidkit.cli import build_parser

    names = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    script = (
        "import reidkit.cli\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        reidkit.cli.main([name, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, name\n"
    )
    helps = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert helps.returncode == 0, helps.stderr
    proc = _cli(f"eval -c {trees.run}", tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "weights: " in proc.stdout and "best.pt" in proc.stdout and "mAP" in proc.stdout
