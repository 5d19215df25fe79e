"""On-the-fly rendering against training: which one limits ``reidkit pretrain``?

For each size (``--sizes``, default 64x32, 128x64, 256x128), in one process:

1. **render**: images of the synthetic set rendered on the fly
   (``SynthRenderSource.render``: person, background crop, camera effects, in-memory JPEG
   round trip), for the ``market`` preset (the on-disk plan) and the ``large`` preset (the
   index plan, every variety knob at 1), timed on a second pass over the same images (the
   per-process caches filled, as in a long run). Reported per core: images per CPU-second of this
   process (robust to other load) and per wall-second;
2. **train**: BoT training steps (ResNet forward + ID/triplet loss + backward + Adam) on
   random batches of ``--batch-size``, torch on ``--threads`` threads, images per
   wall-second and per CPU-second;
3. the **ratio** (training images per CPU-second) / (render images per CPU-second) =
   render cores that keep one training core fed on a CPU, and for a GPU, **estimated** from
   NVIDIA's published ResNet-50 v1.5 training throughput (DeepLearningExamples, PyTorch,
   1x A100 80GB: 938 img/s TF32, 2,470 img/s mixed precision at 224x224), scaled by the
   FLOP ratio of the re-ID network (last stride 1) at each size to the ImageNet network at
   224x224 (counted here with ``torch.utils.flop_counter``). Small inputs use a GPU less
   well than 224x224, so the estimate is an upper bound of the GPU rate.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_render.py \\
        --sizes 64x32 128x64 256x128 --backbones resnet18 resnet50 --json render.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from reidkit.commands.flops import count_flops
from reidkit.config import load_config
from reidkit.data.synth import SynthRenderConfig, SynthRenderSource
from reidkit.methods import build_method
from reidkit.models import build_backbone

# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5 README,
# "Training performance: NVIDIA DGX A100 (8x A100 80GB)", 1 GPU, 224x224, NGC 21.03.
PUBLISHED_A100 = {"tf32": 938.0, "amp": 2470.0}


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def bench_render(preset: str, height: int, width: int, n: int) -> dict[str, float]:
    source = SynthRenderSource(SynthRenderConfig(preset=preset), height, width)
    records = source.records("train")
    step = max(1, len(records) // (n + 1))
    indices = [(k * step + 7) % len(records) for k in range(n)]
    # steady state: a first pass fills the per-process caches (the background texture of
    # each camera and variant, families, identity plans), as a long run has them filled
    for i in indices:
        records.load_image(i)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        records.load_image(i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"per_cpu_s": n / cpu, "per_wall_s": n / wall, "ms_cpu": 1e3 * cpu / n}


def bench_train(backbone: str, height: int, width: int, batch: int, steps: int) -> dict:
    cfg = load_config(
        None,
        [
            "model.name=bot",
            f"model.backbone={backbone}",
            f"data.height={height}",
            f"data.width={width}",
        ],
    )
    torch.manual_seed(0)
    model = build_method(cfg, num_classes=batch // 4)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 3.5e-4)
    images = torch.randn(batch, 3, height, width)
    pids = torch.arange(batch) // 4
    times = []
    for it in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model({"images": images, "pids": pids})
        loss = sum(model.compute_loss(out, {"pids": pids}).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it:  # the first step allocates
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall = min(t for t, _ in times)  # the least disturbed step
    cpu = min(c for _, c in times)
    return {"per_wall_s": batch / wall, "per_cpu_s": batch / cpu}


def flop_ratio(backbone: str, height: int, width: int) -> float:
    """FLOPs of the re-ID backbone (last stride 1) at HxW / the ImageNet one at 224x224."""
    reid = count_flops(build_backbone(backbone, last_stride=1), (3, height, width), "cpu")
    imagenet = count_flops(build_backbone(backbone, last_stride=2), (3, 224, 224), "cpu")
    return reid / imagenet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=_size, default=[(64, 32), (128, 64), (256, 128)])
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--presets", nargs="+", default=["market", "large"])
    ap.add_argument("--renders", type=int, default=60, help="images rendered per measurement")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for h, w in args.sizes:
        render = {p: bench_render(p, h, w, args.renders) for p in args.presets}
        for name in args.backbones:
            train = bench_train(name, h, w, args.batch_size, args.steps)
            ratio = flop_ratio(name, h, w) if name == "resnet50" else None
            row = {"size": f"{h}x{w}", "backbone": name, "render": render, "train": train}
            if ratio is not None:
                row["gpu_estimate"] = {k: v / ratio for k, v in PUBLISHED_A100.items()} | {
                    "flop_ratio_to_imagenet_224": ratio
                }
            rows.append(row)
            slowest = min(r["per_cpu_s"] for r in render.values())
            # per CPU-second on both sides: what one busy core does, whatever the load
            cores_cpu = train["per_cpu_s"] / slowest
            line = (
                f"{h}x{w} {name:<9} render/core: "
                + ", ".join(
                    f"{p} {r['per_cpu_s']:.0f} img/CPU-s ({r['ms_cpu']:.1f} ms)"
                    for p, r in render.items()
                )
                + f" | train ({args.threads} thr): {train['per_wall_s']:.1f} img/s"
                f" ({train['per_cpu_s']:.1f} img/CPU-s) | render cores per training core: "
                f"{cores_cpu:.2f} -> {'training' if cores_cpu < 1 else 'rendering'} is the "
                "CPU bottleneck"
            )
            if ratio is not None:
                gpu = row["gpu_estimate"]
                line += (
                    f"\n    GPU ESTIMATE (A100, published RN50 x FLOP ratio {ratio:.2f}): "
                    f"{gpu['tf32']:.0f} img/s TF32 / {gpu['amp']:.0f} img/s AMP -> "
                    f"{gpu['tf32'] / slowest:.0f} / {gpu['amp'] / slowest:.0f} render cores "
                    "(rendering is the GPU bottleneck)"
                )
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
