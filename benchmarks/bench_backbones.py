"""Parameters, GFLOPs and CPU latency of every backbone, measured through ``reidkit flops``.

    PYTHONPATH=$PWD python benchmarks/bench_backbones.py [--out benchmarks/results/backbones]
        [--names resnet50 osnet_x1_0 ...] [--config configs/bot/market1501.yaml]

Each backbone runs as ``reidkit flops -c CONFIG model.backbone=NAME model.pretrained=null
--batch-sizes 1 --json FILE`` (the BoT model at the config's 256x128: backbone + pooling +
BNNeck; the classifier is not in the eval forward), in its own process so one model's
memory does not weigh on the next. Ratios are printed against ResNet-50 from the same run.

CPU latency on a shared machine is mostly other people's load, so the list is run
``--rounds`` times, interleaved, and each backbone's latency is its fastest forward over all
rounds (``reidkit flops`` reports the fastest of its ``--runs`` forwards next to the
median); the 1-minute load average is recorded next to each measurement. Parameters and
GFLOPs are exact.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--names", nargs="+", default=DEFAULT_NAMES)
    p.add_argument("--config", default="configs/bot/market1501.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (fastest kept)")
    p.add_argument("--out", default="benchmarks/results/backbones")
    args = p.parse_args(argv)

    names = list(dict.fromkeys([REFERENCE, *args.names]))
    records: dict[str, dict] = {}
    for r in range(args.rounds):
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

    ref = records[REFERENCE]
    ref_ms = ref["latency"]["1"]["ms_per_image_min"]
    lines = [
        "| backbone | params (M) | GFLOPs | x ResNet-50 | CPU ms / image | x ResNet-50 "
        "| load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print(f"\nratios against {REFERENCE} (same run):")
    for name in names:
        rec = records[name]
        ms = rec["latency"]["1"]["ms_per_image_min"]
        gf_ratio = rec["gflops"] / ref["gflops"]
        lat_ratio = ms / ref_ms
        print(f"{name:22s} GFLOPs x{gf_ratio:5.2f}   latency x{lat_ratio:5.2f}")
        lines.append(
            f"| `{name}` | {rec['parameters'] / 1e6:.2f} | {rec['gflops']:.2f} | "
            f"{gf_ratio:.2f} | {ms:.0f} | {lat_ratio:.2f} | {rec['load_avg_1min']:.1f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
