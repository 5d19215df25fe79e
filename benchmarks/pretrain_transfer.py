"""Transfer across a synthetic domain gap: pretrain on `gap-source`, fine-tune and test on
`gap-target`, against training on the target from scratch (docs/pretrain.md).

Source and target differ in backgrounds, colour casts and walking directions, and have
disjoint identities (``reidkit/data/synth/knobs.py``: ``gap-source`` / ``gap-target``).
Every run is a ``reidkit`` CLI call, one after another (``OMP_NUM_THREADS=1``, one loader
worker), with its wall time and CPU time (the process and its loader worker) recorded:

* ``r18``: ResNet-18 pretrained 10 epochs (backbones of epochs 1, 3 and 10 exported;
  with the constant learning rate they are what 1-, 3- and 10-epoch runs end with), each
  fine-tuned on the target (``configs/pretrain/gap_target.yaml``, 4 epochs); from scratch
  with the same 4 epochs, and with about as many images as 3 pretraining epochs + the
  fine-tuning (8 epochs);
* ``ablation``: ResNet-18, 3 pretraining epochs with one group of variety knobs set back
  to 0 (the on-disk distributions), and with all of them at 0 (all knobs at 1 is the
  ``r18`` 3-epoch backbone), each measured by its *zero-shot* transfer: target mAP / R1 of
  the pooled backbone feature, no fine-tuning (a fine-tuning per row did not fit the CPU
  budget); the ``r18`` and ``r50`` backbones get the same zero-shot row;
* ``noise``: the ResNet-18 scratch and 3-epoch rows repeated with training seed 1;
* ``r50``: ResNet-50 pretrained 3 epochs (epoch 1 exported) and, in a second run, 10
  epochs, each of epochs 1, 3 and 10 fine-tuned on the target; from scratch with the same
  4 epochs.

Results go to ``OUT/results.json`` (a run already there is not repeated) and the tables
are printed as markdown. ``--parts`` picks what runs.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/pretrain_transfer.py \\
        --out runs/gap --parts r18 noise r50 ablation zero-shot
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "configs" / "pretrain" / "gap_source.yaml"
TARGET = ROOT / "configs" / "pretrain" / "gap_target.yaml"
FT_EPOCHS = 4
ABLATION = {
    "no appearance variety": ["body_shape", "clothing_colours", "textures"],
    "no scene variety": ["background_variety"],
    "no camera variety": ["lighting", "colour_response", "blur"],
    "no geometry variety": ["scale_jitter", "crop_jitter", "pose_variety"],
}


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _cli(args: list[str], log: Path) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), _cpu_children()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "reidkit.cli", *args, "--no-progress"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"reidkit {' '.join(args)} failed; see {log}")
    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(_cpu_children() - c0, 1)}


def _epoch_times(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["epoch_time"] for r in rows if r.get("type") == "epoch"]


class Runner:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.file = out / "results.json"
        self.results = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def _save(self) -> None:
        self.file.write_text(json.dumps(self.results, indent=2))

    def pretrain(
        self, key: str, backbone: str, epochs: int, exports: list[int], knobs: list[str]
    ) -> dict:
        if key in self.results:
            return self.results[key]
        weights = self.out / f"{key}.safetensors"
        args = ["pretrain", "-c", str(SOURCE), "--backbone", backbone, "--epochs", str(epochs)]
        args += ["--out", str(weights), "--overwrite", *knobs]
        if exports:
            args += ["--export-epochs", ",".join(map(str, exports))]
        cost = _cli(args, self.out / f"{key}.log")
        run_dir = weights.with_name(f"{key}.run")
        times = _epoch_times(run_dir)
        cards = {}
        for e in [*exports, epochs]:
            name = f"{key}.e{e:03d}" if e != epochs else key
            card = json.loads((self.out / f"{name}.json").read_text())
            cards[str(e)] = {
                "weights": str(self.out / f"{name}.safetensors"),
                "images_seen": card["images_seen"],
                "validation": card["validation"],
            }
        self.results[key] = {
            "backbone": backbone,
            "epochs": epochs,
            "knobs": knobs,
            **cost,
            "epoch_wall_s": times,
            # CPU of the whole call spread over epochs by their share of the wall time
            "cpu_min_per_epoch": round(
                cost["cpu_s"] * sum(times) / cost["wall_s"] / 60 / len(times), 2
            ),
            "exports": cards,
        }
        self._save()
        return self.results[key]

    def zero_shot(self, key: str, backbone: str, weights: str) -> dict:
        """Target mAP / R1 of the pretrained backbone's pooled feature (no fine-tuning)."""
        if key in self.results:
            return self.results[key]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        t0, c0 = time.time(), _cpu_children()
        proc = subprocess.run(
            [sys.executable, "-c", ZERO_SHOT, str(TARGET), backbone, weights],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"zero-shot evaluation of {weights} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        self.results[key] = {
            "backbone": backbone,
            "init": weights,
            "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(_cpu_children() - c0, 1),
            "mAP": metrics["mAP"],
            "rank1": metrics["rank1"],
        }
        self._save()
        return self.results[key]

    def finetune(
        self, key: str, backbone: str, weights: str | None, epochs: int, seed: int = 0
    ) -> dict:
        if key in self.results:
            return self.results[key]
        run_dir = self.out / key
        args = ["train", "-c", str(TARGET), f"model.backbone={backbone}", f"output_dir={run_dir}"]
        args += [f"model.pretrained={weights or 'null'}", f"solver.max_epochs={epochs}"]
        args += [f"solver.milestones=[{epochs - 1}]", f"seed={seed}", "--overwrite"]
        cost = _cli(args, self.out / f"{key}.log")
        final = json.loads((run_dir / "metrics.json").read_text())["final"]
        times = _epoch_times(run_dir)
        self.results[key] = {
            "backbone": backbone,
            "init": weights,
            "epochs": epochs,
            "seed": seed,
            **cost,
            "epoch_wall_s": times,
            "cpu_min_per_epoch": round(
                cost["cpu_s"] * sum(times) / cost["wall_s"] / 60 / len(times), 2
            ),
            "mAP": final["mAP"],
            "rank1": final["rank1"],
        }
        self._save()
        return self.results[key]


