"""Benchmark: recall@k and queries/second of approximate FAISS indexes vs exact search.

    nice -n 10 .venv/bin/python benchmarks/bench_retrieval.py
    nice -n 10 .venv/bin/python benchmarks/bench_retrieval.py --gallery 200000 --dim 512

Synthetic re-ID-like features (identity centres + noise, L2-normalised). Exact search
(``kind="flat"``) is the reference: recall@k = fraction of its top-k found by the
approximate index. Also checks that the flat index equals torch brute force.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _synthetic import benchmark_parser, features_for  # noqa: E402

from reidkit.retrieval import GalleryIndex  # noqa: E402


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(
        np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), exact.tolist())])
    )


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--noise", type=float, default=0.8, help="feature noise (0.8: tight identity clusters)"
    )
    ap.add_argument("--threads", type=int, default=1, help="FAISS / torch threads")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    num_ids = max(10, args.gallery // 20)
    gp = rng.integers(1, num_ids + 1, args.gallery)
    qp = rng.integers(1, num_ids + 1, args.queries)
    gf, centers = features_for(gp, args.dim, args.noise, seed=1)
    qf, _ = features_for(qp, args.dim, args.noise, seed=2, centers=centers)
    gf, qf = gf.numpy(), qf.numpy()
    print(
        f"gallery {args.gallery} x {args.dim}-d, {args.queries} queries, k={args.k}, threads {args.threads}"
    )

    t0 = time.perf_counter()
    flat = GalleryIndex.build(gf, pids=gp, kind="flat")
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = flat.search(qf, args.k)
    t_flat = time.perf_counter() - t0
    brute = torch.topk(torch.from_numpy(qf) @ torch.from_numpy(gf).T, args.k, dim=1).indices.numpy()
    print(
        f"  {'flat (exact)':28s} build {build:6.1f} s | {args.queries / t_flat:9.0f} q/s | "
        f"recall@{args.k} 1.000 | equals brute force: {recall_at_k(exact.indices, brute) == 1.0}"
    )

    nlist = int(4 * np.sqrt(args.gallery))
    m = 32 if args.dim % 32 == 0 else 16
    configs = [
        ("ivf", dict(nlist=nlist), [1, 8, 32]),
        ("ivfpq", dict(nlist=nlist, m=m, nbits=8), [8, 32]),
        ("ivfpq", dict(nlist=nlist, m=m, nbits=8, refine=True), [8, 32]),
    ]
    for kind, kw, probes in configs:
        t0 = time.perf_counter()
        index = GalleryIndex.build(gf, pids=gp, kind=kind, **kw)
        build = time.perf_counter() - t0
        for nprobe in probes:
            index.set_nprobe(nprobe)
            t0 = time.perf_counter()
            res = index.search(qf, args.k)
            t = time.perf_counter() - t0
            name = f"{kind}{'+refine' if kw.get('refine') else ''} nlist={nlist} nprobe={nprobe}"
            print(
                f"  {name:28s} build {build:6.1f} s | {args.queries / t:9.0f} q/s | "
                f"recall@{args.k} {recall_at_k(res.indices, exact.indices):.3f} | speed-up {t_flat / t:5.1f}x"
            )


if __name__ == "__main__":
    main()
