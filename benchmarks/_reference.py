"""Naive reference implementations used by the tests and benchmarks.

These are deliberately straightforward per-query numpy loops written from the protocol
description (the evaluator found in torchreid / fast-reid / BoT / AGW), and a dense numpy
transcription of the original public k-reciprocal re-ranking algorithm (Zhong et al.,
CVPR 2017). They are slow on purpose: they are what the fast code is checked against.
"""

from __future__ import annotations

import numpy as np


def naive_eval(
    distmat,
    q_pids,
    g_pids,
    q_camids=None,
    g_camids=None,
    max_rank=50,
    ap_mode="standard",
    ignore_gallery_pids=(),
):
    """Per-query loop. Returns (cmc (max_rank,), mAP, mINP, all_AP, valid_mask)."""
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    nq, ng = distmat.shape
    all_cmc, all_ap, all_inp, valid = [], [], [], np.zeros(nq, dtype=bool)
    for qi in range(nq):
        order = np.argsort(distmat[qi], kind="stable")
        remove = np.zeros(ng, dtype=bool)
        if q_camids is not None:
            remove = (g_pids[order] == q_pids[qi]) & (np.asarray(g_camids)[order] == q_camids[qi])
        for p in ignore_gallery_pids:
            remove |= g_pids[order] == p
        keep = ~remove
        raw = (g_pids[order][keep] == q_pids[qi]).astype(np.int64)
        if not raw.any():
            continue
        valid[qi] = True
        cmc = raw.cumsum()
        pos = np.where(raw == 1)[0]
        all_inp.append(cmc[pos.max()] / (pos.max() + 1.0))
        cmc[cmc > 1] = 1
        full = np.ones(max_rank)  # a valid query's CMC is 1 from its first hit onwards
        full[: min(max_rank, len(cmc))] = cmc[:max_rank]
        all_cmc.append(full)
        num_rel = raw.sum()
        if ap_mode == "standard":
            tmp = raw.cumsum() / (np.arange(len(raw)) + 1.0)
            all_ap.append((tmp * raw).sum() / num_rel)
        else:  # official Market-1501 trapezoid rule
            ap = 0.0
            for i, r in enumerate(pos):
                prec = (i + 1) / (r + 1)
                old = i / r if r != 0 else 1.0
                ap += (old + prec) / 2 / num_rel
            all_ap.append(ap)
    if not all_cmc:
        return np.zeros(max_rank), 0.0, 0.0, np.zeros(0), valid
    cmc = np.asarray(all_cmc).mean(0)
    return cmc, float(np.mean(all_ap)), float(np.mean(all_inp)), np.asarray(all_ap), valid


def naive_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The original public Python k-reciprocal re-ranking, dense numpy (float32).

    Only change: the initial ranking uses a stable argsort (the original uses numpy's
    default quicksort; both agree on inputs without ties).
    """
    original_dist = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1),
        ],
        axis=0,
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    query_num = q_g_dist.shape[0]
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        fi = np.where(backward == i)[0]
        k_rec = forward[fi]
        k_exp = k_rec
        for cand in k_rec:
            kh = int(np.around(k1 / 2.0))
            cf = initial_rank[cand, : kh + 1]
            cb = initial_rank[cf, : kh + 1]
            cfi = np.where(cb == cand)[0]
            c_rec = cf[cfi]
            if len(np.intersect1d(c_rec, k_rec)) > 2.0 / 3 * len(c_rec):
                k_exp = np.append(k_exp, c_rec)
        k_exp = np.unique(k_exp)
        weight = np.exp(-original_dist[i, k_exp])
        V[i, k_exp] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        nz = np.where(V[i, :] != 0)[0]
        for j in nz:
            imgs = inv_index[j]
            temp_min[0, imgs] = temp_min[0, imgs] + np.minimum(V[i, j], V[imgs, j])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original_dist * lambda_value
    return final[:query_num, query_num:]