ZERO_SHOT = """
import json, sys
from reidkit.config import load_config
from reidkit.data.datasets import dataset_from_config
from reidkit.engine import evaluate_model
from reidkit.methods import build_method
cfg = load_config(sys.argv[1], [f"model.backbone={sys.argv[2]}", f"model.pretrained={sys.argv[3]}",
                                "test.feature=pre_bn"])
model = build_method(cfg, num_classes=0).eval()
result = evaluate_model(cfg, model, dataset_from_config(cfg.data), "cpu")
print(json.dumps(result.metrics))
"""


def _fmt(r: dict) -> str:
    return f"{100 * r['mAP']:.1f} | {100 * r['rank1']:.1f}"


def run_r18(rn: Runner) -> list[str]:
    pre = rn.pretrain("r18-wide", "resnet18", 10, [1, 3], [])
    lines = [
        "| ResNet-18 | pretraining epochs | images seen | source val mAP | target mAP | "
        "target R1 | fine-tune CPU min/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    sc = rn.finetune("ft-r18-scratch", "resnet18", None, FT_EPOCHS)
    lines.append(f"| scratch | 0 | 0 | - | {_fmt(sc)} | {sc['cpu_min_per_epoch']} |")
    for e in (1, 3, 10):
        ex = pre["exports"][str(e)]
        ft = rn.finetune(f"ft-r18-e{e}", "resnet18", ex["weights"], FT_EPOCHS)
        val = ex["validation"]["mAP"] if ex["validation"] else float("nan")
        lines.append(
            f"| synthetic | {e} | {ex['images_seen']} | {100 * val:.1f} | {_fmt(ft)} | "
            f"{ft['cpu_min_per_epoch']} |"
        )
    long = rn.finetune("ft-r18-scratch-long", "resnet18", None, 2 * FT_EPOCHS)
    lines.append(
        f"| scratch, {2 * FT_EPOCHS} epochs (3 pretraining epochs' images) | 0 | 0 | - | "
        f"{_fmt(long)} | {long['cpu_min_per_epoch']} |"
    )
    lines.append(
        f"\npretraining cost: {pre['cpu_min_per_epoch']} CPU min/epoch "
        f"(wall {sum(pre['epoch_wall_s']) / len(pre['epoch_wall_s']):.0f} s/epoch)"
    )
    return lines


def run_ablation(rn: Runner) -> list[str]:
    rows = []
    wide = rn.results.get("r18-wide")
    if wide is not None:
        rows.append(("all variety knobs at 1", wide["exports"]["3"]["weights"]))
    settings = {
        **{name: [f"data.render.{k}=0" for k in knobs] for name, knobs in ABLATION.items()},
        "all variety knobs at 0 (on-disk distributions)": ["data.render.preset=gap-source-narrow"],
    }
    for i, (name, overrides) in enumerate(settings.items()):
        pre = rn.pretrain(f"abl{i}", "resnet18", 3, [], overrides)
        rows.append((name, pre["exports"]["3"]["weights"]))
    lines = [
        "| ResNet-18, 3 pretraining epochs | source val mAP | zero-shot target mAP | R1 |",
        "|---|---:|---:|---:|",
    ]
    for name, weights in rows:
        card = json.loads(Path(weights).with_suffix(".json").read_text())
        zs = rn.zero_shot(f"zs-{Path(weights).stem}", "resnet18", weights)
        lines.append(f"| {name} | {100 * card['validation']['mAP']:.1f} | {_fmt(zs)} |")
    return lines


def run_noise(rn: Runner) -> list[str]:
    """Two ResNet-18 target runs repeated with training seed 1 (sampling, augmentation,
    initialisation of what is not pretrained): how far one seed moves a row."""
    pre = rn.pretrain("r18-wide", "resnet18", 10, [1, 3], [])  # the r18 part's run
    lines = ["| ResNet-18, training seed | target mAP | R1 |", "|---|---:|---:|"]
    for name, weights in (("scratch", None), ("e3", pre["exports"]["3"]["weights"])):
        for seed in (0, 1):
            key = f"ft-r18-{name}" + (f"-seed{seed}" if seed else "")
            ft = rn.finetune(key, "resnet18", weights, FT_EPOCHS, seed=seed)
            lines.append(f"| {name}, seed {seed} | {_fmt(ft)} |")
    return lines


def run_zero_shot(rn: Runner) -> list[str]:
    lines = ["| zero-shot on the target | target mAP | R1 |", "|---|---:|---:|"]
    for key, backbone in (
        ("r18-wide", "resnet18"),
        ("r50-wide", "resnet50"),
        ("r50-wide10", "resnet50"),
    ):
        pre = rn.results.get(key)
        if pre is None:
            continue
        for e, ex in sorted(pre["exports"].items(), key=lambda t: int(t[0])):
            zs = rn.zero_shot(f"zs-{Path(ex['weights']).stem}", backbone, ex["weights"])
            lines.append(f"| {backbone}, {e} pretraining epochs | {_fmt(zs)} |")
    return lines


def run_r50(rn: Runner) -> list[str]:
    # two pretraining runs: the 3-epoch one (epoch 1 exported) came first; the 10-epoch one
    # repeats its first 3 epochs exactly (constant rate), so it is kept for its last epoch
    pre = rn.pretrain("r50-wide", "resnet50", 3, [1], [])
    sc = rn.finetune("ft-r50-scratch", "resnet50", None, FT_EPOCHS)
    rows = [("0", None, sc)]
    for e in (1, 3):
        ex = pre["exports"][str(e)]
        rows.append((str(e), ex, rn.finetune(f"ft-r50-e{e}", "resnet50", ex["weights"], FT_EPOCHS)))
    long = rn.pretrain("r50-wide10", "resnet50", 10, [], [])
    ex = long["exports"]["10"]
    rows.append(("10", ex, rn.finetune("ft-r50-e10", "resnet50", ex["weights"], FT_EPOCHS)))
    lines = [
        "| ResNet-50 | pretraining epochs | images seen | source val mAP | target mAP | "
        "target R1 | fine-tune CPU min/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e, ex, ft in rows:
        kind, seen = ("scratch", 0) if ex is None else ("synthetic", ex["images_seen"])
        val = f"{100 * ex['validation']['mAP']:.1f}" if ex is not None else "-"
        lines.append(f"| {kind} | {e} | {seen} | {val} | {_fmt(ft)} | {ft['cpu_min_per_epoch']} |")
    for p in (pre, long):
        lines.append(
            f"\npretraining cost ({p['epochs']}-epoch run): {p['cpu_min_per_epoch']} CPU "
            f"min/epoch (wall {sum(p['epoch_wall_s']) / len(p['epoch_wall_s']):.0f} s/epoch)"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gap")
    ap.add_argument("--parts", nargs="+", default=["r18", "noise", "r50", "ablation", "zero-shot"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rn = Runner(out)
    t0 = time.time()
    parts = {
        "r18": run_r18,
        "noise": run_noise,
        "ablation": run_ablation,
        "r50": run_r50,
        "zero-shot": run_zero_shot,
    }
    for part in args.parts:
        lines = parts[part](rn)
        print("\n".join(lines), "\n", flush=True)
    total_wall = sum(r["wall_s"] for r in rn.results.values())
    total_cpu = sum(r["cpu_s"] for r in rn.results.values())
    print(
        f"all runs in {out}/results.json: {total_wall / 60:.1f} min wall, {total_cpu / 60:.1f} "
        f"CPU min (this call: {(time.time() - t0) / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
