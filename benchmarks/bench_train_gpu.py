"""Training and extraction throughput and peak memory of BoT: fp32 eager vs bf16 +
channels_last vs + torch.compile.

    python benchmarks/bench_train_gpu.py [--backbone resnet50] [--batch 64] [--steps 30]
        [--json figures.json] [--no-compile]

On CUDA: BoT with a ResNet-50 at 256x128, P x K batch of random images (no data loading,
so this measures the model step: forward under autocast, loss in fp32, backward, Adam),
then extraction (forward only, batch 4x). Variants, each timed after warm-up steps:

- ``fp32``: eager, float32 (TF32 matmuls off, the honest fp32 baseline);
- ``bf16+channels_last``: bf16 autocast, channels_last weights and inputs;
- ``bf16+channels_last+compile``: the same model through ``torch.compile``.

Prints images/s and peak allocated memory (``torch.cuda.max_memory_allocated``) of each,
and the ratios to ``fp32``. Without CUDA it runs a tiny CPU version (ResNet-18, 64x32, a
few steps, no compile) and says so; those numbers only show that the code path works.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch

from reidkit.config import load_config
from reidkit.engine.optim import build_optimizer, build_param_groups
from reidkit.methods import build_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_float(x):
    """Loss inputs in float32 (autocast outputs may be bf16)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


def _takes_batch(model) -> bool:
    """True for the batch-dict method contract (``forward(batch)``), False for the
    tensor one (``forward(images)``)."""
    params = list(inspect.signature(model.forward).parameters)
    return bool(params) and params[0] == "batch"


def _forward_loss(model, x, pids, batch_contract: bool) -> torch.Tensor:
    if batch_contract:
        batch = {"images": x, "pids": pids, "camids": torch.zeros_like(pids)}
        out = model(batch)
        losses = model.compute_loss(_to_float(out), batch)
    else:
        out = model(x)
        losses = model.compute_loss(_to_float(out), pids)
    return sum(losses.values()) if isinstance(losses, dict) else losses


def bench(cfg, device, dtype, channels_last, compile_model, batch, steps, warmup) -> dict:
    torch.manual_seed(0)
    model = build_method(cfg, 751).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = build_optimizer(build_param_groups(model, cfg.solver), cfg.solver)
    contract = _takes_batch(model)
    runner = torch.compile(model) if compile_model else model
    k = cfg.data.num_instances
    x = torch.randn(batch, 3, cfg.data.height, cfg.data.width, device=device)
    x = x.contiguous(memory_format=fmt)
    pids = (torch.arange(batch, device=device) // k) % 751
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t0 = time.perf_counter()
    compile_s = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        if i == 1 and compile_model:
            _sync(device)
            compile_s = time.perf_counter() - t0
        with autocast:
            loss = _forward_loss(runner, x, pids, contract)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    train_ips = steps * batch / (time.perf_counter() - t0)
    peak_train = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    model.eval()
    xe = torch.randn(batch * 4, 3, cfg.data.height, cfg.data.width, device=device)
    xe = xe.contiguous(memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), autocast:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            runner({"images": xe} if contract else xe)
    _sync(device)
    extract_ips = steps * xe.shape[0] / (time.perf_counter() - t0)
    peak_ext = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "train_img_s": train_ips,
        "extract_img_s": extract_ips,
        "train_peak_mb": peak_train,
        "extract_peak_mb": peak_ext,
        "first_step_s": compile_s,
        "final_loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the compile variant")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these variants (names as printed)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
        backbone, h, w = args.backbone or "resnet50", 256, 128
        batch, steps, warmup = args.batch or 64, args.steps or 30, 5
        variants = [
            ("fp32", torch.float32, False, False),
            ("bf16+channels_last", torch.bfloat16, True, False),
        ]
        if not args.no_compile:
            variants.append(("bf16+channels_last+compile", torch.bfloat16, True, True))
        name = torch.cuda.get_device_name(device)
        print(f"device: {name}, torch {torch.__version__}")
    else:
        backbone, h, w = args.backbone or "resnet18", 64, 32
        batch, steps, warmup = args.batch or 8, args.steps or 2, 1
        variants = [("fp32", torch.float32, False, False), ("fp32+cl", torch.float32, True, False)]
        name = "cpu"
        print("CUDA not available: tiny CPU run (ResNet-18, 64x32) to check the code path only")
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
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
        f"BoT {backbone} {h}x{w}, train batch {batch}, extraction batch {4 * batch}, "
        f"{steps} timed steps after {warmup}"
    )
    results: dict[str, dict] = {}
    for label, dtype, cl, comp in variants:
        try:
            results[label] = bench(cfg, device, dtype, cl, comp, batch, steps, warmup)
        except Exception as exc:  # e.g. no compiler toolchain: report, keep the rest
            results[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"  {label:<28} failed: {results[label]['error']}")
            continue
        r = results[label]
        mem = f"peak {r['train_peak_mb']:7.0f} MB" if r["train_peak_mb"] is not None else ""
        print(
            f"  {label:<28} train {r['train_img_s']:8.1f} img/s {mem}   "
            f"extract {r['extract_img_s']:8.1f} img/s"
        )
    base = results.get(variants[0][0], {})
    for label in list(results)[1:]:
        r = results[label]
        if "error" in r or "error" in base:
            continue
        r["train_speedup"] = r["train_img_s"] / base["train_img_s"]
        r["extract_speedup"] = r["extract_img_s"] / base["extract_img_s"]
        print(
            f"  {label} / {variants[0][0]}: train x{r['train_speedup']:.2f}, "
            f"extract x{r['extract_speedup']:.2f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": name,
            "torch": torch.__version__,
            "model": f"bot {backbone} {h}x{w}",
            "batch": batch,
            "steps": steps,
            "variants": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
