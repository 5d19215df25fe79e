"""Benchmark: CAN top-k re-scoring of a Market-1501-size evaluation on CPU.

    nice -n 10 .venv/bin/python benchmarks/bench_pairwise.py                   # 3,368 x 19,732
    nice -n 10 .venv/bin/python benchmarks/bench_pairwise.py --threads 1 2
    nice -n 10 .venv/bin/python benchmarks/bench_pairwise.py --size 500x4000 --naive-queries 20

Market-1501's label structure (``market_like_labels``), the sizes reidkit stores: 2,048-d
float32 vectors (ResNet-50 BoT) and ``can_map`` 256 x 8 x 4 in float16 (16 KiB per image,
the ``model.can_reid`` defaults). Maps are identity centre + noise, so the scores are not
random; the ranking numbers only show that re-scoring does something, not how well CAN
works (that is docs/can.md's synthetic-set evidence).

Each measurement runs in a fresh (spawned) process, so peak-RSS readings are clean:

- ``vector``: the standard evaluator on the vectors (BoT; cosine), chunked;
- ``CAN top-k``: the standard evaluator with ``CanReID.pairwise_distance`` (vector distance,
  top-k per query, cross-attention on the k pairs in blocks of ``pair_chunk``, merge), the
  path ``reidkit eval`` takes;
- ``naive``: the reference in the same run: a per-query loop (numpy distances, a stable
  argsort, then ``CrossAttention.forward`` on one (query, gallery) pair at a time, the
  merged order) on ``--naive-queries`` queries, extrapolated linearly to all queries. Its
  rows are compared with the fast ones (largest |difference| of the returned distances
  and whether the rankings are identical).

Printed: wall time and peak RSS increase beyond the stored features, the time per 1,000
re-scored pairs, and the speed-up of the batched path over the naive loop.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _synthetic import (  # noqa: E402
    benchmark_parser,
    features_for,
    isolated,
    market_like_labels,
    measure,
)

from reidkit.config import load_config  # noqa: E402
from reidkit.engine.evaluator import evaluate_feature_sets  # noqa: E402
from reidkit.engine.extract import FeatureSet  # noqa: E402
from reidkit.methods.can_reid import CanReID  # noqa: E402
from reidkit.models import build_backbone  # noqa: E402
from reidkit.threads import usable_cores  # noqa: E402


def _labels(nq: int, ng: int):
    if (nq, ng) == (3368, 19732):
        return market_like_labels()
    scale = ng / 19732
    return market_like_labels(
        num_query=nq,
        num_gallery=ng,
        num_ids=max(10, int(750 * nq / 3368)),
        num_distractors=int(2798 * scale),
        num_junk=int(3819 * scale),
    )


def _maps(pids: np.ndarray, centers: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """float16 ``(N, d, gh, gw)``: the identity's centre map + noise (pid <= 0: noise only),
    written block by block so the float32 temporaries stay small."""
    g = torch.Generator().manual_seed(seed)
    n = len(pids)
    out = torch.empty(n, *centers.shape[1:], dtype=torch.float16)
    p = torch.as_tensor(pids)
    for s in range(0, n, 2048):
        blk = p[s : s + 2048]
        base = torch.where((blk > 0)[:, None, None, None], centers[blk.clamp_min(0)], 0.0)
        out[s : s + 2048] = (
            base + noise * torch.randn(len(blk), *centers.shape[1:], generator=g)
        ).half()
    return out


def _problem(nq: int, ng: int, args: dict):
    """Query / gallery FeatureSets; the noise levels make the ranking neither trivial nor
    random at these widths (``--vec-noise``, ``--map-noise``)."""
    qp, qc, gp, gc = _labels(nq, ng)
    dim, embed, grid = args["dim"], args["embed"], tuple(args["grid"])
    qf, centers = features_for(qp, dim, args["vec_noise"], seed=1)
    gf, _ = features_for(gp, dim, args["vec_noise"], seed=2, centers=centers)
    gen = torch.Generator().manual_seed(3)
    cm = torch.randn(int(max(qp.max(), gp.max())) + 2, embed, *grid, generator=gen)
    qm, gm = _maps(qp, cm, args["map_noise"], 4), _maps(gp, cm, args["map_noise"], 5)
    query = FeatureSet(qf, torch.as_tensor(qp), torch.as_tensor(qc), [], {"can_map": qm})
    gallery = FeatureSet(gf, torch.as_tensor(gp), torch.as_tensor(gc), [], {"can_map": gm})
    return query, gallery


def _model(embed: int, grid: tuple[int, int], topk: int, pair_chunk: int) -> CanReID:
    cfg = load_config(
        None,
        [
            "model.name=can_reid",
            f"model.can_reid.embed_dim={embed}",
            f"model.can_reid.grid=[{grid[0]},{grid[1]}]",
            f"model.can_reid.topk={topk}",
            f"model.can_reid.pair_chunk={pair_chunk}",
        ],
    )
    torch.manual_seed(0)
    return CanReID(cfg, 0, backbone=build_backbone("resnet18", width=8)).eval()


def _child(which: str, nq: int, ng: int, args: dict) -> dict:
    torch.set_num_threads(args["threads"])
    query, gallery = _problem(nq, ng, args)
    model = _model(args["embed"], tuple(args["grid"]), args["topk"], args["pair_chunk"])
    stored = sum(
        t.numel() * t.element_size()
        for fs in (query, gallery)
        for t in (fs.feats, *fs.extras.values())
    )
    maps = gallery.extras["can_map"]
    out: dict = {"stored_mb": stored / 2**20, "maps_mb": maps.numel() * 2 / 2**20}
    n = args["naive_queries"]
    cpu = time.process_time()
    if which == "vector":
        sec, mem, res = measure(lambda: evaluate_feature_sets(query, gallery, metric="cosine"))
    elif which == "fast":

        def run():
            with torch.no_grad():
                return evaluate_feature_sets(query, gallery, distance_fn=model.pairwise_distance)

        sec, mem, res = measure(run)
    else:
        t = time.perf_counter()
        out["rows"] = _naive_rows(model, query[:n], gallery)
        sec, mem, res = time.perf_counter() - t, float("nan"), None
    out.update(sec=sec, cpu=time.process_time() - cpu, mem=mem)
    if which == "fast":
        with torch.no_grad():
            out["rows"] = model.pairwise_distance(query[:n], gallery).numpy()
    if res is not None:
        out.update(mAP=res.metrics["mAP"], r1=res.metrics["rank1"])
    return out


@torch.no_grad()
def _naive_rows(model: CanReID, query: FeatureSet, gallery: FeatureSet) -> np.ndarray:
    """The straightforward per-query, per-pair computation (the reference)."""
    lam, k = model.opts.fuse_weight, model.opts.topk
    gf = gallery.feats.numpy().astype(np.float32)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    rows = []
    for i in range(len(query)):
        q = query.feats[i].numpy()
        qn = q / np.linalg.norm(q)
        vec = 1.0 - gn @ qn
        order = np.argsort(vec, kind="stable")
        top = order[:k]
        fused = np.empty(len(top))
        p = query.extras["can_map"][i : i + 1].float()
        for r, j in enumerate(top):
            att = model.cross_attention(p, gallery.extras["can_map"][j : j + 1].float())
            s = float(F.cosine_similarity(att.p_features, att.q_features)[0])
            fused[r] = (1 - lam) * vec[j] + lam * (1 - s)
        row = vec.copy()
        row[top[np.argsort(fused, kind="stable")]] = vec[top]
        rows.append(row)
    return np.stack(rows)


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--size", default="3368x19732", help="QxG (default: Market-1501 test)")
    ap.add_argument("--dim", type=int, default=2048, help="vector width (ResNet-50: 2048)")
    ap.add_argument("--embed", type=int, default=256, help="can_map channels (default 256)")
    ap.add_argument("--grid", type=int, nargs=2, default=[8, 4], help="can_map grid gh gw")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--pair-chunk", type=int, default=2048)
    ap.add_argument("--naive-queries", type=int, default=8, help="queries run by the reference")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--vec-noise", type=float, default=4.0, help="vector noise (difficulty)")
    ap.add_argument("--map-noise", type=float, default=2.5, help="map noise (difficulty)")
    args = ap.parse_args()
    nq, ng = (int(v) for v in args.size.lower().split("x"))
    k = min(args.topk, ng)
    print(
        f"usable cores {usable_cores()}, load average {os.getloadavg()[0]:.1f}; "
        f"{nq} queries x {ng} gallery, {args.dim}-d float32 vectors, can_map "
        f"{args.embed} x {args.grid[0]} x {args.grid[1]} float16, top-{k}, "
        f"pair_chunk {args.pair_chunk}"
    )
    for threads in args.threads:
        opts = dict(vars(args), threads=threads)
        vec = isolated(_child, "vector", nq, ng, opts)
        fast = isolated(_child, "fast", nq, ng, opts)
        naive = isolated(_child, "naive", nq, ng, opts)
        pairs = nq * k
        scale = nq / args.naive_queries
        fast_order = np.argsort(fast["rows"], 1, kind="stable")
        naive_order = np.argsort(naive["rows"], 1, kind="stable")
        same_top = bool((fast_order[:, :k] == naive_order[:, :k]).all())
        moved = 100 * float((fast_order != naive_order).mean())
        diff = float(np.abs(fast["rows"] - naive["rows"]).max())
        print(f"torch threads {threads}")
        print(
            f"  stored features: {fast['stored_mb']:.0f} MiB (of which gallery can_map "
            f"{fast['maps_mb']:.0f} MiB)"
        )
        print(
            f"  vector (BoT) evaluation:   {vec['sec']:7.1f} s wall {vec['cpu']:7.1f} s CPU, "
            f"peak RSS +{vec['mem']:4.0f} MiB; mAP {100 * vec['mAP']:.1f}, R1 {100 * vec['r1']:.1f}"
        )
        print(
            f"  CAN top-{k} evaluation:    {fast['sec']:7.1f} s wall {fast['cpu']:7.1f} s CPU, "
            f"peak RSS +{fast['mem']:4.0f} MiB; mAP {100 * fast['mAP']:.1f}, "
            f"R1 {100 * fast['r1']:.1f}; {1e6 * fast['cpu'] / pairs:.0f} us CPU per pair "
            f"({pairs:,} pairs)"
        )
        print(
            f"  naive per-pair loop:       {naive['sec']:7.1f} s wall {naive['cpu']:7.1f} s CPU for "
            f"{args.naive_queries} queries -> {naive['sec'] * scale:.0f} s wall, "
            f"{naive['cpu'] * scale:.0f} s CPU extrapolated to {nq}"
        )
        print(
            f"  speed-up {naive['sec'] * scale / fast['sec']:.1f}x wall, "
            f"{naive['cpu'] * scale / fast['cpu']:.1f}x CPU; first {args.naive_queries} rows: "
            f"max |diff| {diff:.1e}, top-{k} order identical: {same_top}, positions differing "
            f"below it (float near-ties of the vector distance): {moved:.3f} %",
            flush=True,
        )
    full = 19732 * 2048 * 16 * 8 * 4 / 2**30
    print(
        f"(the raw ResNet-50 maps, 2048 x 16 x 8 float32, would take {full:.1f} GiB for the "
        "Market gallery alone)"
    )


if __name__ == "__main__":
    main()
