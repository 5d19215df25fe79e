"""CAN for re-ID (reidkit/methods/can_reid.py): the batched cross-attention scores against
the per-pair module, the pair losses against per-anchor loops, the top-k re-scoring against
a brute-force loop (vector top-k, per-pair cross attention, merged order), chunk-size
invariance, "below the top-k keeps the vector order", a training run, the standard
evaluator against a brute-force metric computation, and the report's attention views."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chromium_cdp import require_chromium
from engine_fakes import brute_force_metrics, fake_config, write_market_folder

from reidkit.config import ConfigError, load_config
from reidkit.engine.evaluator import evaluate_feature_sets, evaluate_model
from reidkit.engine.extract import FeatureSet
from reidkit.methods import build_method
from reidkit.methods.can_reid import (
    CanReID,
    cross_attention_similarity,
    merge_rescored,
    pair_similarity_matrix,
    pair_softmax_loss,
    pair_triplet_loss,
    vector_distance,
)
from reidkit.metrics import compute_distance
from reidkit.models import build_backbone
from reidkit.models.cross_attention import CrossAttention

torch.set_num_threads(1)

GRID = (4, 2)


def tiny_can(**opts) -> CanReID:
    over = {"topk": 6, "embed_dim": 8, "grid": list(GRID), **opts}
    items = ["model.name=can_reid", "loss.metric=triplet"]
    items += [f"model.can_reid.{k}={v}" for k, v in over.items()]
    cfg = load_config(None, items)
    torch.manual_seed(0)
    model = CanReID(cfg, 4, backbone=build_backbone("resnet18", width=8)).eval()
    # give the fusion BN non-trivial running statistics (eval mode uses them)
    bn = model.cross_attention.fusion.bn
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return model


def random_sets(nq=9, ng=40, dim=16, d=8, seed=0) -> tuple[FeatureSet, FeatureSet]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, dim, generator=g)
    qp, gp = torch.arange(nq) % 5, torch.arange(ng) % 5
    qf = centers[qp] + 0.9 * torch.randn(nq, dim, generator=g)
    gf = centers[gp] + 0.9 * torch.randn(ng, dim, generator=g)
    qm = torch.randn(nq, d, *GRID, generator=g).half()
    gm = torch.randn(ng, d, *GRID, generator=g).half()
    qc, gc = torch.zeros(nq, dtype=torch.long), torch.ones(ng, dtype=torch.long)
    return (
        FeatureSet(F.normalize(qf, dim=1), qp, qc, [], {"can_map": qm}),
        FeatureSet(F.normalize(gf, dim=1), gp, gc, [], {"can_map": gm}),
    )


# -------------------------------------------------------------------- scores and losses
@torch.no_grad()
def test_batched_scores_match_the_per_pair_module() -> None:
    torch.manual_seed(1)
    cam = CrossAttention(8).eval()
    cam.fusion.bn.running_var.fill_(1.7)
    q, g = torch.randn(3, 5, 4, 2), torch.randn(3, 4, 5, 4, 2)
    sim, ap, aq = cross_attention_similarity(cam, q, g, return_attention=True)
    assert sim.shape == (3, 4) and ap.shape == aq.shape == (3, 4, 4, 2)
    for i in range(3):
        for j in range(4):
            out = cam(q[i : i + 1], g[i, j : j + 1])
            want = F.cosine_similarity(out.p_features, out.q_features)[0]
            assert float(sim[i, j]) == pytest.approx(float(want), abs=1e-5)
            torch.testing.assert_close(ap[i, j], out.p_attention[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aq[i, j], out.q_attention[0], rtol=1e-5, atol=1e-6)
            # the score is symmetric: the fusion layer is shared by both directions
            back = cross_attention_similarity(cam, g[i, j : j + 1], q[i : i + 1, None])
            assert float(back[0, 0]) == pytest.approx(float(want), abs=1e-5)


@torch.no_grad()
def test_pair_similarity_matrix_matches_pairs_in_eval_and_training_mode() -> None:
    torch.manual_seed(2)
    cam = CrossAttention(8)
    maps = torch.randn(6, 5, 4, 2)
    cam.eval()
    s = pair_similarity_matrix(cam, maps)
    for i in range(6):
        for j in range(6):
            want = cross_attention_similarity(cam, maps[i : i + 1], maps[j : j + 1, None])
            assert float(s[i, j]) == pytest.approx(float(want[0, 0]), abs=1e-5)
    torch.testing.assert_close(s, s.T)
    # training mode: one attention call over all B^2 maps equals the code's two calls
    # (A^p from R, A^q from R^T, each with its own BN batch statistics)
    cam.train()
    s_train = pair_similarity_matrix(cam, maps)
    x = maps.flatten(2)
    xn = F.normalize(x, dim=1)
    r = torch.stack([torch.stack([xn[i].T @ xn[j] for j in range(6)]) for i in range(6)])
    ap, aq = cam.pair_attention(r.reshape(36, 8, 8))
    ap, aq = ap.view(6, 6, 8), aq.view(6, 6, 8)
    want = torch.empty(6, 6)
    for i in range(6):
        for j in range(6):
            pf, qf = (x[i] * ap[i, j]).mean(-1), (x[j] * aq[i, j]).mean(-1)
            want[i, j] = F.cosine_similarity(pf, qf, dim=0)
    torch.testing.assert_close(s_train, want, rtol=1e-4, atol=1e-5)


def test_pair_losses_against_per_anchor_loops() -> None:
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(8, 8, generator=g) * 2 - 1
    sim = (sim + sim.T) / 2
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 9])  # the last anchor has no positive
    soft, trip = [], []
    for i in range(8):
        others = [j for j in range(8) if j != i]
        pos = [j for j in others if pids[j] == pids[i]]
        neg = [j for j in others if pids[j] != pids[i]]
        if not pos or not neg:
            continue
        z = sum(np.exp(7 * float(sim[i, j])) for j in others)
        soft.append(-np.log(sum(np.exp(7 * float(sim[i, j])) for j in pos) / z))
        d_ap = max(1 - float(sim[i, j]) for j in pos)
        d_an = min(1 - float(sim[i, j]) for j in neg)
        trip.append(max(0.0, d_ap - d_an + 0.3))
    assert float(pair_softmax_loss(sim, pids, 7.0)) == pytest.approx(np.mean(soft), rel=1e-5)
    assert float(pair_triplet_loss(sim, pids, 0.3)) == pytest.approx(np.mean(trip), rel=1e-5)


def test_merge_rescored_hand_case() -> None:
    dist = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7]])
    top_dist, top_index = dist.topk(3, largest=False)  # items 1, 3, 0 at 0.1, 0.3, 0.5
    scores = torch.tensor([[0.8, 0.2, 0.5]])  # new order: 3, 0, 1
    out = merge_rescored(dist, top_index, top_dist, scores)
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.5, 0.9, 0.1, 0.7]]))
    assert out.argsort(dim=1).tolist() == [[3, 0, 1, 4, 2]]


def test_vector_distance_equals_the_metrics_module() -> None:
    a, b = torch.randn(5, 7), torch.randn(9, 7)
    for metric in ("cosine", "euclidean", "sqeuclidean"):
        torch.testing.assert_close(
            vector_distance(a, b, metric), compute_distance(a, b, metric), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------ top-k re-scoring
@torch.no_grad()
def brute_force_distances(model: CanReID, query: FeatureSet, gallery: FeatureSet) -> np.ndarray:
    """Per query: vector distances (float64), the k nearest (stable order), each pair
    attended by the module on its own, the fused score, and the merged ranking expressed
    as distances (re-scored items take the k smallest vector distances in their new order)."""
    o = model.opts
    metric = model.vector_metric
    qf, gf = query.feats.double().numpy(), gallery.feats.double().numpy()
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    out = np.zeros((len(query), len(gallery)))
    k = min(o.topk, len(gallery))
    for i in range(len(query)):
        if metric == "cosine":
            vec = 1 - gn @ qn[i]
        else:
            vec = np.linalg.norm(gf - qf[i], axis=1)
        order = np.argsort(vec, kind="stable")
        top = order[:k]
        fused = []
        for j in top:
            p = query.extras["can_map"][i : i + 1].float()
            q = gallery.extras["can_map"][j : j + 1].float()
            if o.rescore_attention:
                att = model.cross_attention(p, q)
                s = float(F.cosine_similarity(att.p_features, att.q_features)[0])
            else:
                s = float(F.cosine_similarity(p.mean((2, 3)), q.mean((2, 3)))[0])
            cos_vec = float(qn[i] @ gn[j])
            fused.append((1 - o.fuse_weight) * (1 - cos_vec) + o.fuse_weight * (1 - s))
        new = top[np.argsort(np.asarray(fused), kind="stable")]
        out[i] = vec
        out[i, new] = vec[top]  # r-th best re-scored item gets the r-th smallest distance
    return out


@pytest.mark.parametrize(
    "opts",
    [{}, {"fuse_weight": 1.0}, {"rescore_attention": False}, {"topk": 100}],
    ids=["fused", "can-only", "no-attention", "k>G"],
)
def test_pairwise_distance_against_brute_force(opts) -> None:
    model = tiny_can(**opts)
    query, gallery = random_sets()
    got = model.pairwise_distance(query, gallery)
    want = brute_force_distances(model, query, gallery)
    assert got.shape == (len(query), len(gallery)) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    got_order = np.argsort(got.numpy(), axis=1, kind="stable")
    np.testing.assert_array_equal(got_order, np.argsort(want, axis=1, kind="stable"))
    # the re-scoring changed some rankings (else the test would prove little)
    plain = vector_distance(query.feats, gallery.feats)
    assert not torch.equal(got.argsort(dim=1), plain.argsort(dim=1))


def test_pairwise_distance_euclidean_metric_selects_by_euclidean() -> None:
    model = tiny_can()
    model.vector_metric = "euclidean"
    query, gallery = random_sets(seed=4)
    query.feats = query.feats * torch.linspace(0.5, 2.0, len(query))[:, None]  # unnormalised
    gallery.feats = gallery.feats * torch.linspace(0.3, 3.0, len(gallery))[:, None]
    got = model.pairwise_distance(query, gallery).numpy()
    np.testing.assert_allclose(got, brute_force_distances(model, query, gallery), atol=1e-4)


def test_chunk_size_invariance() -> None:
    model = tiny_can()
    query, gallery = random_sets(nq=13, ng=40, seed=5)
    ref = model.pairwise_distance(query, gallery)
    for pair_chunk in (1, 7, 10_000):
        model.opts.pair_chunk = pair_chunk
        torch.testing.assert_close(model.pairwise_distance(query, gallery), ref)
    model.opts.pair_chunk = 2048
    blocks = [model.pairwise_distance(query[s : s + 4], gallery) for s in range(0, 13, 4)]
    torch.testing.assert_close(torch.cat(blocks), ref)
    results = [
        evaluate_feature_sets(query, gallery, distance_fn=model.pairwise_distance, chunk_size=c)
        for c in (1, 5, 13)
    ]
    for r in results[1:]:
        assert r.metrics == pytest.approx(results[0].metrics, abs=1e-7)
        torch.testing.assert_close(r.raw.all_AP, results[0].raw.all_AP)


def test_scoring_uses_running_statistics_even_in_training_mode() -> None:
    """A model left in training mode scores as in eval mode, and the fusion BN's running
    statistics are not updated by test pairs."""
    model = tiny_can()
    query, gallery = random_sets(nq=13, ng=40, seed=6)
    ref = model.pairwise_distance(query, gallery)
    bn_state = {k: v.clone() for k, v in model.cross_attention.state_dict().items()}
    model.train()
    torch.testing.assert_close(model.pairwise_distance(query, gallery), ref)
    assert model.cross_attention.training  # the caller's mode is restored
    for k, v in model.cross_attention.state_dict().items():
        torch.testing.assert_close(v, bn_state[k])


def test_below_topk_keeps_vector_order() -> None:
    model = tiny_can(topk=5)
    query, gallery = random_sets(nq=11, ng=40, seed=6)
    vec = vector_distance(query.feats, gallery.feats)
    got = model.pairwise_distance(query, gallery)
    top = vec.topk(5, dim=1, largest=False).indices
    in_top = torch.zeros_like(vec, dtype=torch.bool).scatter_(1, top, True)
    # outside the top-k: the vector distances, bit for bit (hence the vector order)
    assert torch.equal(got[~in_top], vec[~in_top])
    for i in range(len(query)):
        # no re-scored item falls below a non-re-scored one
        assert got[i][in_top[i]].max() <= got[i][~in_top[i]].min()
        # the top-k holds the same set of items, only re-ordered
        assert set(got[i].argsort()[:5].tolist()) == set(top[i].tolist())
        rest = got[i].argsort()[5:]
        assert torch.equal(rest, vec[i].argsort()[5:])
    # lambda = 0 is the vector ranking itself
    model.opts.fuse_weight = 0.0
    assert torch.equal(model.pairwise_distance(query, gallery), vec)


def test_missing_maps_are_refused_with_a_clear_error() -> None:
    model = tiny_can()
    query, gallery = random_sets()
    bare = FeatureSet(gallery.feats, gallery.pids, gallery.camids)
    with pytest.raises(ValueError, match="gallery FeatureSet has no 'can_map'"):
        model.pairwise_distance(query, bare)


# ------------------------------------------------------------------------ model
def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="grid"):
        load_config(None, ["model.name=can_reid", "model.can_reid.grid=[0,4]"])
    with pytest.raises(ConfigError, match="topk"):
        load_config(None, ["model.name=can_reid", "model.can_reid.top_k=5"])


def test_training_step_updates_the_can_head_and_refuses_export() -> None:
    model = tiny_can().train()
    images = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(7))
    batch = {"images": images, "pids": torch.arange(8) // 2}
    out = model(batch)
    assert out["can_map"].shape == (8, 8, *GRID) and out["pair_sim"].shape == (8, 8)
    losses = model.compute_loss(out, batch)
    assert set(losses) == {"ce", "triplet", "pair"} and all(
        torch.isfinite(v) for v in losses.values()
    )
    sum(losses.values()).backward()
    for name in ("can_embed.conv.weight", "cross_attention.fusion.reduce.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    from reidkit.export import InferenceModel

    with pytest.raises(ValueError, match="scores query-gallery pairs itself"):
        InferenceModel(model)


def test_training_run_and_standard_evaluator_equal_brute_force(tmp_path: Path) -> None:
    """`train` runs CAN end to end (pair loss logged, evaluation re-scores), and the standard
    evaluator's metrics equal a per-query computation on brute-force re-scored distances."""
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import train

    root = write_market_folder(tmp_path / "m", num_ids=8, per_cam=3, size=(64, 32), noise=60.0)
    over = {
        "model.name": "can_reid", "model.backbone": "resnet18", "data.height": 64,
        "data.width": 32, "model.can_reid.grid": "[4,2]", "model.can_reid.embed_dim": 16,
        "model.can_reid.topk": 7, "solver.max_epochs": 1, "solver.iters_per_epoch": 2,
        "solver.warmup_epochs": 0, "test.eval_period": 1,
    }  # fmt: skip
    cfg = fake_config(root, tmp_path / "run", **over)
    train(cfg, progress=False)
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"pair"' in log and "mAP" in log

    model = tiny_can(topk=7, embed_dim=16)
    dataset = dataset_from_config(cfg.data)
    result = evaluate_model(cfg, model, dataset, "cpu")
    q, g = result.query, result.gallery
    assert q.extras["can_map"].dtype == torch.float16 and q.extras["can_map"].shape[1:] == (
        16,
        *GRID,
    )
    dist = brute_force_distances(model, q, g)
    ref_map, ref_r1 = brute_force_metrics(
        dist, q.pids.numpy(), g.pids.numpy(), q.camids.numpy(), g.camids.numpy()
    )
    assert result.metrics["mAP"] == pytest.approx(ref_map, abs=1e-6)
    assert result.metrics["rank1"] == pytest.approx(ref_r1, abs=1e-6)
    # the maps survive a save / load round trip at their precision
    q.save(tmp_path / "q")
    back = FeatureSet.load(tmp_path / "q")
    assert back.extras["can_map"].dtype == torch.float16
    assert torch.equal(back.extras["can_map"], q.extras["can_map"])


