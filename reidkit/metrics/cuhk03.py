"""CUHK03 classic protocol: single-gallery-shot CMC averaged over seeded repeats.

As in the classic CUHK03 evaluation (and torchreid's ``eval_cuhk03``): for each query,
same-pid same-camera gallery images are removed; then, in each of ``num_repeats``
repeats, **one** gallery image is drawn uniformly at random for every gallery identity
(independently per query), and the CMC is computed on that single-shot gallery. The CMC
is averaged over repeats, then over valid queries. AP and INP are computed on the full
(multi-shot) gallery, as torchreid does.

The draws come from a ``torch.Generator`` seeded with ``seed`` on the CPU, so results
are reproducible on any device; they are not the same draws as numpy's, so numbers
differ from torchreid's in the last digits (both estimate the same expectation).
Ties in distance are broken by gallery index, as everywhere in :mod:`reidkit.metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..threads import bounded_threads
from .distance import as_tensor
from .rank import (
    _CHUNK_ELEMENTS,
    EvalResult,
    _cmc_from_first_hits,
    _query_gallery_labels,
    evaluate_rank,
)

__all__ = ["evaluate_cuhk03_classic", "single_shot_ranks"]


def single_shot_ranks(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor | None,
    g_camids: torch.Tensor | None,
    rand: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of the true match in one single-shot draw, for a block of queries.

    Args:
        dist: ``(n, G)`` distances.
        q_pids, g_pids: ``(n,)`` / ``(G,)`` long labels.
        q_camids, g_camids: ``(n,)`` / ``(G,)`` camera ids, or None for no exclusion.
        rand: ``(n, G)`` float64 uniform keys in ``[0, 1)``; per query and gallery pid the
            kept image with the largest key is drawn.

    Returns:
        ``(ranks, valid)``: ``(n,)`` long 0-based rank of the drawn true match among the
        drawn images (stable by gallery index), and ``(n,)`` bool validity (the query
        has a true match after exclusion).
    """
    n, g = dist.shape
    same_pid = q_pids[:, None] == g_pids[None, :]
    kept = (
        torch.ones_like(same_pid)
        if q_camids is None
        else ~(same_pid & (q_camids[:, None] == g_camids[None, :]))
    )
    _, inv = torch.unique(g_pids, return_inverse=True)
    num_pids = int(inv.max()) + 1
    key = torch.where(kept, rand, torch.full_like(rand, -1.0))
    seg = torch.full((n, num_pids), -2.0, dtype=key.dtype, device=key.device)
    idx = inv[None, :].expand(n, g)
    seg.scatter_reduce_(1, idx, key, reduce="amax")
    drawn = kept & (key == seg.gather(1, idx))
    match = drawn & same_pid
    valid = match.any(1)
    dm = torch.where(match, dist, torch.full_like(dist, -math.inf)).amax(1, keepdim=True)
    km = match.to(torch.uint8).argmax(1, keepdim=True)
    col = torch.arange(g, device=dist.device)[None, :]
    before = drawn & ~match & ((dist < dm) | ((dist == dm) & (col < km)))
    return before.sum(1), valid


@bounded_threads
def evaluate_cuhk03_classic(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    max_rank: int = 50,
    num_repeats: int = 10,
    seed: int = 0,
) -> EvalResult:
    """CUHK03 classic single-gallery-shot CMC (mean of ``num_repeats`` seeded draws).

    Args:
        distmat: ``(Q, G)`` finite distances (numpy or torch, any device).
        q_pids, g_pids, q_camids, g_camids: labels as in
            :func:`~reidkit.metrics.evaluate_rank` (camids may both be None).
        max_rank: CMC length.
        num_repeats: number of random single-shot galleries (10 in the protocol).
        seed: seed of the draws.

    Returns:
        :class:`EvalResult` whose ``cmc`` is the single-shot CMC and whose ``mAP`` /
        ``mINP`` / ``all_AP`` come from the full gallery; ``extra`` records the protocol,
        repeats and seed.
    """
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
    full = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    dist = as_tensor(distmat, "distmat")
    if not torch.is_floating_point(dist) or dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    dev = dist.device
    nq, ng = dist.shape
    qp, gp, qc, gc = _query_gallery_labels(q_pids, g_pids, q_camids, g_camids, nq, ng, dev)
    gen = torch.Generator().manual_seed(int(seed))
    step = max(1, _CHUNK_ELEMENTS // ng)
    firsts = []
    for _ in range(num_repeats):
        for s in range(0, nq, step):
            d = dist[s : s + step]
            rand = torch.rand(d.shape, generator=gen, dtype=torch.float64).to(dev)
            ranks, valid = single_shot_ranks(
                d, qp[s : s + step], gp, None if qc is None else qc[s : s + step], gc, rand
            )
            firsts.append(ranks[valid])
    cmc = _cmc_from_first_hits(torch.cat(firsts), max_rank, ng, num_repeats * full.num_valid)
    full.cmc = cmc.cpu().numpy()
    full.extra = {"protocol": "cuhk03_classic", "num_repeats": int(num_repeats), "seed": int(seed)}
    return full
