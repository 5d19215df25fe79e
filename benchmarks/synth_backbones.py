"""BoT with every zoo backbone trained from scratch on the synthetic ``small`` set, one budget
for all; writes the table of ``docs/backbones.md`` ("Trained from scratch").

    reidkit synth --preset small --out data/synth-small          # once
    PYTHONPATH=$PWD python benchmarks/synth_backbones.py [--names resnet50 se_resnet50 ...]
        [--out runs/synth/backbones] [--jobs 2] [key=value ...]

Each backbone ``NAME`` is one run of

    reidkit train -c configs/synth/backbones.yaml model.backbone=NAME \\
        output_dir=runs/synth/backbones/NAME --no-progress

(ViTs with ``configs/synth/backbones_vit.yaml``: overlapping patches at 64x32, see there),
with ``OMP_NUM_THREADS=1`` and the loader in the main process; extra ``key=value``
overrides go to every run (e.g. ``data.root=/data``). A finished run (``metrics.json``) is
reused, an interrupted one is resumed from ``checkpoints/last.pt``; so the script can be
stopped and started again, and ``--jobs 2`` runs two trainings at a time. Then each run's
model is measured by ``reidkit flops -c RUN/config.yaml`` (parameters and GFLOPs at the
training input size, with the run's classifier) and the table is written: parameters,
GFLOPs, training images/s, training time, mAP, rank-1 and rank-10 of the final evaluation.
Writes ``<out>/table.json`` and ``<out>/table.md``.

Training speed, two ways: "run" is the median over epochs of the runs' own ``log.jsonl``
(data loading included; runs trained at different times under different loads, so on a
shared machine it compares poorly), "step" is the fastest of ``--interleaved`` round-robin
cycles of one training step (forward, loss, backward; no loader, no optimiser step) of
every model in one process, so that all models see the same load.

This is not a ``bench_*.py`` file (``make bench`` does not run it): it trains 12 networks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/synth/backbones.yaml"
VIT_CONFIG = "configs/synth/backbones_vit.yaml"
# the three of the Grad-CAM comparison (docs/backbones.md) first, the slowest last
DEFAULT_NAMES = [
    "resnet18",
    "resnet50",
    "se_resnet50",
    "resattnet56",
    "osnet_x0_25",
    "osnet_x1_0",
    "osnet_ain_x1_0",
    "resnet50_ibn_a",
    "resnet12",
    "resnest50",
    "se_resnext50_32x4d",
    "vit_small_patch16",
]


def config_for(name: str) -> str:
    return VIT_CONFIG if name.startswith(("vit_", "deit_")) else CONFIG


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reidkit.cli", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def train_one(name: str, out: Path, overrides: list[str]) -> Path | None:
    """Train (or resume, or reuse) the run of ``name``; returns its folder (``None`` if the
    training failed: the others go on)."""
    run = out / name
    if (run / "metrics.json").is_file():
        print(f"{name}: finished run reused ({run})", flush=True)
        return run
    cmd = _cli(
        "train",
        "-c",
        config_for(name),
        f"model.backbone={name}",
        f"output_dir={run}",
        *overrides,
        "--no-progress",
    )
    if (run / "checkpoints" / "last.pt").is_file():
        cmd.append("--resume")
    elif run.exists():
        cmd.append("--overwrite")  # stopped before its first checkpoint: nothing to keep
    log = out / f"{name}.log"
    print(f"{name}: {' '.join(cmd[2:])} (log {log})", flush=True)
    start = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        print(f"{name}: reidkit train exited with {rc}; see {log}", flush=True)
        return None
    print(f"{name}: done in {time.time() - start:.0f} s", flush=True)
    return run


def _num_classes(run: Path) -> int:
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return int(ckpt["num_classes"])


def flops_of(run: Path) -> dict:
    """``reidkit flops`` on the run's resolved config and classifier size (parameters and
    GFLOPs; its one timed forward is not used)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flops.json"
        cmd = _cli(
            "flops",
            "-c",
            str(run / "config.yaml"),
            "--device",
            "cpu",
            "--batch-sizes",
            "1",
            "--warmup",
            "0",
            "--runs",
            "1",
            "--num-classes",
            str(_num_classes(run)),
            "--json",
            str(path),
        )
        subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True, text=True)
        return json.loads(path.read_text())