def test_shipped_configs_build() -> None:
    repo = Path(__file__).resolve().parents[1]
    for name in ("market1501", "dukemtmc", "synth_small"):
        cfg = load_config(repo / "configs" / "can" / f"{name}.yaml", ["model.pretrained=null"])
        assert cfg.model.name == "can_reid" and cfg.model.can_reid.topk == 100
    bot = load_config(repo / "configs" / "can" / "synth_small_bot.yaml")
    can = load_config(repo / "configs" / "can" / "synth_small.yaml")
    assert bot.model.name == "bot" and bot.solver == can.solver and bot.data == can.data
    assert isinstance(build_method(can, 3), CanReID)


# ------------------------------------------------------------------------ report
def test_report_views_show_each_pairs_attention(tmp_path: Path) -> None:
    from reidkit.viz.report import build_ranking_report

    model = tiny_can()
    gen = torch.Generator().manual_seed(8)
    imgs = torch.randn(10, 3, 64, 32, generator=gen)
    views = model.report_views(imgs[:4])
    assert [v.key for v in views] == ["can_pair", "can_gallery"]
    with torch.no_grad():
        maps = model.can_embed(model.backbone(imgs[:4]))
    for j in range(1, 4):
        att = model.cross_attention(maps[:1], maps[j : j + 1])
        torch.testing.assert_close(views[0].heat[j], att.q_attention[0] - 1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            views[0].partner_heat[j], att.p_attention[0] - 1, atol=1e-6, rtol=1e-5
        )
    pids, cams = torch.arange(10) % 3, torch.tensor([0, 1] * 5)
    with torch.no_grad():
        feats = F.normalize(model.encode({"images": imgs})["post_bn"], dim=1)
    dist = 1 - feats[:3] @ feats.t()
    out = build_ranking_report(
        model, lambda qi, gi: (imgs[qi], imgs[gi]), dist, pids[:3], pids, cams[:3], cams,
        metrics={"mAP": 0.5}, cmc=[0.5, 1.0], out_path=tmp_path / "r.html", num_queries=2, topk=3,
    )  # fmt: skip
    page = out.read_text()
    assert '"keys": ["image", "aggregate", "can_pair", "can_gallery"]' in page
    assert page.count("<img ") == 2 * (1 + 3) * 4
    _check_in_chromium(out, tmp_path, views=4)


