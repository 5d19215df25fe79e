"""Training and extraction throughput (images/s), fp32 vs bf16 autocast (+ channels_last).

    python benchmarks/bench_train_gpu.py [--backbone resnet50] [--batch 64] [--steps 20]

On CUDA: BoT with a ResNet-50 at 256x128, P x K batch of random images (no data loading,
so this measures the model step: forward under autocast, loss in fp32, backward, Adam).
Without CUDA it runs a tiny CPU version (ResNet-18, 64x32, a few steps) and says so; those
numbers only show that the code path works.
"""

from __future__ import annotations

import argparse
import time

import torch

from reidkit.config import load_config
from reidkit.engine.extract import autocast_context
from reidkit.engine.optim import build_optimizer, build_param_groups
from reidkit.engine.trainer import _cast_float
from reidkit.methods import build_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    cfg, device, amp: str, channels_last: bool, batch: int, steps: int, warmup: int
) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_method(cfg, 751).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = build_optimizer(build_param_groups(model, cfg.solver), cfg.solver)
    k = cfg.data.num_instances
    x = torch.randn(batch, 3, cfg.data.height, cfg.data.width, device=device).contiguous(
        memory_format=fmt
    )
    pids = (torch.arange(batch, device=device) // k) % 751
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast_context(device, amp):
            out = model(x)
        loss = sum(model.compute_loss(_cast_float(out), pids).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    train_ips = steps * batch / (time.perf_counter() - t0)

    model.eval()
    xe = torch.randn(batch * 4, 3, cfg.data.height, cfg.data.width, device=device).contiguous(
        memory_format=fmt
    )
    with torch.no_grad(), autocast_context(device, amp):
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            model(xe)
    _sync(device)
    extract_ips = steps * xe.shape[0] / (time.perf_counter() - t0)
    return train_ips, extract_ips


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        backbone, h, w = args.backbone or "resnet50", 256, 128
        batch, steps, warmup = args.batch or 64, args.steps or 20, 5
        variants = [
            ("fp32", "off", False),
            ("bf16", "bf16", False),
            ("bf16+channels_last", "bf16", True),
        ]
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        backbone, h, w = args.backbone or "resnet18", 64, 32
        batch, steps, warmup = args.batch or 8, args.steps or 2, 1
        # autocast is off on CPU in reidkit, so only fp32 is meaningful here
        variants = [("fp32", "off", False), ("fp32+channels_last", "off", True)]
        print("CUDA not available: tiny CPU run (ResNet-18, 64x32) to check the code path only")
    cfg = load_config(
        None,
        [
            "model.name=bot",
            f"model.backbone={backbone}",
            f"data.height={h}",
            f"data.width={w}",
            "data.num_instances=4",
            "model.pretrained=null",
        ],
    )
    print(
        f"BoT {backbone} {h}x{w}, train batch {batch}, extraction batch {4 * batch}, {steps} timed steps"
    )
    results = {}
    for name, amp, cl in variants:
        results[name] = bench(cfg, device, amp, cl, batch, steps, warmup)
        print(
            f"  {name:<20} train {results[name][0]:9.1f} img/s   extract {results[name][1]:9.1f} img/s"
        )
    base = results[variants[0][0]]
    for name in list(results)[1:]:
        t, e = results[name]
        print(f"  {name} / {variants[0][0]}: train x{t / base[0]:.2f}, extract x{e / base[1]:.2f}")


if __name__ == "__main__":
    main()
