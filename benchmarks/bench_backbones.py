"""Parameters, GFLOPs and CPU latency of every backbone, measured through ``reidkit flops``.

    PYTHONPATH=$PWD python benchmarks/bench_backbones.py [--out benchmarks/results/backbones]
        [--names resnet50 osnet_x1_0 ...] [--config configs/bot/market1501.yaml]

Each backbone runs as ``reidkit flops -c CONFIG model.backbone=NAME model.pretrained=null
--batch-sizes 1 --json FILE`` (the BoT model at the config's 256x128: backbone + pooling +
BNNeck; the classifier is not in the eval forward), in its own process so one model's
memory does not weigh on the next. Ratios are printed against ResNet-50 from the same run.

CPU latency on a shared machine is mostly other people's load. Two guards: the list is run
``--rounds`` times and each backbone keeps its fastest forward (``reidkit flops`` reports the
fastest of its ``--runs`` forwards next to the median), with the 1-minute load average
recorded; and ``--interleaved N`` (default 6) then builds the same BoT models in one process
(the code path of ``reidkit flops``: ``build_method`` + ``time_forwards``) and times them
round-robin, one forward each per cycle, for N cycles, so every backbone sees the same
load. The table's latency is the fastest forward of all these measurements. ``--reuse
FILE`` skips the ``reidkit flops`` runs and takes their numbers (and any interleaved times)
from an earlier ``<out>.json``.
Parameters and GFLOPs are exact.
Writes ``<out>.json`` (raw numbers) and ``<out>.md`` (the table of ``docs/backbones.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REFERENCE = "resnet50"
DEFAULT_NAMES = [
    "resnet50",
    "resnet101",
    "resnet50_ibn_a",
    "resnet101_ibn_a",
    "resnest50",
    "resnest101",
    "resnest200",
    "resnest269",
    "se_resnet50",
    "se_resnet101",
    "se_resnext50_32x4d",
    "se_resnext101_32x4d",
    "resattnet56",
    "resattnet92",
    "osnet_x1_0",
    "osnet_x0_75",
    "osnet_x0_5",
    "osnet_x0_25",
    "osnet_ain_x1_0",
    "vit_small_patch16",
    "deit_small_patch16",
    "vit_base_patch16",
]


def measure(name: str, config: str, threads: int, runs: int, warmup: int) -> dict:
    """Run ``reidkit flops`` for one backbone and return its JSON record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flops.json"
        cmd = [
            sys.executable,
            "-m",
            "reidkit.cli",
            "flops",
            "-c",
            config,
            f"model.backbone={name}",
            "model.pretrained=null",
            "--device",
            "cpu",
            "--batch-sizes",
            "1",
            "--runs",
            str(runs),
            "--warmup",
            str(warmup),
            "--threads",
            str(threads),
            "--json",
            str(out),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"reidkit flops failed for {name}:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def interleaved_latency(
    names: list[str], config: str, threads: int, cycles: int
) -> dict[str, list[float]]:
    """Milliseconds of each forward (batch 1) of every backbone's BoT model, timed
    round-robin in one process: cycle after cycle, one forward of each model."""
    import torch

    from reidkit.commands.flops import time_forwards
    from reidkit.config import load_config
    from reidkit.methods import build_method

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    models = {}
    for name in names:
        cfg = load_config(config, [f"model.backbone={name}", "model.pretrained=null"])
        models[name] = build_method(cfg, 751).eval()
        shape = (3, cfg.data.height, cfg.data.width)
        time_forwards(models[name], shape, 1, device, warmup=1, runs=0)  # warm up
    times: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    for cycle in range(cycles):
        for name in names:
            sec = time_forwards(models[name], shape, 1, device, warmup=0, runs=1)[0]
            times[name].append(1000 * sec)
        loads.append(os.getloadavg()[0])
        print(f"interleaved cycle {cycle + 1}/{cycles} (load {loads[-1]:.1f})", flush=True)
    times["_load_avg_1min"] = loads
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--names", nargs="+", default=DEFAULT_NAMES)
    p.add_argument("--config", default="configs/bot/market1501.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (fastest kept)")
    p.add_argument("--interleaved", type=int, default=6, help="round-robin cycles (0: off)")
    p.add_argument("--reuse", metavar="JSON", help="parameters/GFLOPs of an earlier run")
    p.add_argument("--out", default="benchmarks/results/backbones")
    args = p.parse_args(argv)

    names = list(dict.fromkeys([REFERENCE, *args.names]))
    records: dict[str, dict] = {}
    if args.reuse:
        records = {k: v for k, v in json.loads(Path(args.reuse).read_text()).items() if k in names}
    for r in range(0 if args.reuse else args.rounds):
        for name in names:
            load = os.getloadavg()[0]
            rec = measure(name, args.config, args.threads, args.runs, args.warmup)
            ms = rec["latency"]["1"]["ms_per_image_min"]
            print(
                f"round {r + 1} {name:22s} {rec['parameters'] / 1e6:8.2f} M  "
                f"{rec['gflops']:7.2f} GFLOPs  {ms:9.1f} ms/image  (load {load:.1f})",
                flush=True,
            )
            rec["load_avg_1min"] = load
            rec["rounds_ms_per_image"] = records.get(name, {}).get("rounds_ms_per_image", [])
            rec["rounds_ms_per_image"].append(ms)
            best = records.get(name)
            if best is None or ms <= best["latency"]["1"]["ms_per_image_min"]:
                records[name] = rec
            else:
                best["rounds_ms_per_image"] = rec["rounds_ms_per_image"]

    if args.interleaved:
        times = interleaved_latency(names, args.config, args.threads, args.interleaved)
        for name in names:
            records[name]["interleaved_ms_per_image"] = times[name]
            records[name]["load_avg_1min"] = sum(times["_load_avg_1min"]) / args.interleaved
    for name in names:
        # the least disturbed estimate: the fastest forward of all measured
        rec = records[name]
        rec["latency_ms_per_image"] = min(
            [rec["latency"]["1"]["ms_per_image_min"], *rec.get("interleaved_ms_per_image", [])]
        )

    ref = records[REFERENCE]
    ref_ms = ref["latency_ms_per_image"]
    lines = [
        "| backbone | params (M) | GFLOPs | x ResNet-50 | CPU ms / image | x ResNet-50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print(f"\nratios against {REFERENCE} (same run):")
    for name in names:
        rec = records[name]
        ms = rec["latency_ms_per_image"]
        gf_ratio = rec["gflops"] / ref["gflops"]
        lat_ratio = ms / ref_ms
        print(f"{name:22s} GFLOPs x{gf_ratio:5.2f}   latency x{lat_ratio:5.2f}")
        lines.append(
            f"| `{name}` | {rec['parameters'] / 1e6:.2f} | {rec['gflops']:.2f} | "
            f"{gf_ratio:.2f} | {ms:.0f} | {lat_ratio:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
