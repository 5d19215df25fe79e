"""k-reciprocal re-ranking against the original algorithm (dense numpy), alpha-QE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_reference import ref

import reidkit.metrics.rerank as rr
from reidkit.metrics import (
    RankAccumulator,
    average_query_expansion,
    compute_distance,
    evaluate_rank,
    iter_re_ranking_features,
    re_ranking,
    re_ranking_features,
)

torch.set_num_threads(1)


def _features(nq, ng, dim, seed, num_ids=None):
    """Clustered features (identities) so that k-reciprocal sets are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    num_ids = num_ids or max(2, (nq + ng) // 6)
    centers = torch.randn(num_ids, dim, generator=g, dtype=torch.float64)
    qp = torch.randint(0, num_ids, (nq,), generator=g)
    gp = torch.randint(0, num_ids, (ng,), generator=g)
    qf = centers[qp] + 0.7 * torch.randn(nq, dim, generator=g, dtype=torch.float64)
    gf = centers[gp] + 0.7 * torch.randn(ng, dim, generator=g, dtype=torch.float64)
    return qf, gf, qp, gp


def _dists(qf, gf, metric="euclidean"):
    return (
        compute_distance(qf, gf, metric).numpy(),
        compute_distance(qf, qf, metric).numpy(),
        compute_distance(gf, gf, metric).numpy(),
    )


@pytest.mark.parametrize(
    "nq,ng,k1,k2,lam",
    [
        (12, 60, 20, 6, 0.3),  # the defaults
        (30, 120, 20, 6, 0.3),
        (8, 40, 5, 1, 0.3),  # k2 = 1: no local query expansion
        (10, 50, 7, 3, 0.0),  # Jaccard only
        (10, 50, 4, 2, 1.0),  # original distance only
        (5, 9, 3, 2, 0.5),
    ],
)
def test_dense_equals_original_algorithm(nq, ng, k1, k2, lam):
    qf, gf, _, _ = _features(nq, ng, 16, seed=nq * 100 + ng)
    qg, qq, gg = _dists(qf, gf)
    expected = ref.naive_re_ranking(qg, qq, gg, k1, k2, lam)
    out = re_ranking(qg, qq, gg, k1, k2, lam)
    assert isinstance(out, np.ndarray) and out.shape == (nq, ng) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    # torch in -> torch out, same values
    out_t = re_ranking(
        torch.from_numpy(qg), torch.from_numpy(qq), torch.from_numpy(gg), k1, k2, lam
    )
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out, atol=1e-6)


def test_dense_follows_original_transpose_semantics_on_asymmetric_input():
    rng = np.random.default_rng(0)
    nq, ng = 7, 30
    qg = rng.random((nq, ng)) + 0.1
    qq = rng.random((nq, nq)) + 0.1
    gg = rng.random((ng, ng)) + 0.1
    expected = ref.naive_re_ranking(qg, qq, gg, 6, 3, 0.3)
    np.testing.assert_allclose(re_ranking(qg, qq, gg, 6, 3, 0.3), expected, atol=1e-5)


def test_rerank_improves_a_clustered_problem():
    qf, gf, qp, gp = _features(40, 200, 8, seed=7, num_ids=20)
    qg, qq, gg = _dists(qf, gf)
    before = evaluate_rank(qg, qp, gp)
    after = evaluate_rank(re_ranking(qg, qq, gg), qp, gp)
    assert after.mAP > before.mAP


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_features_version_equals_dense(metric, monkeypatch):
    qf, gf, _, _ = _features(25, 110, 12, seed=3)
    qf, gf = qf.float(), gf.float()
    qg, qq, gg = _dists(qf, gf, metric)
    dense = re_ranking(qg, qq, gg, 20, 6, 0.3)
    sparse = re_ranking_features(qf, gf, 20, 6, 0.3, metric=metric)
    np.testing.assert_allclose(sparse.numpy(), dense, atol=1e-5)
    # small chunks and a tiny pair budget exercise every chunked loop
    monkeypatch.setattr(rr, "_PAIR_BUDGET", 97)
    monkeypatch.setattr(rr, "_BITMAP_MAX", 0)  # binary-search membership path
    small = re_ranking_features(qf, gf, 20, 6, 0.3, metric=metric, chunk_size=7)
    np.testing.assert_allclose(small.numpy(), dense, atol=1e-5)
    dense_small = re_ranking(qg, qq, gg, 20, 6, 0.3)
    np.testing.assert_allclose(dense_small, dense, atol=1e-6)


