"""Optimiser groups, lr schedules (hand-computed values), the classifier-only warm phase,
the center-loss optimiser, feature extraction with flip TTA, FeatureSet files and the
evaluator against a naive mAP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_fakes import FakeMethod, fake_config, write_market_folder
from torch import nn

from reidkit.config import SolverConfig, load_config
from reidkit.data.datasets import build_dataset
from reidkit.engine import FeatureSet, evaluate_model, extract_features, train
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.distributed import shard_bounds
from reidkit.engine.log import read_jsonl
from reidkit.engine.optim import (
    LRScheduler,
    build_optimizer,
    build_param_groups,
    classifier_warm_lr_at,
    lr_at,
)
from reidkit.engine.trainer import seed_everything

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_market_folder(tmp_path_factory.mktemp("market"))


# ------------------------------------------------------------------ schedules
def test_bot_multistep_warmup_values():
    s = SolverConfig()  # BoT defaults: 3.5e-4, warm-up 10 from 0.01, x0.1 at 40 and 70
    expected = {
        0: 3.5e-4 * 0.01,
        5: 3.5e-4 * (0.01 * 0.5 + 0.5),
        9: 3.5e-4 * (0.01 * 0.1 + 0.9),
        10: 3.5e-4,
        39: 3.5e-4,
        40: 3.5e-5,
        69: 3.5e-5,
        70: 3.5e-6,
        119: 3.5e-6,
    }
    for epoch, lr in expected.items():
        assert lr_at(s, epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_cosine_values():
    s = SolverConfig(scheduler="cosine", lr=1.0, min_lr=0.1, warmup_epochs=0, max_epochs=10)
    assert lr_at(s, 0) == pytest.approx(1.0)
    assert lr_at(s, 5) == pytest.approx(0.55)  # 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    assert lr_at(s, 10) == pytest.approx(0.1)
    assert lr_at(s, 2.5) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    w = SolverConfig(
        scheduler="cosine", lr=1.0, min_lr=0.0, warmup_epochs=2, warmup_factor=0.1, max_epochs=12
    )
    assert lr_at(w, 1) == pytest.approx(0.55)  # warm-up: 0.1 * 0.5 + 0.5
    assert lr_at(w, 2) == pytest.approx(1.0)
    assert lr_at(w, 7) == pytest.approx(0.5)  # half-way through the cosine part


def test_constant_and_per_iteration_warmup():
    s = SolverConfig(scheduler="constant", lr=2.0, warmup_epochs=4, warmup_factor=0.2)
    assert lr_at(s, 0) == pytest.approx(0.4)
    assert lr_at(s, 1.5) == pytest.approx(2.0 * (0.2 * (1 - 1.5 / 4) + 1.5 / 4))
    assert lr_at(s, 4) == pytest.approx(2.0)


def test_classifier_warm_ramp():
    s = SolverConfig(
        classifier_warm_epochs=10, classifier_warm_lr_start=3e-6, classifier_warm_lr_end=3e-4
    )
    assert classifier_warm_lr_at(s, 0) == pytest.approx(3e-6)
    assert classifier_warm_lr_at(s, 3) == pytest.approx(3e-6 + (3e-4 - 3e-6) * 3 / 9)
    assert classifier_warm_lr_at(s, 9) == pytest.approx(3e-4)


def test_param_groups_and_scheduler():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)
    )
    s = SolverConfig(
        lr=0.1, weight_decay=1e-3, bias_lr_factor=2.0, weight_decay_bias=0.0, weight_decay_norm=0.0
    )
    groups = {g["group_name"]: g for g in build_param_groups(model, s)}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups["weight"]) == {id(model[0].weight), id(model[3].weight)}
    assert ids(groups["norm"]) == {id(model[1].weight)}
    assert ids(groups["bias"]) == {id(model[0].bias), id(model[1].bias), id(model[3].bias)}
    assert groups["weight"]["weight_decay"] == 1e-3
    assert groups["bias"]["weight_decay"] == 0.0 and groups["norm"]["weight_decay"] == 0.0
    opt = build_optimizer(list(groups.values()), s)
    assert isinstance(opt, torch.optim.Adam)
    sched = LRScheduler(opt, lambda e: 0.1 * 0.5**e)
    sched.set_epoch(2)
    lrs = {g["group_name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"weight": 0.025, "norm": 0.025, "bias": 0.05})
    # excluded and subset parameters
    sub = build_param_groups(
        model, s, params=[model[3].weight, model[3].bias], exclude=[model[3].bias]
    )
    assert [ids(g) for g in sub] == [{id(model[3].weight)}]
    assert isinstance(build_optimizer(sub, SolverConfig(optimizer="sgd")), torch.optim.SGD)


# ------------------------------------------------------------ trainer phases
def test_classifier_warm_phase_then_main_schedule(data_root, tmp_path):
    over = {
        "solver.classifier_warm_epochs": 2,
        "solver.classifier_warm_lr_start": 1e-3,
        "solver.classifier_warm_lr_end": 1e-2,
        "solver.max_epochs": 2,
        "solver.warmup_epochs": 0,
        "solver.lr": 0.05,
        "solver.milestones": [1],
        "test.eval_period": 10,
    }
    cfg = fake_config(data_root, tmp_path / "warm", **over)
    run = train(cfg, stop_after_epochs=2, progress=False)
    seed_everything(cfg.seed)
    init = FakeMethod(cfg, 8).state_dict()  # the trainer builds the model right after seeding
    after = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for name, _ in FakeMethod(cfg, 8).named_parameters():
        if name == "classifier.weight":
            assert not torch.equal(after[name], init[name]), "the classifier must train"
        else:
            assert torch.equal(after[name], init[name]), (
                f"{name} changed in the classifier-only phase"
            )
    train(cfg, resume=True, progress=False)
    lrs = [r["lr"] for r in read_jsonl(run / "log.jsonl") if r["type"] == "epoch"]
    assert lrs == pytest.approx([1e-3, 1e-2, 0.05, 0.005])
    phases = [r["phase"] for r in read_jsonl(run / "log.jsonl") if r["type"] == "epoch"]
    assert phases == ["classifier_warm"] * 2 + ["main"] * 2


def test_center_loss_optimizer_undoes_the_loss_weight(data_root, tmp_path):
    """BoT divides the centres' gradients by center_weight before their SGD step, so one
    step moves the centres by -center_lr * dL_center/dc whatever the weight is."""
    centers = {}
    for w in (0.01, 0.001):
        over = {
            "loss.center_weight": w,
            "loss.center_lr": 0.5,
            "solver.max_epochs": 1,
            "solver.iters_per_epoch": 1,
        }
        cfg = fake_config(data_root, tmp_path / f"c{w}", **over)
        run = train(cfg, progress=False)
        centers[w] = load_checkpoint(run / "checkpoints" / "last.pt")["model"]["center.centers"]
    seed_everything(0)
    init = FakeMethod(
        fake_config(data_root, tmp_path / "x", **{"loss.center_weight": 0.01}), 8
    ).center.centers.detach()
    assert not torch.allclose(centers[0.01], init)
    torch.testing.assert_close(centers[0.01], centers[0.001], atol=1e-5, rtol=1e-4)


def test_tensorboard_missing_is_a_clear_error(data_root, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a)
    )
    with pytest.raises(ValueError, match="tensorboard"):
        train(fake_config(data_root, tmp_path / "tb", tensorboard=True), progress=False)


# ------------------------------------------------------------- extraction
def _batches(images: torch.Tensor, bs: int):
    for s in range(0, len(images), bs):
        n = len(images[s : s + bs])
        yield {
            "images": images[s : s + bs],
            "pids": torch.arange(s, s + n),
            "camids": torch.zeros(n, dtype=torch.long),
            "paths": [f"img{i}.jpg" for i in range(s, s + n)],
        }


@pytest.mark.parametrize("feature", ["post_bn", "pre_bn"])
def test_extract_features_flip_and_normalize(feature):
    torch.manual_seed(0)
    cfg = load_config(None, ["loss.center_weight=0"])
    model = FakeMethod(cfg, 5)
    model.train()
    model({"images": torch.randn(8, 3, 16, 8)})  # move the BN running stats away from the identity
    images = torch.randn(7, 3, 16, 8)
    fs = extract_features(model, _batches(images, 3), "cpu", flip=True, feature=feature)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = []
        for i in range(7):  # one image at a time: batching must not change the result
            x = images[i : i + 1]
            a = model.forward_features(x)[feature]
            b = model.forward_features(x.flip(3))[feature]
            ref.append(F.normalize((a + b) / 2, dim=1))
    torch.testing.assert_close(fs.feats, torch.cat(ref), atol=1e-5, rtol=1e-5)
    assert fs.pids.tolist() == list(range(7)) and fs.paths[3] == "img3.jpg"
    raw = extract_features(
        model, _batches(images, 4), "cpu", flip=False, feature=feature, normalize=False
    )
    with torch.no_grad():
        torch.testing.assert_close(
            raw.feats, model.forward_features(images)[feature], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="test.feature"):
        extract_features(model, _batches(images, 4), "cpu", feature="nope")


def test_featureset_roundtrip(tmp_path):
    fs = FeatureSet(
        torch.randn(5, 3),
        torch.tensor([1, 2, 3, 4, 5]),
        torch.tensor([0, 1, 0, 1, 0]),
        list("abcde"),
    )
    path = fs.save(tmp_path / "q")
    assert path.name == "q.safetensors" and (tmp_path / "q.json").is_file()
    back = FeatureSet.load(tmp_path / "q")
    assert torch.equal(back.feats, fs.feats) and torch.equal(back.pids, fs.pids)
    assert torch.equal(back.camids, fs.camids) and back.paths == fs.paths
    with pytest.raises(ValueError, match="must be"):
        FeatureSet(
            torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long)
        )
    with pytest.raises(FileNotFoundError):
        FeatureSet.load(tmp_path / "missing")


def _naive_map(q: FeatureSet, g: FeatureSet) -> float:
    aps = []
    for i in range(len(q)):
        d = [1 - float(q.feats[i] @ g.feats[j]) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (d[j], j))
        keep = [j for j in order if not (g.pids[j] == q.pids[i] and g.camids[j] == q.camids[i])]
        hits, precisions = 0, []
        for rank, j in enumerate(keep, 1):
            if g.pids[j] == q.pids[i]:
                hits += 1
                precisions.append(hits / rank)
        if hits:
            aps.append(sum(precisions) / hits)
    return sum(aps) / len(aps)


def test_evaluate_model_matches_naive_map(data_root, tmp_path):
    cfg = fake_config(data_root, tmp_path / "ev")
    torch.manual_seed(1)
    model = FakeMethod(cfg, 8)
    dataset = build_dataset("market1501", data_root)
    result = evaluate_model(cfg, model, dataset, "cpu")
    assert len(result.query) == len(dataset.query) and len(result.gallery) == len(dataset.gallery)
    assert result.metrics["mAP"] == pytest.approx(
        _naive_map(result.query, result.gallery), abs=1e-6
    )
    assert "mAP" in result.table("x")


def test_shard_bounds_cover_in_order():
    for n in (0, 1, 5, 7, 64):
        for world in (1, 2, 3, 4):
            spans = [shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [e - s for s, e in spans]
            assert max(sizes) - min(sizes) <= 1