def summarize(name: str, run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    # an epoch redone after a resume (the session was stopped after logging it but before its
    # checkpoint) is logged twice: keep its last record
    by_epoch = {r["epoch"]: r["images_per_s"] for r in rows if r.get("type") == "epoch"}
    speeds = [by_epoch[e] for e in sorted(by_epoch)]
    cost = flops_of(run)
    from reidkit.config import load_config

    cfg_opts = load_config(run / "config.yaml").model.backbone_options
    final = metrics["final"]
    return {
        "backbone": name,
        "backbone_options": cfg_opts or {},
        "parameters": cost["parameters"],
        "gflops": cost["gflops"],
        "input": cost["input"],
        "train_images_per_s": statistics.median(speeds) if speeds else None,
        "epoch_images_per_s": speeds,
        "train_time_s": metrics.get("train_time_s"),
        "epochs": metrics.get("epochs"),
        "mAP": 100 * final["mAP"],
        "rank1": 100 * final["rank1"],
        "rank10": 100 * final["rank10"],
        "mINP": 100 * final["mINP"],
    }


def interleaved_train_steps(runs: dict[str, Path], cycles: int) -> dict[str, list[float]]:
    """Images/s of one BoT training step (forward, loss, backward; batch P x K of the
    config, random images) of every run's model, timed round-robin in one process (one
    step of each model per cycle) so that all see the same load; 1 thread."""
    import torch

    from reidkit.config import load_config
    from reidkit.methods import build_method

    torch.set_num_threads(1)
    models, batches = {}, {}
    for name, run in runs.items():
        cfg = load_config(run / "config.yaml")
        models[name] = build_method(cfg, _num_classes(run)).train()
        p = cfg.data.batch_size // cfg.data.num_instances
        gen = torch.Generator().manual_seed(0)
        batches[name] = {
            "images": torch.randn(cfg.data.batch_size, 3, cfg.data.height, cfg.data.width,
                                  generator=gen),
            "pids": torch.arange(p).repeat_interleave(cfg.data.num_instances),
        }  # fmt: skip

    def step(name: str) -> float:
        model, batch = models[name], batches[name]
        start = time.perf_counter()
        losses = model.compute_loss(model(batch), batch)
        sum(losses.values()).backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)  # keep only the parameters in memory
        return batch["images"].shape[0] / elapsed

    for name in runs:  # warm-up
        step(name)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for cycle in range(cycles):
        for name in runs:
            speeds[name].append(step(name))
        print(f"interleaved cycle {cycle + 1}/{cycles} (load {os.getloadavg()[0]:.1f})", flush=True)
    return speeds


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backbone | params (M) | GFLOPs | train img/s (step) | train img/s (run) | train time "
        "| mAP | R1 | R10 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        opts = r["backbone_options"]
        note = " (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else ""
        minutes = (r["train_time_s"] or 0) / 60
        step = r.get("step_images_per_s")
        step_text = f"{step:.1f}" if step else "-"
        lines.append(
            f"| `{r['backbone']}`{note} | {r['parameters'] / 1e6:.2f} | {r['gflops']:.3f} | "
            f"{step_text} | {r['train_images_per_s']:.1f} | {minutes:.0f} min | {r['mAP']:.1f} | "
            f"{r['rank1']:.1f} | {r['rank10']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--names", nargs="+", default=DEFAULT_NAMES, help="backbones, in run order")
    p.add_argument("--out", default="runs/synth/backbones", help="folder of the runs")
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (1 thread each)")
    p.add_argument(
        "--interleaved",
        type=int,
        default=4,
        help="round-robin training-step cycles after the runs (0: off); the fastest is kept",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    args = p.parse_args()
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda n: train_one(n, out, args.overrides), args.names))
    rows = [summarize(n, r) for n, r in zip(args.names, runs) if r is not None]
    failed = [n for n, r in zip(args.names, runs) if r is None]
    if args.interleaved and rows:
        done = {r["backbone"]: out / r["backbone"] for r in rows}
        speeds = interleaved_train_steps(done, args.interleaved)
        for r in rows:
            r["step_images_per_s_cycles"] = speeds[r["backbone"]]
            r["step_images_per_s"] = max(speeds[r["backbone"]])
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "table.md").write_text(table)
    print(table)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