def test_features_blocks_feed_the_rank_accumulator():
    qf, gf, qp, gp = _features(20, 90, 8, seed=11)
    qc, gc = torch.zeros(20, dtype=torch.long), torch.ones(90, dtype=torch.long)
    full = evaluate_rank(re_ranking_features(qf, gf), qp, gp, qc, gc)
    acc = RankAccumulator(gp, gc)
    for s, block in iter_re_ranking_features(qf, gf, chunk_size=6):
        acc.update(block, qp[s : s + block.shape[0]], qc[s : s + block.shape[0]])
    r = acc.result()
    np.testing.assert_allclose(r.cmc, full.cmc)
    assert r.mAP == pytest.approx(full.mAP, abs=1e-12)


def test_stable_topk_matches_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, 5, (50, 40), generator=g).float()
    for k in (1, 3, 10, 40):
        expected = torch.sort(d, dim=1, stable=True).indices[:, :k]
        assert torch.equal(rr.stable_topk_smallest(d, k), expected)
    d = torch.rand(20, 30, generator=g)
    assert torch.equal(rr.stable_topk_smallest(d, 5), torch.argsort(d, dim=1)[:, :5])


def test_validation():
    qg, qq, gg = np.ones((2, 3)), np.ones((2, 2)), np.ones((3, 3))
    with pytest.raises(ValueError, match="q_q_dist"):
        re_ranking(qg, np.ones((3, 3)), gg)
    with pytest.raises(ValueError, match="must not exceed"):
        re_ranking(qg, qq, gg, k1=20)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking(qg, qq, gg, k1=2, lambda_value=1.5)
    bad = qg.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        re_ranking(bad, qq, gg, k1=2, k2=2)
    with pytest.raises(ValueError, match="share D"):
        re_ranking_features(torch.ones(2, 3), torch.ones(3, 4), k1=2)


# ----------------------------------------------------------------------------- alpha-QE
def _naive_qe(q, g, k, alpha):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for x in q:
        sims = g @ x
        top = np.argsort(-sims, kind="stable")[:k]
        w = np.maximum(sims[top], 0) ** alpha if alpha > 0 else np.ones(k)
        y = x + (w[:, None] * g[top]).sum(0)
        out.append(y / np.linalg.norm(y))
    return np.array(out)


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_alpha_query_expansion_matches_naive(alpha):
    rng = np.random.default_rng(4)
    q, g = rng.normal(size=(6, 5)), rng.normal(size=(15, 5))
    q2, g2 = average_query_expansion(q, g, k=4, alpha=alpha, chunk_size=4)
    np.testing.assert_allclose(q2.numpy(), _naive_qe(q, g, 4, alpha), atol=1e-5)
    np.testing.assert_allclose(g2.numpy(), g / np.linalg.norm(g, axis=1, keepdims=True), atol=1e-6)
    _, g3 = average_query_expansion(q, g, k=4, alpha=alpha, expand_gallery=True)
    np.testing.assert_allclose(g3.numpy(), _naive_qe(g, g, 4, alpha), atol=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        average_query_expansion(q, g, k=16)


def test_evaluate_features_with_rerank_equals_dense_pipeline():
    from reidkit.metrics import evaluate_features

    qf, gf, qp, gp = _features(15, 70, 8, seed=21)
    qf, gf = qf.float(), gf.float()
    qg, qq, gg = _dists(qf, gf, "cosine")
    expected = evaluate_rank(re_ranking(qg, qq, gg, 10, 4, 0.2), qp, gp)
    r = evaluate_features(
        qf, gf, qp, gp, metric="cosine", rerank=True, rerank_k1=10, rerank_k2=4, rerank_lambda=0.2
    )
    np.testing.assert_allclose(r.cmc, expected.cmc)
    assert r.mAP == pytest.approx(expected.mAP, abs=1e-6)


def test_inputs_are_not_modified_and_blocks_do_not_matter(monkeypatch):
    qf, gf, _, _ = _features(20, 70, 8, seed=5)
    qg, qq, gg = (x.astype(np.float32) for x in _dists(qf, gf))
    copies = [x.copy() for x in (qg, qq, gg)]
    out = re_ranking(qg, qq, gg)
    for x, c in zip((qg, qq, gg), copies):
        np.testing.assert_array_equal(x, c)
    t = torch.from_numpy(qg)
    re_ranking(t, torch.from_numpy(qq), torch.from_numpy(gg))
    np.testing.assert_array_equal(t.numpy(), copies[0])
    # row blocks and transposed tiles of any size give the same result
    monkeypatch.setattr(rr, "_BLOCK_ELEMENTS", 3 * 90)
    monkeypatch.setattr(rr, "_TILE", 7)
    np.testing.assert_array_equal(re_ranking(qg, qq, gg), out)
