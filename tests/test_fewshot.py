"""Few-shot CAN: episodic sampler, loss terms and test scores against naive loops, the CI
formula, transductive inference on a hand-made case, configs and the authors' key names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reidkit.config import ConfigError
from reidkit.fewshot.config import FewShotSolverConfig, load_fewshot_config, lr_at_epoch
from reidkit.fewshot.engine import load_fewshot_weights
from reidkit.fewshot.episodes import EpisodeSampler
from reidkit.fewshot.metrics import mean_confidence_interval, paired_difference
from reidkit.fewshot.model import (
    FewShotNet,
    build_fewshot_model,
    convert_can_state_dict,
    transductive_counts,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fewshot"


# ------------------------------------------------------------------------------ sampler
def _labels() -> np.ndarray:
    # 12 classes: class c has 3 + c images (classes 0..2 have fewer than 6), shuffled order
    labels = np.concatenate([np.full(3 + c, c) for c in range(12)])
    return np.random.default_rng(0).permutation(labels)


def test_episode_has_way_classes_with_shot_and_query_images_of_each():
    labels = _labels()
    sampler = EpisodeSampler(labels, way=5, shot=2, queries=4, seed=3)
    assert sampler.eligible.tolist() == list(range(3, 12))  # >= 6 images
    assert sampler.skipped_classes == 3
    for i in range(50):
        ep = sampler.episode(i, epoch=i % 3)
        assert ep.support.shape == (5, 2) and ep.query.shape == (5, 4)
        assert len(set(ep.classes.tolist())) == 5
        assert set(ep.classes.tolist()) <= set(range(3, 12))
        for k, c in enumerate(ep.classes):
            assert (labels[ep.support[k]] == c).all() and (labels[ep.query[k]] == c).all()
        flat = np.concatenate([ep.support.ravel(), ep.query.ravel()])
        assert len(set(flat.tolist())) == flat.size  # support and queries are distinct images
        assert ep.support_labels().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert ep.query_labels().tolist() == np.repeat(np.arange(5), 4).tolist()


def test_episodes_are_deterministic_and_independent_of_order():
    labels = _labels()
    a = EpisodeSampler(labels, 5, 1, 3, seed=7)
    b = EpisodeSampler(labels, 5, 1, 3, seed=7)
    forward = [a.episode(i, 2) for i in range(20)]
    backward = [b.episode(i, 2) for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        assert np.array_equal(x.classes, y.classes)
        assert np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query)
    # other epoch / other seed / other index: other episodes
    assert not np.array_equal(a.episode(0, 2).query, a.episode(0, 3).query)
    assert not np.array_equal(
        a.episode(0, 2).query, EpisodeSampler(labels, 5, 1, 3, 8).episode(0, 2).query
    )
    assert len({tuple(a.episode(i).classes.tolist()) for i in range(20)}) > 15


def test_sampler_refuses_when_too_few_classes_are_large_enough():
    with pytest.raises(ValueError, match=r"need 5 classes with >= 14 images.*only 1 of 12"):
        EpisodeSampler(_labels(), 5, 5, 9, split="test")


# ----------------------------------------------------------------------- model and loss
def _tiny_model(attention: bool, num_classes: int = 7, seed: int = 0) -> FewShotNet:
    torch.manual_seed(seed)
    model = FewShotNet(num_classes, map_size=(2, 1), attention=attention, width=4, reduction=1)
    for m in model.modules():  # non-trivial BN statistics for the eval-mode comparison
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _episode(b=2, way=3, shot=2, m_per=2, size=(32, 16), seed=1):
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(b, way * shot, 3, *size, generator=gen)
    query = torch.randn(b, way * m_per, 3, *size, generator=gen)
    s_lab = torch.arange(way).repeat_interleave(shot).expand(b, -1)
    q_lab = torch.stack(
        [torch.randperm(way, generator=gen).repeat_interleave(m_per) for _ in range(b)]
    )
    q_cls = torch.randint(0, 7, (b, way * m_per), generator=gen)
    return support, s_lab, query, q_lab, q_cls


def _naive(model: FewShotNet, support, s_lab, query, q_lab, q_cls, way):
    """Per-episode, per-pair, per-position loops on the eval-mode model."""
    b, s = s_lab.shape
    m = q_lab.shape[1]
    scale = model.scale
    nn_rows, g_rows, scores = [], [], torch.zeros(b, m, way, dtype=torch.float64)
    nn_loss = g_loss = 0.0
    n_terms = 0
    for e in range(b):
        s_maps = torch.stack([model.extract(support[e, i][None])[0] for i in range(s)])
        q_maps = torch.stack([model.extract(query[e, i][None])[0] for i in range(m)])
        protos = [s_maps[s_lab[e] == k].mean(0) for k in range(way)]
        c, h, w = q_maps.shape[1:]
        for j in range(m):
            pair = []
            for k in range(way):
                if model.attention is None:
                    ap = aq = torch.ones(h, w)
                else:
                    out = model.attention(protos[k][None], q_maps[j][None])
                    ap, aq = out.p_attention[0], out.q_attention[0]
                p_vec = (protos[k] * ap).mean((1, 2)).double()
                q_vec = (q_maps[j] * aq).mean((1, 2)).double()
                scores[e, j, k] = scale * F.cosine_similarity(q_vec, p_vec, dim=0)
                pair.append((p_vec, aq))
            for y in range(h):
                for x in range(w):
                    # nearest-neighbour logits with the *attended* query position
                    logits = torch.stack(
                        [
                            scale
                            * F.cosine_similarity(
                                (aq_k[y, x] * q_maps[j][:, y, x]).double(), p_vec_k, dim=0
                            )
                            for p_vec_k, aq_k in pair
                        ]
                    )
                    nn_loss += -torch.log_softmax(logits, 0)[q_lab[e, j]]
                    own_aq = pair[int(q_lab[e, j])][1]
                    feat = (own_aq[y, x] * q_maps[j][:, y, x]).double()
                    g = (
                        model.classifier.weight[:, :, 0, 0].double() @ feat
                        + model.classifier.bias.double()
                    )
                    g_loss += -torch.log_softmax(g, 0)[q_cls[e, j]]
                    n_terms += 1
                    nn_rows.append(logits)
                    g_rows.append(g)
    return scores, nn_loss / n_terms, g_loss / n_terms


@pytest.mark.parametrize("attention", [True, False])
def test_loss_terms_and_scores_match_naive_loops(attention):
    model = _tiny_model(attention)
    support, s_lab, query, q_lab, q_cls = _episode()
    way = 3
    with torch.no_grad():
        out = model(support, s_lab, query, q_lab, way)
        losses = model.compute_loss(out, q_lab, q_cls, global_weight=1.0, nn_weight=0.5)
        ref_scores, ref_nn, ref_global = _naive(model, support, s_lab, query, q_lab, q_cls, way)
        maps = model.extract(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        s_maps = maps[: support.shape[0] * support.shape[1]].unflatten(0, support.shape[:2])
        q_maps = maps[s_maps.shape[0] * s_maps.shape[1] :].unflatten(0, query.shape[:2])
        scores = model.scores(s_maps, s_lab, q_maps, way)
    assert out["global_logits"].shape == (12, 7, 2, 1) and out["nn_logits"].shape == (12, 3, 2, 1)
    torch.testing.assert_close(losses["nn"].double(), ref_nn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["global"].double(), ref_global, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["total"], losses["global"] + 0.5 * losses["nn"])
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-5, rtol=1e-5)


def test_training_forward_backpropagates_into_every_parameter():
    model = _tiny_model(True).train()
    support, s_lab, query, q_lab, q_cls = _episode()
    out = model(support, s_lab, query, q_lab, 3)
    model.compute_loss(out, q_lab, q_cls)["total"].backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert no_grad == []


def test_confidence_interval_formula():
    mean, half = mean_confidence_interval([0.5, 1.0, 0.75, 0.25])
    assert mean == pytest.approx(0.625)
    assert half == pytest.approx(1.96 * math.sqrt(0.078125) / 2)  # population std / sqrt(n)
    _, half1 = mean_confidence_interval([0.5, 1.0, 0.75, 0.25], ddof=1)
    assert half1 == pytest.approx(1.96 * math.sqrt(0.078125 * 4 / 3) / 2)
    assert mean_confidence_interval([0.4]) == (0.4, 0.0)
    d, half_d = paired_difference([0.5, 1.0, 0.75], [0.25, 1.0, 0.25])  # diffs .25, 0, .5
    assert d == pytest.approx(0.25)
    assert half_d == pytest.approx(1.96 * math.sqrt(0.125 / 3) / math.sqrt(3))
    with pytest.raises(ValueError, match="different episode counts"):
        paired_difference([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        mean_confidence_interval([])


# -------------------------------------------------------------------------- transductive
def test_transductive_counts_follow_the_code_for_75_queries():
    assert transductive_counts(75, 2, 35 / 75) == [35, 70]
    assert transductive_counts(40, 2, 35 / 75) == [18, 36]
    assert transductive_counts(3, 2, 35 / 75) == [1, 2]
    assert transductive_counts(2, 3, 0.9) == [1, 2, 2]
    assert transductive_counts(10, 0, 0.5) == []


def test_transductive_step_on_a_hand_made_episode():
    # 1x1 maps, 2 channels, the baseline (A = 1): scores are 7 x cosine to the prototypes
    model = FewShotNet(3, map_size=(1, 1), attention=False, width=1).eval()
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 2, 1, 1)
    s_lab = torch.tensor([[0, 1]])
    q = torch.tensor([[1.0, 0.1], [0.6, 0.4], [0.1, 1.0], [0.45, 0.55]])
    queries = q.view(1, 4, 2, 1, 1)

    def cos_scores(protos: torch.Tensor) -> torch.Tensor:
        return 7 * F.cosine_similarity(q[:, None], protos[None], dim=-1)[None]

    plain = model.scores(support, s_lab, queries, 2)
    torch.testing.assert_close(plain, cos_scores(torch.eye(2)))
    # iteration 1 (step = floor(0.5 * 4) = 2): the two most confident queries are q0 -> 0
    # and q2 -> 1 (cos 0.995 each; q1: 0.832, q3: 0.774)
    one = model.transductive_scores(support, s_lab, queries, 2, iterations=1, fraction=0.5)
    protos1 = torch.stack(
        [(torch.tensor([1.0, 0]) + q[0]) / 2, (torch.tensor([0, 1.0]) + q[2]) / 2]
    )
    torch.testing.assert_close(one, cos_scores(protos1))
    # iteration 2: all four queries, labelled by iteration 1 (q1 -> 0, q3 -> 1)
    pred1 = one[0].argmax(-1)
    assert pred1.tolist() == [0, 0, 1, 1]
    two = model.transductive_scores(support, s_lab, queries, 2, iterations=2, fraction=0.5)
    protos2 = torch.stack(
        [(torch.tensor([1.0, 0]) + q[0] + q[1]) / 3, (torch.tensor([0, 1.0]) + q[2] + q[3]) / 3]
    )
    torch.testing.assert_close(two, cos_scores(protos2))
    # zero iterations is plain inference
    torch.testing.assert_close(
        model.transductive_scores(support, s_lab, queries, 2, iterations=0), plain
    )


def test_transductive_can_uses_attention_with_pseudo_labelled_prototypes():
    model = _tiny_model(True)
    support, s_lab, query, q_lab, _ = _episode(b=2, way=3, shot=1, m_per=4)
    with torch.no_grad():
        maps = model.extract(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        s_maps, q_maps = maps[:6].unflatten(0, (2, 3)), maps[6:].unflatten(0, (2, 12))
        plain = model.scores(s_maps, s_lab, q_maps, 3)
        t = model.transductive_scores(s_maps, s_lab, q_maps, 3, iterations=1, fraction=0.25)
        # reference: per episode, the 3 most confident queries join their predicted class
        for e in range(2):
            conf, pred = plain[e].max(-1)
            top = conf.topk(3).indices
            pool = torch.cat([s_maps[e], q_maps[e, top]])
            labels = torch.cat([s_lab[e], pred[top]])
            ref = model.scores(pool[None], labels[None], q_maps[e][None], 3)  # mean prototypes
            torch.testing.assert_close(t[e], ref[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_fewshot_configs_validate_and_build(path):
    cfg = load_fewshot_config(path)
    model = build_fewshot_model(cfg, 5)
    assert model.map_size == ((cfg.data.height + 15) // 16, (cfg.data.width + 15) // 16)
    assert (model.attention is None) == (cfg.model.name == "proto")


def test_paper_configs_are_the_code_settings():
    mini1 = load_fewshot_config(CONFIGS / "mini_5w1s.yaml")
    mini5 = load_fewshot_config(CONFIGS / "mini_5w5s.yaml")
    tiered5 = load_fewshot_config(CONFIGS / "tiered_5w5s.yaml")
    assert (mini1.episode.shot, mini5.episode.shot, tiered5.episode.shot) == (1, 5, 5)
    assert mini1.episode.train_queries == 6 and mini1.episode.test_queries == 15
    assert mini1.solver.epochs == 90 and tiered5.solver.epochs == 80
    assert tiered5.solver.episodes_per_epoch == 13980 and tiered5.data.dataset == "tiered_imagenet"
    assert [lr_at_epoch(mini1.solver, e) for e in (0, 59, 60, 75, 89)] == [
        0.1,
        0.1,
        0.006,
        0.0012,
        0.00024,
    ]
    assert (mini1.model.scale, mini1.model.temperature, mini1.loss.nn_weight) == (7.0, 0.025, 0.5)
    assert mini1.eval.episodes == 2000 and mini1.data.pad == 8


def test_config_errors_name_the_key_and_suggest():
    with pytest.raises(
        ConfigError, match=r"unknown key 'episode.shots'.*did you mean 'episode.shot'"
    ):
        load_fewshot_config(CONFIGS / "mini_5w1s.yaml", ["episode.shots=5"])
    with pytest.raises(ConfigError, match="model.name"):
        load_fewshot_config(None, ["model.name=relationnet"])
    with pytest.raises(ValueError, match="until_epoch values must increase"):
        FewShotSolverConfig(lr_schedule=[(10, 0.1), (5, 0.01)])
    with pytest.raises(ValueError, match="past"):
        lr_at_epoch(FewShotSolverConfig(lr_schedule=[(2, 0.1)]), 2)
    assert load_fewshot_config(None, ["output_dir=2024"]).output_dir == "2024"


def test_authors_checkpoint_keys_convert_and_load(tmp_path):
    cfg = load_fewshot_config(
        None, ["model.width=4", "data.height=32", "data.width=16", "model.fusion_reduction=1"]
    )
    model = build_fewshot_model(cfg, 7)
    ours = model.state_dict()
    theirs = {}
    for k, v in ours.items():
        k2 = (
            k.replace("backbone.", "base.", 1)
            .replace("attention.fusion.reduce.", "cam.conv1.conv.")
            .replace("attention.fusion.bn.", "cam.conv1.bn.")
            .replace("attention.fusion.expand.", "cam.conv2.")
            .replace("classifier.", "clasifier.")
        )
        theirs["module." + k2] = v
    converted = convert_can_state_dict(theirs)
    assert converted.keys() == ours.keys()
    # a checkpoint file as the authors' train.py saves it loads (weights_only) into reidkit
    torch.save({"state_dict": theirs, "acc": 0.61, "epoch": 3}, tmp_path / "ckpt.pth.tar")
    loaded = load_fewshot_weights(cfg, tmp_path / "ckpt.pth.tar")
    assert loaded.classifier.out_channels == 7 and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ours[k])
