"""Benchmark: k-reciprocal re-ranking vs the original dense numpy algorithm.

    nice -n 10 .venv/bin/python benchmarks/bench_rerank.py                  # 1,000 x 4,000
    nice -n 10 .venv/bin/python benchmarks/bench_rerank.py --sizes 2000x8000
    nice -n 10 .venv/bin/python benchmarks/bench_rerank.py --busy           # + a busy core
    nice -n 10 .venv/bin/python benchmarks/bench_rerank.py --msmt --msmt-dim 128

For each size and torch thread setting (``--threads``, default: 1 and torch's default):
``re_ranking`` (dense input, sparse inside) and ``re_ranking_features`` against the
straightforward transcription of the original public Python version
(``benchmarks/_reference.py``) on the same distances, each in a fresh process: wall and
CPU time, peak RSS increase, the speed-up in this run and the largest absolute difference
of the outputs. ``--busy`` adds a run of the default thread setting with a busy-loop
process pinned to one of the usable cores.

``--msmt``: ``iter_re_ranking_features`` + ``RankAccumulator`` on an MSMT17-size problem
(11,659 x 82,161); the Q x G result is never held. The cost is one (Q+G)^2 x D
neighbour pass; on a small CPU use a low ``--msmt-dim`` (memory does not depend on D
beyond the features).
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

from _reference import naive_re_ranking  # noqa: E402
from _synthetic import (  # noqa: E402
    benchmark_parser,
    busy_loop,
    isolated,
    measure,
    msmt_like_labels,
    query_gallery_features,
)

from reidkit.metrics import (  # noqa: E402
    RankAccumulator,
    compute_distance,
    evaluate_rank,
    iter_re_ranking_features,
    re_ranking,
    re_ranking_features,
)
from reidkit.threads import thread_limit, usable_cores  # noqa: E402


def _problem(nq: int, ng: int, dim: int = 256):
    rng = np.random.default_rng(0)
    num_ids = max(10, (nq + ng) // 16)
    qp = rng.integers(1, num_ids + 1, nq)
    gp = rng.integers(1, num_ids + 1, ng)
    qf, gf = query_gallery_features(qp, gp, dim, 1.9)  # mAP ~ 75 % before re-ranking
    return qf, gf, qp, gp


def _dists(qf, gf):
    return (
        compute_distance(qf, gf).numpy(),
        compute_distance(qf, qf).numpy(),
        compute_distance(gf, gf).numpy(),
    )


def _child(nq: int, ng: int, which: str, threads: int, repeat: int = 1):
    """(best wall s of ``repeat`` runs, its CPU s, peak RSS increase of the first, output)."""
    torch.set_num_threads(threads)
    qf, gf, qp, gp = _problem(nq, ng)
    if which == "features":
        fn = lambda: re_ranking_features(qf, gf).numpy()  # noqa: E731
    else:
        qg, qq, gg = _dists(qf, gf)
        algo = re_ranking if which == "fast" else naive_re_ranking
        fn = lambda: algo(qg, qq, gg)  # noqa: E731
    _, mem, out = measure(fn)
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best[0], best[1], mem, out


def dense_sizes(
    sizes: list[tuple[int, int]], threads: int, skip_naive: bool, label: str = ""
) -> None:
    for nq, ng in sizes:
        print(
            f"{nq} x {ng} (k1=20, k2=6, lambda=0.3), torch threads {threads}{label}; "
            f"library limit now {thread_limit()}"
        )
        t_fast, c_fast, m_fast, out = isolated(_child, nq, ng, "fast", threads, 3)
        t_feat, c_feat, m_feat, out_feat = isolated(_child, nq, ng, "features", threads, 2)
        print(
            f"  re_ranking (dense in):      {t_fast:7.2f} s (CPU {c_fast:6.2f}), peak RSS +{m_fast:6.0f} MB (best of 3)"
        )
        print(
            f"  re_ranking_features:        {t_feat:7.2f} s (CPU {c_feat:6.2f}), peak RSS +{m_feat:6.0f} MB (best of 2)"
        )
        if not skip_naive:
            t_ref, c_ref, m_ref, ref = isolated(_child, nq, ng, "naive", threads, 1)
            print(
                f"  original algorithm (numpy): {t_ref:7.2f} s (CPU {c_ref:6.2f}), peak RSS +{m_ref:6.0f} MB"
            )
            print(
                f"  speed-up {t_ref / t_fast:.1f}x (CPU {c_ref / c_fast:.1f}x) dense, "
                f"{t_ref / t_feat:.1f}x (CPU {c_ref / c_feat:.1f}x) features;"
                f" max |diff| {np.abs(out - ref).max():.1e} (dense), {np.abs(out_feat - ref).max():.1e} (features)",
                flush=True,
            )
        qf, gf, qp, gp = _problem(nq, ng)
        before = evaluate_rank(compute_distance(qf, gf), qp, gp)
        after = evaluate_rank(out, qp, gp)
        print(
            f"  mAP {before.mAP * 100:.2f} -> {after.mAP * 100:.2f} after re-ranking (no camera ids)"
        )


def _child_msmt(dim: int, threads: int, noise: float):
    torch.set_num_threads(threads)
    qp, qc, gp, gc = msmt_like_labels()
    qf, gf = query_gallery_features(qp, gp, dim, noise)

    def run():
        acc = RankAccumulator(gp, gc)
        for s, block in iter_re_ranking_features(qf, gf):
            acc.update(block, qp[s : s + block.shape[0]], qc[s : s + block.shape[0]])
        return acc.result()

    sec, mem, res = measure(run)
    return sec, mem, res.mAP, res.cmc[0]


def msmt(dim: int, threads: int, noise: float) -> None:
    print(
        f"MSMT17 size 11659 x 82161, {dim}-d features (noise {noise}), sparse re-ranking + chunked evaluation"
    )
    sec, mem, m_ap, r1 = isolated(_child_msmt, dim, threads, noise)
    print(
        f"  {sec:7.1f} s, peak RSS +{mem:6.0f} MB beyond the features; mAP {m_ap * 100:.2f}, R1 {r1 * 100:.2f}"
    )
    print(
        f"  (returning the dense Q x G float32 result instead adds {11659 * 82161 * 4 / 2**30:.1f} GB)"
    )


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--sizes", nargs="*", default=["1000x4000"], help="QxG sizes")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread settings (default: 1 and torch's default)",
    )
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--busy", action="store_true", help="also with a busy-loop process")
    ap.add_argument("--msmt", action="store_true")
    ap.add_argument("--msmt-dim", type=int, default=128)
    ap.add_argument("--msmt-noise", type=float, default=1.5, help="feature noise (difficulty)")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    threads = args.threads or sorted({1, torch.get_num_threads()})
    print(f"usable cores {usable_cores()}, load average {os.getloadavg()[0]:.1f}")
    if sizes:
        for t in threads:
            dense_sizes(sizes, t, args.skip_naive)
        if args.busy:
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
            proc = busy_loop(cores[-1])
            try:
                dense_sizes(sizes, max(threads), args.skip_naive, f", core {cores[-1]} busy")
            finally:
                proc.kill()
                proc.wait()
    if args.msmt:
        msmt(args.msmt_dim, max(threads), args.msmt_noise)


if __name__ == "__main__":
    main()
