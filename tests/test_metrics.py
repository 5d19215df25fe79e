"""Ranking evaluation: hand-worked cases, a naive per-query reference, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bench_reference import ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reidkit.metrics.rank as rank_mod
from reidkit.metrics import (
    EvalResult,
    RankAccumulator,
    compute_distance,
    evaluate_cuhk03_classic,
    evaluate_features,
    evaluate_market_official,
    evaluate_rank,
    format_metrics_table,
    plot_cmc,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------ hand-worked cases
# query: pid 1, camera 0. Gallery (index: pid, cam, distance):
# 0: 1,0,0.1 (same pid + camera: junk)  1: 2,1,0.2  2: 1,1,0.3  3: 3,2,0.4
# 4: 1,2,0.5  5: 2,0,0.6
HAND = dict(
    distmat=np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]),
    q_pids=np.array([1]),
    g_pids=np.array([1, 2, 1, 3, 1, 2]),
    q_camids=np.array([0]),
    g_camids=np.array([0, 1, 1, 2, 2, 0]),
)


def test_hand_worked_standard_protocol():
    r = evaluate_rank(**HAND, max_rank=5)
    # kept ranking: g1(x) g2(hit) g3(x) g4(hit) g5(x): hits at ranks 2 and 4
    assert r.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r.mINP == pytest.approx(2 / 4)
    np.testing.assert_allclose(r.cmc, [0, 1, 1, 1, 1])
    assert r.num_valid == 1 and r.first_hit.tolist() == [1]


def test_hand_worked_trapezoid_ap():
    r = evaluate_rank(**HAND, ap_mode="trapezoid")
    # hit 1 at rank 2: (p_prev=0/1 + 1/2)/2; hit 2 at rank 4: (1/3 + 2/4)/2; times 1/ngood
    assert r.mAP == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 1 / 2) / 2) / 2)
    assert r.mAP == pytest.approx(1 / 3)


def test_hand_worked_no_camera_mode_keeps_same_camera_images():
    h = dict(HAND, q_camids=None, g_camids=None)
    r = evaluate_rank(**h, max_rank=3)
    # nothing removed: hits at ranks 1, 3, 5
    assert r.mAP == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert r.mINP == pytest.approx(3 / 5)
    np.testing.assert_allclose(r.cmc, [1, 1, 1])


def test_ties_are_broken_by_gallery_index():
    d = np.array([[0.5, 0.5]])
    r1 = evaluate_rank(d, [1], [2, 1], [0], [1, 1])
    r2 = evaluate_rank(d, [1], [1, 2], [0], [1, 1])
    assert r1.mAP == pytest.approx(0.5) and r1.cmc[0] == 0.0
    assert r2.mAP == pytest.approx(1.0) and r2.cmc[0] == 1.0


def test_max_rank_beyond_kept_gallery_is_well_defined():
    # 3 gallery images, one removed as junk: only 2 kept, max_rank 10
    d = np.array([[0.3, 0.2, 0.1]])
    r = evaluate_rank(d, [1], [1, 1, 2], [0], [0, 1, 1], max_rank=10)
    assert r.cmc.shape == (10,)
    np.testing.assert_allclose(r.cmc, [0] + [1] * 9)
    assert r.rank(10) == 1.0
    huge = evaluate_rank(d, [1], [1, 1, 2], [0], [0, 1, 1], max_rank=100_000)
    assert huge.cmc.shape == (100_000,) and huge.cmc[0] == 0.0 and huge.cmc[1:].min() == 1.0


def test_queries_without_matches_are_skipped():
    d = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    # query 1 (pid 9) has no gallery image; query 2's only match is same-camera junk
    r = evaluate_rank(d, [1, 9, 2], [1, 2], [0, 0, 1], [1, 1])
    assert r.num_valid == 1 and r.valid.tolist() == [True, False, False]
    assert r.all_AP.shape == (1,) and r.num_query == 3


def test_ignore_gallery_pids_and_market_official():
    d = np.array([[0.1, 0.2, 0.3]])
    # the pid -1 image ranks first; the official protocol removes it
    r_std = evaluate_rank(d, [1], [-1, 2, 1], [0], [1, 1, 1])
    r_off = evaluate_market_official(d, [1], [-1, 2, 1], [0], [1, 1, 1])
    assert r_std.mAP == pytest.approx(1 / 3)
    # trapezoid, single hit at rank 2: precision before it 0/1, at it 1/2
    assert r_off.mAP == pytest.approx((0 / 1 + 1 / 2) / 2)
    assert r_off.ap_mode == "trapezoid"


# -------------------------------------------------------------- property tests (naive)
@st.composite
def problems(draw):
    nq = draw(st.integers(1, 8))
    ng = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    num_ids = draw(st.integers(1, 6))
    num_cams = draw(st.integers(1, 3))  # 1: a single camera, every same-pid image is junk
    q_pids = rng.integers(1, num_ids + 1, nq)
    # gallery: ids, pid 0 distractors, pid -1 junk images, ids absent from the queries
    g_pids = rng.integers(-1, num_ids + 3, ng)
    q_camids = rng.integers(0, num_cams, nq)
    g_camids = rng.integers(0, num_cams, ng)
    if draw(st.booleans()):  # many ties
        dist = rng.integers(0, 4, (nq, ng)).astype(np.float64)
    else:
        dist = rng.random((nq, ng))
    return dist, q_pids, g_pids, q_camids, g_camids


def _naive_or_none(*args, **kw):
    *out, valid = ref.naive_eval(*args, **kw)
    return None if not valid.any() else (*out, valid)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    problems(),
    st.booleans(),
    st.sampled_from(["standard", "trapezoid"]),
    st.sampled_from([np.float64, np.float32]),
    st.sampled_from([-1.0, 2.0, 0.3]),  # force the dense / the compacted path / automatic
    st.integers(1, 5),
    st.integers(1, 60),
    st.booleans(),
)
def test_matches_naive_reference(
    problem, use_cams, ap_mode, dtype, dense_frac, chunk, max_rank, junk
):
    dist, qp, gp, qc, gc = problem
    dist = dist.astype(dtype)
    cams = (qc, gc) if use_cams else (None, None)
    ignore = (-1,) if junk else ()
    expected = _naive_or_none(
        dist, qp, gp, *cams, max_rank=max_rank, ap_mode=ap_mode, ignore_gallery_pids=ignore
    )
    kwargs = dict(ap_mode=ap_mode, ignore_gallery_pids=ignore, chunk_size=chunk)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rank_mod, "_DENSE_FRACTION", dense_frac)
        if expected is None:
            with pytest.raises(ValueError, match="none of the"):
                evaluate_rank(dist, qp, gp, *cams, max_rank, **kwargs)
            return
        r = evaluate_rank(dist, qp, gp, *cams, max_rank, **kwargs)
    cmc, m_ap, m_inp, all_ap, valid = expected
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)
    assert r.mAP == pytest.approx(m_ap, abs=1e-12)
    assert r.mINP == pytest.approx(m_inp, abs=1e-12)
    np.testing.assert_allclose(r.all_AP, all_ap, atol=1e-12)
    assert r.valid.tolist() == valid.tolist()
    assert 0.0 < r.mAP <= 1.0 and 0.0 < r.mINP <= 1.0


def test_larger_problem_with_market_structure_matches_naive():
    rng = np.random.default_rng(3)
    nq, ng = 60, 900
    qp = rng.integers(1, 40, nq)
    gp = np.concatenate([rng.integers(1, 40, 700), np.zeros(100, int), -np.ones(100, int)])
    qc, gc = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    centers = rng.normal(size=(41, 16))
    qf = centers[qp] + 0.8 * rng.normal(size=(nq, 16))
    gf = centers[np.clip(gp, 0, None)] + 0.8 * rng.normal(size=(ng, 16))
    d = compute_distance(qf, gf, "euclidean").numpy()
    cmc, m_ap, m_inp, all_ap, _ = ref.naive_eval(d, qp, gp, qc, gc, max_rank=50)
    r = evaluate_rank(torch.from_numpy(d), torch.from_numpy(qp), gp, qc, gc)
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)
    assert r.mAP == pytest.approx(m_ap, abs=1e-9) and r.mINP == pytest.approx(m_inp, abs=1e-9)
    # a non-trivial regime: neither perfect nor random
    assert 0.2 < r.mAP < 0.95


# ---------------------------------------------------------------------------- inputs
def test_validation_errors_name_the_problem():
    d = np.zeros((2, 3))
    with pytest.raises(ValueError, match="q_pids.*expected 2"):
        evaluate_rank(d, [1], [1, 2, 3])
    with pytest.raises(ValueError, match="g_camids.*expected 3"):
        evaluate_rank(d, [1, 2], [1, 2, 3], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="both be given or both be None"):
        evaluate_rank(d, [1, 2], [1, 2, 3], [0, 0], None)
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(np.zeros(3), [1], [1, 2, 3])
    with pytest.raises(ValueError, match="query set is empty"):
        evaluate_rank(np.zeros((0, 3)), [], [1, 2, 3])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(d, [1, 2], [1, 2, 3], max_rank=0)
    with pytest.raises(ValueError, match="ap_mode"):
        evaluate_rank(d, [1, 2], [1, 2, 3], ap_mode="11point")
    with pytest.raises(ValueError, match="integers"):
        evaluate_rank(d, [1.5, 2], [1, 2, 3])
    for bad in (math.nan, math.inf, -math.inf):
        d2 = np.ones((2, 3))
        d2[1, 2] = bad
        with pytest.raises(ValueError, match=r"non-finite.*query 1, gallery 2"):
            evaluate_rank(d2, [1, 2], [1, 2, 3])


def test_torch_inputs_and_float_labels_match_numpy():
    rng = np.random.default_rng(0)
    d = rng.random((5, 20)).astype(np.float32)
    qp, gp = rng.integers(0, 4, 5), rng.integers(0, 4, 20)
    qc, gc = rng.integers(0, 2, 5), rng.integers(0, 2, 20)
    a = evaluate_rank(d, qp, gp, qc, gc)
    b = evaluate_rank(torch.from_numpy(d), torch.from_numpy(qp).float(), list(gp), qc, gc)
    np.testing.assert_allclose(a.cmc, b.cmc)
    assert a.mAP == b.mAP and a.mINP == b.mINP


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    d = torch.rand(30, 200)
    qp, gp = rng.integers(0, 10, 30), rng.integers(0, 10, 200)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 200)
    a = evaluate_rank(d, qp, gp, qc, gc)
    b = evaluate_rank(d.cuda(), qp, gp, qc, gc)
    np.testing.assert_allclose(a.cmc, b.cmc)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-12)


# --------------------------------------------------------------------------- features
def test_compute_distance_matches_naive_loops():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(4, 7)), rng.normal(size=(5, 7))
    eu = np.array([[np.linalg.norm(a - b) for b in g] for a in q])
    co = np.array([[1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in g] for a in q])
    np.testing.assert_allclose(compute_distance(q, g, "euclidean").numpy(), eu, atol=1e-10)
    np.testing.assert_allclose(compute_distance(q, g, "sqeuclidean").numpy(), eu**2, atol=1e-10)
    np.testing.assert_allclose(compute_distance(q, g, "cosine").numpy(), co, atol=1e-10)
    # float32 in, float32 out, true (not squared) Euclidean
    d32 = compute_distance(torch.ones(1, 4), torch.zeros(1, 4))
    assert d32.dtype == torch.float32 and d32.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="metric"):
        compute_distance(q, g, "manhattan")
    with pytest.raises(ValueError, match="dimension"):
        compute_distance(q, g[:, :3])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_evaluate_features_equals_evaluate_rank(metric):
    rng = np.random.default_rng(5)
    qf, gf = (
        rng.normal(size=(23, 8)).astype(np.float32),
        rng.normal(size=(71, 8)).astype(np.float32),
    )
    qp, gp = rng.integers(0, 6, 23), rng.integers(0, 6, 71)
    qc, gc = rng.integers(0, 3, 23), rng.integers(0, 3, 71)
    full = evaluate_rank(compute_distance(qf, gf, metric), qp, gp, qc, gc, 20)
    for chunk in (1, 4, None):
        r = evaluate_features(qf, gf, qp, gp, qc, gc, metric, 20, chunk_size=chunk)
        np.testing.assert_allclose(r.cmc, full.cmc)
        assert r.mAP == pytest.approx(full.mAP, abs=1e-12)
        assert r.mINP == pytest.approx(full.mINP, abs=1e-12)


def test_rank_accumulator_in_pieces():
    rng = np.random.default_rng(2)
    d = torch.rand(12, 30)
    qp, gp = rng.integers(0, 5, 12), rng.integers(0, 5, 30)
    acc = RankAccumulator(gp, None, max_rank=7)
    for s in range(0, 12, 5):
        acc.update(d[s : s + 5], qp[s : s + 5])
    r = acc.result()
    full = evaluate_rank(d, qp, gp, max_rank=7)
    np.testing.assert_allclose(r.cmc, full.cmc)
    assert r.mAP == full.mAP


# ------------------------------------------------------------------------ CUHK03 classic
def test_cuhk03_single_shot_equals_standard_when_one_image_per_identity():
    rng = np.random.default_rng(0)
    d = rng.random((10, 8))
    qp = rng.integers(0, 8, 10)
    gp = np.arange(8)  # one gallery image per identity: every draw is the whole gallery
    qc, gc = np.zeros(10, int), np.ones(8, int)
    a = evaluate_cuhk03_classic(d, qp, gp, qc, gc, max_rank=8, num_repeats=3)
    b = evaluate_rank(d, qp, gp, qc, gc, max_rank=8)
    np.testing.assert_allclose(a.cmc, b.cmc)
    assert a.mAP == b.mAP and a.extra["num_repeats"] == 3


def test_cuhk03_single_shot_converges_to_exact_expectation():
    # one query (pid 1, cam 0); gallery pid 1: d=0.3 (cam 1), 0.6 (cam 1), 0.05 (cam 0: junk)
    # pid 2: d=0.2, 0.5; pid 3: d=0.4. The match is drawn from {0.3, 0.6} and pid 2 from
    # {0.2, 0.5}; pid 3 (0.4) is always there. Draws (match, pid 2) -> rank of the match:
    # (0.3, 0.2) -> 2, (0.3, 0.5) -> 1, (0.6, 0.2) -> 3, (0.6, 0.5) -> 3, each with p = 1/4.
    d = np.array([[0.3, 0.6, 0.05, 0.2, 0.5, 0.4]])
    gp, gc = [1, 1, 1, 2, 2, 3], [1, 1, 0, 1, 1, 1]
    r = evaluate_cuhk03_classic(d, [1], gp, [0], gc, max_rank=3, num_repeats=4000, seed=1)
    np.testing.assert_allclose(r.cmc, [0.25, 0.5, 1.0], atol=0.03)
    again = evaluate_cuhk03_classic(d, [1], gp, [0], gc, max_rank=3, num_repeats=4000, seed=1)
    np.testing.assert_array_equal(r.cmc, again.cmc)


# --------------------------------------------------------------------------- reporting
def test_table_and_to_dict():
    r = evaluate_rank(**HAND, max_rank=10)
    d = r.to_dict()
    assert d["mAP"] == pytest.approx(0.5) and d["rank1"] == 0.0 and d["rank5"] == 1.0
    assert len(d["cmc"]) == 10 and d["num_valid"] == 1
    t = format_metrics_table({"bot": r, "agw": r})
    lines = t.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model",
        "mAP",
        "R1",
        "R5",
        "R10",
        "mINP",
    ]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row == ["bot", "50.00", "0.00", "100.00", "100.00", "50.00"]
    assert len(lines) == 4
    short = evaluate_rank(**HAND, max_rank=3)
    assert "| -" in format_metrics_table(short).splitlines()[2].replace("  ", " ")
    assert isinstance(short, EvalResult) and "mAP=" in repr(short)


def test_plot_cmc_writes_a_file(tmp_path):
    r = evaluate_rank(**HAND, max_rank=5)
    fig = plot_cmc({"a": r, "b": r}, path=tmp_path / "cmc.png")
    assert (tmp_path / "cmc.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 2
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), r.cmc * 100)


def test_float64_values_that_collide_in_float32_keep_their_exact_order():
    # 1 + 1e-12 and 1 round to the same float32: the order must still be exact
    d = np.array([[1.0 + 1e-12, 1.0, 1.0 + 2e-12, 1.0]])
    qp, gp = [1], [2, 1, 1, 3]
    expected = ref.naive_eval(d, qp, gp)
    r = evaluate_rank(d, qp, gp)
    # ranking: g1 (1.0, match), g3 (1.0), g0 (1+1e-12), g2 (1+2e-12, match)
    assert r.mAP == pytest.approx((1 / 1 + 2 / 4) / 2) == pytest.approx(expected[1])


def test_non_contiguous_and_half_inputs():
    rng = np.random.default_rng(9)
    d = torch.rand(40, 12, dtype=torch.float64)
    qp, gp = rng.integers(0, 4, 12), rng.integers(0, 4, 40)
    expected = ref.naive_eval(d.T.numpy(), qp, gp)
    r = evaluate_rank(d.T, qp, gp)  # a transposed view
    assert r.mAP == pytest.approx(expected[1], abs=1e-12)
    h = evaluate_rank(d.T.half(), qp, gp)  # half precision is evaluated in float32
    assert 0.0 < h.mAP <= 1.0


@pytest.mark.parametrize("dense_frac", [-1.0, 2.0])  # every item bucketed / candidates only
@pytest.mark.parametrize("ties", [False, True])
def test_bucketed_counting_on_a_wide_gallery_matches_naive(dense_frac, ties, monkeypatch):
    """A gallery wide enough for many buckets per row, with many true matches per query
    (several share a bucket), pid -1 junk, same-camera junk and (optionally) heavy ties."""
    rng = np.random.default_rng(7)
    nq, ng = 24, 3000
    qp = rng.integers(1, 6, nq)
    gp = np.concatenate([rng.integers(1, 6, 2400), np.zeros(300, int), -np.ones(300, int)])
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    d = rng.random((nq, ng)) * np.where(gp[None, :] == qp[:, None], 0.7, 1.0)
    if ties:
        d = np.round(d * 40) / 40  # ~40 distinct values: ties inside and across buckets
    d = d.astype(np.float32)
    monkeypatch.setattr(rank_mod, "_DENSE_FRACTION", dense_frac)
    for ignore in ((), (-1,)):
        expected = ref.naive_eval(d, qp, gp, qc, gc, max_rank=50, ignore_gallery_pids=ignore)
        r = evaluate_rank(d, qp, gp, qc, gc, ignore_gallery_pids=ignore, chunk_size=7)
        np.testing.assert_allclose(r.cmc, expected[0], atol=1e-12)
        np.testing.assert_allclose(r.all_AP, expected[3], atol=1e-12)
        assert r.mINP == pytest.approx(expected[2], abs=1e-12)


def test_accumulator_state_is_unchanged_by_a_rejected_block():
    acc = RankAccumulator([1, 2, 3], [0, 0, 0])
    bad = np.ones((2, 3))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="query 1, gallery 1"):
        acc.update(bad, [1, 2], [1, 1])
    acc.update(np.array([[0.1, 0.2, 0.3]]), [2], [1])
    r = acc.result()
    assert r.num_query == 1 and r.mAP == pytest.approx(0.5)
