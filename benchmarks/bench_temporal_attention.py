"""Benchmark: VRSTC temporal attention, chunked (reidkit) vs the full similarity matrix.

    nice -n 10 .venv/bin/python benchmarks/bench_temporal_attention.py            # 64x32, B=8, C=128
    nice -n 10 .venv/bin/python benchmarks/bench_temporal_attention.py --batch 16 --channels 128
    .venv/bin/python benchmarks/bench_temporal_attention.py --device cuda

The map size is STCnet's attention resolution for 256x128 frames (H/4 x W/4 = 64x32) and
C = 4 x width (width 32). For each variant: time and peak memory of a forward, and of a
forward + backward, each in a fresh process (CPU: peak RSS increase; CUDA:
``max_memory_allocated`` increase), and the largest difference to the reference.

- ``full``: the straightforward vectorised form (unfold both maps, one (B, HW, HW)
  similarity matrix, softmax, weighted sum): the simple reference.
- ``chunked``: ``temporal_attention`` (strips of rows under a 2^23-entry budget).
- ``chunked+ckpt``: the same with per-strip activation checkpointing in the backward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _synthetic import benchmark_parser, isolated, measure  # noqa: E402

from reidkit.models.stcnet import temporal_attention  # noqa: E402


def full_reference(cur: torch.Tensor, adj: torch.Tensor, patch: int = 3, scale: float = 10.0):
    b, c, h, w = cur.shape
    q = F.normalize(F.unfold(cur, patch, padding=patch // 2), dim=1)
    k = F.normalize(F.unfold(adj, patch, padding=patch // 2), dim=1)
    weights = torch.softmax(scale * torch.bmm(q.transpose(1, 2), k), dim=-1)
    return torch.bmm(adj.flatten(2), weights.transpose(1, 2)).view(b, c, h, w)


VARIANTS = {
    "full": lambda c, a: full_reference(c, a),
    "chunked": lambda c, a: temporal_attention(c, a),
    "chunked+ckpt": lambda c, a: temporal_attention(c, a, checkpoint=True),
}


def _inputs(batch, channels, h, w, device, grad):
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(batch, channels, h, w, generator=g).to(device).requires_grad_(grad)
    adj = torch.randn(batch, channels, h, w, generator=g).to(device).requires_grad_(grad)
    return cur, adj


def run(variant, batch, channels, h, w, device, backward):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cur, adj = _inputs(batch, channels, h, w, device, backward)
    fn = VARIANTS[variant]

    def call():
        out = fn(cur, adj)
        if backward:
            out.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return out.detach()

    if device == "cuda":
        call()  # warm-up (kernels, allocator)
        cur.grad = adj.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        import time

        t = time.perf_counter()
        out = call()
        sec = time.perf_counter() - t
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        sec, mem, out = measure(call)
    with torch.no_grad():
        ref = full_reference(cur.detach(), adj.detach())
        diff = (out - ref).abs().max().item()
    return sec, mem, diff


def main() -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--size", default="64x32", help="attention map H x W")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    print(
        f"temporal attention {h}x{w}, batch {args.batch}, {args.channels} channels, "
        f"device {args.device}; similarity matrix alone: "
        f"{args.batch * (h * w) ** 2 * 4 / 2**20:.0f} MB"
    )
    print(
        f"{'variant':<14}{'pass':<9}{'time s':>8}{'x full':>8}{'peak MB':>9}{'x full':>8}"
        f"{'max diff':>10}"
    )
    for backward in (False, True):
        ref = None
        for variant in VARIANTS:
            sec, mem, diff = isolated(
                run, variant, args.batch, args.channels, h, w, args.device, backward
            )
            ref = (sec, mem) if ref is None else ref
            print(
                f"{variant:<14}{'fwd+bwd' if backward else 'fwd':<9}{sec:>8.3f}"
                f"{sec / ref[0]:>8.2f}{mem:>9.0f}{mem / max(ref[1], 1e-9):>8.2f}{diff:>10.1e}"
            )


if __name__ == "__main__":
    main()