def _check_in_chromium(page: Path, tmp_path: Path, views: int) -> None:
    exe = require_chromium()
    flags = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout, "the page script did not finish (a JS error?)"
    assert len(re.findall(r'<button type="button" data-view="', dom.stdout)) == views
    # layout with the widest view (a query | item pair per cell) in a narrow window: the row
    # labels keep their width and no cell runs past the window (the cells wrap)
    probe = tmp_path / "layout.html"
    probe.write_text(
        page.read_text().replace("show(views.default);", "show('can_pair');")
        + "<script>var w = document.documentElement.clientWidth, bad = 0, labels = [];"
        "document.querySelectorAll('.row .label').forEach(function (l) {"
        " labels.push(Math.round(l.getBoundingClientRect().width)); });"
        "document.querySelectorAll('.cell').forEach(function (c) {"
        " if (c.getBoundingClientRect().right > w + 1) bad++; });"
        "document.body.setAttribute('data-layout', labels.join(',') + '|' + bad);</script>"
    )
    dom = subprocess.run(
        [*flags, "--window-size=500,800", "--dump-dom", probe.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    layout = re.search(r'data-layout="([^"]*)"', dom.stdout)
    assert layout is not None, "the layout probe did not run"
    labels, overflowing = layout.group(1).split("|")
    assert labels and all(int(w) == 96 for w in labels.split(",")), labels
    assert overflowing == "0"
