"""Benchmark: exact ranking evaluation vs the usual per-query numpy loop, in the same run.

    nice -n 10 .venv/bin/python benchmarks/bench_eval.py                # Market size, 1 + default threads
    nice -n 10 .venv/bin/python benchmarks/bench_eval.py --busy         # + the second core busy
    nice -n 10 .venv/bin/python benchmarks/bench_eval.py --msmt         # + MSMT17 size, chunked

Market size: 3,368 queries x 19,732 gallery with Market's label structure (750 ids,
6 cameras, 2,798 pid-0 distractors, 3,819 pid -1 junk images) and synthetic features at
three difficulties (identity-clustered mAP ~91 %, realistic ~81 %, hard ~46 %), plus
random distances (the worst case: every entry can rank before a true match). For each
torch thread setting (``--threads``, default: 1 and torch's default) it prints the time of
``evaluate_rank`` (best of 3, wall and CPU) against the naive loop timed in the same run,
the speed-up and the largest difference of the metrics. ``--memory`` adds the peak RSS
increase of each (measured in fresh processes). ``--busy`` repeats the clustered case with
a busy-loop process pinned to one of the usable cores (what another job on a shared
machine does to OpenMP threads).

MSMT size: ``evaluate_features`` on 11,659 x 82,161 features (2,048-d by default) in
query chunks, against computing the full Q x G matrix first (what the usual toolkits
do); the naive loop runs on a subset of queries and is extrapolated.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _reference import naive_eval  # noqa: E402
from _synthetic import (  # noqa: E402
    benchmark_parser,
    busy_loop,
    isolated,
    market_like_labels,
    measure,
    msmt_like_labels,
    query_gallery_features,
)

from reidkit.metrics import compute_distance, evaluate_features, evaluate_rank  # noqa: E402
from reidkit.threads import thread_limit, usable_cores  # noqa: E402

CASES = {"clustered": 1.26, "realistic": 1.35, "hard": 1.6, "random": None}


def _market_problem(case: str):
    qp, qc, gp, gc = market_like_labels()
    noise = CASES[case]
    if noise is None:
        dist = torch.rand(len(qp), len(gp), generator=torch.Generator().manual_seed(0))
    else:
        qf, gf = query_gallery_features(qp, gp, 128, noise)
        dist = compute_distance(qf, gf, "euclidean")
    return dist, qp, qc, gp, gc


def _timed(fn, repeat: int):
    """(best wall s, CPU s of that call, result)."""
    best = (float("inf"), 0.0)
    out = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        best = min(best, (w, c))
    return best[0], best[1], out


def _child_market(case: str, which: str, threads: int, n: int):
    torch.set_num_threads(threads)
    dist, qp, qc, gp, gc = _market_problem(case)
    if which == "fast":
        sec, mem, _ = measure(lambda: evaluate_rank(dist, qp, gp, qc, gc))
    else:
        d = dist.numpy()
        sec, mem, _ = measure(lambda: naive_eval(d[:n], qp[:n], gp, qc[:n], gc))
    return sec, mem


def _diff(r, ref) -> float:
    cmc, m_ap, m_inp, *_ = ref
    return max(abs(r.mAP - m_ap), abs(r.mINP - m_inp), float(np.abs(r.cmc - cmc).max()))


def run_case(case: str, threads: int, naive_queries: int | None, memory: bool, label: str = ""):
    """One line: evaluate_rank vs the naive loop on the same matrix, in this process."""
    torch.set_num_threads(threads)
    dist, qp, qc, gp, gc = _market_problem(case)
    evaluate_rank(dist, qp, gp, qc, gc)  # warm-up
    used = min(threads, thread_limit())  # the library's limit (other busy processes count)
    t_fast, c_fast, res = _timed(lambda: evaluate_rank(dist, qp, gp, qc, gc), 3)
    n = min(naive_queries or len(qp), len(qp))
    d_np = dist.numpy()
    t_naive, c_naive, ref = _timed(
        lambda: naive_eval(d_np[:n], qp[:n], gp, qc[:n], gc, max_rank=50), 1
    )
    t_naive, c_naive = t_naive * len(qp) / n, c_naive * len(qp) / n
    sub = res if n == len(qp) else evaluate_rank(dist[:n], qp[:n], gp, qc[:n], gc)
    extra = f" (extrapolated from {n} queries)" if n < len(qp) else ""
    mem = ""
    if memory:
        _, mem_fast = isolated(_child_market, case, "fast", threads, n)
        _, mem_naive = isolated(_child_market, case, "naive", threads, n)
        mem = f" | peak RSS +{mem_fast:.0f} MB vs +{mem_naive:.0f} MB"
    print(
        f"  {case + label:18s} mAP {res.mAP * 100:6.2f} mINP {res.mINP * 100:6.2f} [{used} thr]"
        f" | evaluate_rank {t_fast:6.3f} s (CPU {c_fast:6.3f})"
        f" | naive loop {t_naive:6.2f} s (CPU {c_naive:6.2f}){extra}"
        f" | speed-up {t_naive / t_fast:5.1f}x (CPU {c_naive / c_fast:5.1f}x)"
        f" | max |diff| {_diff(sub, ref):.1e}{mem}",
        flush=True,
    )
    return t_fast, t_naive


def market(naive_queries: int | None, threads: list[int], memory: bool, busy: bool) -> None:
    print(
        f"Market-1501 size: 3368 x 19732; usable cores {usable_cores()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for t in threads:
        print(f" torch threads {t}")
        for case in CASES:
            run_case(case, t, naive_queries, memory)
    if busy:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        t = max(threads)
        print(f" torch threads {t}, a busy-loop process pinned to core {cores[-1]}")
        proc = busy_loop(cores[-1])
        try:
            time.sleep(0.5)
            run_case("clustered", t, naive_queries, False, " (busy)")
        finally:
            proc.kill()
            proc.wait()


def _msmt_features(dim: int):
    qp, qc, gp, gc = msmt_like_labels()
    noise = 3.5 if dim >= 1024 else 1.3  # a non-trivial regime (mAP well below 100 %)
    qf, gf = query_gallery_features(qp, gp, dim, noise)
    return qf, gf, qp, qc, gp, gc


def _child_msmt(dim: int, which: str, threads: int):
    torch.set_num_threads(threads)
    qf, gf, qp, qc, gp, gc = _msmt_features(dim)
    if which == "chunked":
        sec, mem, res = measure(lambda: evaluate_features(qf, gf, qp, gp, qc, gc, "cosine"))
        return sec, mem, res.mAP, res.cmc[0], res.mINP, None

    def full():
        d = compute_distance(qf, gf, "cosine")
        return d, evaluate_rank(d, qp, gp, qc, gc)

    sec, mem, (d, res) = measure(full)
    n = 200
    d_np = d.numpy()
    t0 = time.perf_counter()
    naive_eval(d_np[:n], qp[:n], gp, qc[:n], gc)
    t_naive = (time.perf_counter() - t0) * len(qp) / n
    return sec, mem, res.mAP, res.cmc[0], res.mINP, t_naive


def msmt(dim: int, threads: int, skip_full: bool = False) -> None:
    feat_mb = (11659 + 82161) * dim * 4 / 2**20
    print(
        f"MSMT17 size: 11659 x 82161, {dim}-d float32 features ({feat_mb:.0f} MB), threads {threads}"
    )
    t, mem, m_ap, r1, m_inp, _ = isolated(_child_msmt, dim, "chunked", threads)
    print(
        f"  evaluate_features (chunked):   {t:7.1f} s, peak RSS +{mem:6.0f} MB beyond the features"
        f" (mAP {m_ap * 100:.2f}, R1 {r1 * 100:.2f}, mINP {m_inp * 100:.2f})"
    )
    if skip_full:
        return
    t2, mem2, m_ap2, _, _, t_naive = isolated(_child_msmt, dim, "full", threads)
    print(
        f"  full Q x G matrix + evaluate_rank: {t2:7.1f} s, peak RSS +{mem2:6.0f} MB (mAP {m_ap2 * 100:.2f})"
    )
    print(
        f"  naive per-query loop on that matrix: ~{t_naive:7.1f} s (extrapolated from 200 queries)"
    )


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread settings to run (default: 1 and torch's default)",
    )
    ap.add_argument(
        "--naive-queries",
        type=int,
        default=None,
        help="run the naive loop on this many queries and extrapolate (default: all)",
    )
    ap.add_argument("--memory", action="store_true", help="also peak RSS, in fresh processes")
    ap.add_argument("--busy", action="store_true", help="clustered case with a busy core too")
    ap.add_argument(
        "--msmt", action="store_true", help="also run the MSMT17-size chunked benchmark"
    )
    ap.add_argument("--msmt-dim", type=int, default=2048)
    ap.add_argument("--skip-market", action="store_true")
    ap.add_argument("--msmt-skip-full", action="store_true", help="skip the full-matrix reference")
    args = ap.parse_args()
    threads = args.threads or sorted({1, torch.get_num_threads()})
    if not args.skip_market:
        market(args.naive_queries, threads, args.memory, args.busy)
    if args.msmt:
        msmt(args.msmt_dim, max(threads), args.msmt_skip_full)


if __name__ == "__main__":
    main()
