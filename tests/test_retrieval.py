"""FAISS gallery index: exact search equals brute force, save/load, approximate kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reidkit.retrieval import GalleryIndex

torch.set_num_threads(1)


def _data(n=600, nq=20, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(30, dim))
    gp = rng.integers(0, 30, n)
    g = centers[gp] + 0.5 * rng.normal(size=(n, dim))
    q = centers[rng.integers(0, 30, nq)] + 0.5 * rng.normal(size=(nq, dim))
    return g.astype(np.float32), q.astype(np.float32), gp


def _brute_force(q, g, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ gn.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def test_exact_search_equals_brute_force_with_metadata():
    g, q, gp = _data()
    paths = [f"img_{i}.jpg" for i in range(len(g))]
    camids = np.arange(len(g)) % 6
    index = GalleryIndex.build(torch.from_numpy(g), paths, gp, camids)
    assert len(index) == len(g)
    res = index.search(q, k=10)
    scores, order = _brute_force(q, g, 10)
    np.testing.assert_array_equal(res.indices, order)
    np.testing.assert_allclose(res.scores, scores, atol=1e-5)
    np.testing.assert_array_equal(res.pids, gp[order])
    np.testing.assert_array_equal(res.camids, camids[order])
    assert res.paths[3][0] == f"img_{order[3, 0]}.jpg"


def test_incremental_add_and_k_beyond_gallery():
    g, q, _ = _data(n=8)
    index = GalleryIndex(g.shape[1])
    index.add(g[:5], pids=[1, 2, 3, 4, 5])
    index.add(g[5:])  # metadata defaults
    res = index.search(q[:2], k=12)
    assert res.indices.shape == (2, 12)
    assert (res.indices[:, 8:] == -1).all() and (res.pids[:, 8:] == -1).all()
    assert res.paths[0][-1] == ""
    assert set(res.indices[0, :8].tolist()) == set(range(8))


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_save_and_load_roundtrip(tmp_path, kind):
    g, q, gp = _data(n=800, dim=16)
    index = GalleryIndex.build(
        g, [f"p{i}" for i in range(len(g))], gp, None, kind=kind, nlist=8, nprobe=4
    )
    before = index.search(q, k=5)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["kind"] == kind and meta["ntotal"] == len(g) and meta["pids"][:3] == gp[:3].tolist()
    loaded = GalleryIndex.load(tmp_path / "idx")
    after = loaded.search(q, k=5)
    np.testing.assert_array_equal(before.indices, after.indices)
    np.testing.assert_allclose(before.scores, after.scores)
    assert after.paths == before.paths and loaded.nprobe == 4


def test_ivf_recall_grows_with_nprobe_and_is_exact_with_all_cells():
    g, q, _ = _data(n=2000, nq=50, dim=32, seed=1)
    _, order = _brute_force(q, g, 10)
    index = GalleryIndex.build(g, kind="ivf", nlist=16, nprobe=1)

    def recall():
        found = index.search(q, k=10).indices
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, order)])

    r1 = recall()
    index.set_nprobe(16)  # all cells: exhaustive
    assert recall() == 1.0 and r1 <= 1.0
    pq = GalleryIndex.build(g, kind="ivfpq", nlist=16, nprobe=16, m=8, nbits=6, refine=True)
    found = pq.search(q, k=10).indices
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, order)]) > 0.8


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        GalleryIndex(8, kind="hnsw")
    with pytest.raises(ValueError, match="divide"):
        GalleryIndex(10, kind="ivfpq", m=3)
    index = GalleryIndex(4)
    with pytest.raises(RuntimeError, match="empty"):
        index.search(np.ones((1, 4)))
    with pytest.raises(ValueError, match="dimension 4"):
        index.add(np.ones((2, 5)))
    with pytest.raises(ValueError, match="pids: expected 2"):
        index.add(np.ones((2, 4)), pids=[1])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 4), np.nan))
    with pytest.raises(RuntimeError, match="trained"):
        GalleryIndex(4, kind="ivf").add(np.ones((2, 4)))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        GalleryIndex.load(tmp_path)
