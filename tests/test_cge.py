"""CGE (Xia et al. 2023): NLC memories, Global Logits Revise, memory write, schedules, method."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from reidkit.config import load_config
from reidkit.methods import build_method
from reidkit.methods.cge import (
    CGE,
    feature_level_logits,
    gather_for_memory,
    glr_weights,
    momentum_at,
    revise_log_probs,
    revise_logits,
    stripe_pool,
    update_memory,
)

torch.set_num_threads(1)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unit(*shape, seed=0):
    return F.normalize(_rand(*shape, seed=seed), dim=-1)


# --------------------------------------------------------------------- formulas
def test_revise_logits_matches_direct_loop():
    n, B, N, c = 3, 4, 5, 6
    logits = _rand(B, N, seed=1)
    feats = _unit(n, B, c, seed=2)
    memory = _unit(n, N, c, seed=3)
    got = revise_logits(logits, feats, memory)
    expect = torch.empty(B, N)
    for b in range(B):
        for k in range(N):
            prod = 1.0
            for i in range(n):
                cos = float(
                    torch.dot(feats[i, b], memory[i, k])
                    / (feats[i, b].norm() * memory[i, k].norm())
                )
                prod *= 1.0 / (1.0 + math.exp(-cos))
            expect[b, k] = float(logits[b, k]) * prod ** (1.0 / n)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_nth_root_keeps_weight_scale_independent_of_n():
    # n identical stripes: (prod_i s)^(1/n) = s, whatever n is (without the root: s^n).
    B, N, c = 2, 3, 4
    f = _unit(1, B, c, seed=4)
    m = _unit(1, N, c, seed=5)
    single = glr_weights(f, m)
    for n in (2, 3, 7):
        torch.testing.assert_close(glr_weights(f.expand(n, B, c), m.expand(n, N, c)), single)
    # hand case: cosines 1 and -1 in two stripes -> sqrt(sigmoid(1) * sigmoid(-1))
    f2 = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # (2, 1, 2)
    m2 = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]])  # (2, 1, 2)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(glr_weights(f2, m2)) == pytest.approx(math.sqrt(s(1) * s(-1)))


def test_zero_memory_halves_logits():
    # Memories start at zero: cos = 0 -> every w_i = 0.5 -> w = 0.5 (with the n-th root).
    logits = _rand(3, 4, seed=6)
    out = revise_logits(logits, _unit(3, 3, 8, seed=7), torch.zeros(3, 4, 8))
    torch.testing.assert_close(out, logits * 0.5)


def test_revise_logits_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        revise_logits(torch.zeros(2, 5), _unit(3, 2, 4), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="disagree"):
        glr_weights(_unit(3, 2, 4), torch.zeros(2, 5, 4))


def test_revise_log_probs_is_renormalised_product():
    logits = _rand(4, 6, seed=8)
    feats, memory = _unit(3, 4, 5, seed=9), _unit(3, 6, 5, seed=10)
    w = glr_weights(feats, memory)
    p_hat = torch.softmax(logits, 1) * w
    p_hat = p_hat / p_hat.sum(1, keepdim=True)
    torch.testing.assert_close(torch.softmax(revise_log_probs(logits, feats, memory), 1), p_hat)


def test_feature_level_revise_weights_each_class_map():
    maps = _rand(2, 3, 4, 2, seed=11)
    w = torch.rand(2, 3, generator=torch.Generator().manual_seed(12))
    expect = torch.stack(
        [torch.stack([(maps[b, k] * w[b, k]).mean() for k in range(3)]) for b in range(2)]
    )
    torch.testing.assert_close(feature_level_logits(maps, w), expect)
    torch.testing.assert_close(feature_level_logits(maps, None), maps.mean(dim=(2, 3)))


def test_stripe_pool_avg_gem_max_against_slices():
    fm = torch.rand(2, 3, 6, 4, generator=torch.Generator().manual_seed(13)) + 0.1
    n = 3
    avg = stripe_pool(fm, n, "avg")
    mx = stripe_pool(fm, n, "max")
    p = 3.0
    gem = stripe_pool(fm, n, "gem", gem_p=torch.tensor(p))
    assert avg.shape == (n, 2, 3)
    for i in range(n):
        sl = fm[:, :, 2 * i : 2 * i + 2]
        torch.testing.assert_close(avg[i], sl.mean(dim=(2, 3)))
        torch.testing.assert_close(mx[i], sl.amax(dim=(2, 3)))
        torch.testing.assert_close(gem[i], sl.pow(p).mean(dim=(2, 3)).pow(1 / p))
    torch.testing.assert_close(stripe_pool(fm, n, "gem", gem_p=1.0), avg)
    with pytest.raises(ValueError, match="num_stripes"):
        stripe_pool(fm, 7, "avg")


def test_update_memory_against_paper_formula():
    n, N, c = 2, 4, 3
    memory = _unit(n, N, c, seed=14)
    before = memory.clone()
    pids = torch.tensor([2, 0, 2, 2, 0])
    feats = _unit(n, 5, c, seed=15)
    a = 0.3
    update_memory(memory, feats, pids, a)
    for i in range(n):
        for y in range(N):
            members = [k for k in range(5) if int(pids[k]) == y]
            if not members:  # classes absent from the batch are untouched
                torch.testing.assert_close(memory[i, y], before[i, y])
                continue
            mean = sum(feats[i, k] for k in members) / len(members)
            ref = a * before[i, y] + (1 - a) * mean
            torch.testing.assert_close(memory[i, y], ref / ref.norm())
    assert torch.allclose(memory[:, [0, 2]].norm(dim=-1), torch.ones(n, 2))


def test_update_memory_from_zero_and_extreme_momentum():
    memory = torch.zeros(1, 3, 2)
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two samples of class 1
    update_memory(memory, feats, torch.tensor([1, 1]), 0.9)
    # zero slot: the first write is the normalised batch mean whatever a is
    torch.testing.assert_close(memory[0, 1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert memory[0, 0].abs().sum() == 0 and memory[0, 2].abs().sum() == 0
    kept = memory.clone()
    update_memory(memory, torch.tensor([[[0.0, -1.0]]]), torch.tensor([1]), 1.0)
    torch.testing.assert_close(memory, kept)  # a = 1: memory frozen
    update_memory(memory, torch.tensor([[[0.0, -1.0]]]), torch.tensor([1]), 0.0)
    torch.testing.assert_close(memory[0, 1], torch.tensor([0.0, -1.0]))  # a = 0: replaced
    with pytest.raises(ValueError, match="pids must be in"):
        update_memory(memory, torch.zeros(1, 1, 2), torch.tensor([3]), 0.5)


def test_momentum_schedules():
    assert momentum_at("linear", 0, 120) == 0.0
    assert momentum_at("linear", 60, 120) == pytest.approx(0.5)
    assert momentum_at("fixed", 37, 120, fixed=0.01) == 0.01
    for t in (0, 1, 50, 119):
        assert momentum_at("exponential", t, 120, gamma=5.0) == pytest.approx(
            math.exp(-5 * ((1 - t) / 120) ** 2)
        )
    # Eq. 12 decays: ~1 at the start, ~exp(-5) at the end
    assert momentum_at("exponential", 1, 120) == 1.0
    assert momentum_at("exponential", 120, 120) == pytest.approx(math.exp(-5 * (119 / 120) ** 2))
    with pytest.raises(ValueError, match="momentum_schedule"):
        momentum_at("cosine", 1, 10)


# ----------------------------------------------------------------------- method
def _cfg(*extra):
    return load_config(
        None,
        [
            "model.name=cge",
            "model.backbone=resnet18",
            "data.height=96",
            "data.width=32",
            "model.cge.num_stripes=3",
            "loss.triplet_margin=0.0",
            *extra,
        ],
    )


def _batch(num_ids=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_ids * k, 3, 96, 32, generator=g), torch.arange(
        num_ids
    ).repeat_interleave(k)


@pytest.fixture(scope="module")
def bot_cge():
    torch.manual_seed(0)
    return build_method(_cfg(), 4)


def test_method_registered_and_buffers(bot_cge):
    assert isinstance(bot_cge, CGE)
    assert bot_cge.memory.shape == (3, 4, bot_cge.backbone.out_channels)
    assert float(bot_cge.memory.abs().sum()) == 0.0
    state = bot_cge.state_dict()
    assert "memory" in state and "momentum" in state  # checkpointed
    param_ids = {id(p) for p in bot_cge.parameters()}
    assert id(bot_cge.memory) not in param_ids  # never optimised


def test_training_outputs_and_loss_on_revised_logits(bot_cge):
    model = bot_cge
    model.train()
    images, pids = _batch()
    with torch.no_grad():
        model.memory.copy_(_unit(3, 4, model.backbone.out_channels, seed=20))
    out = model({"images": images})
    assert out["stripe_feats"].shape == (3, 8, model.backbone.out_channels)
    torch.testing.assert_close(out["stripe_feats"].norm(dim=-1), torch.ones(3, 8))
    # stripe features are the GAP of the map's thirds, normalised
    fm = out["feat_map"]
    h = fm.shape[2] // 3
    ref = torch.stack(
        [F.normalize(fm[:, :, i * h : (i + 1) * h].mean(dim=(2, 3)), dim=-1) for i in range(3)]
    )
    torch.testing.assert_close(out["stripe_feats"], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        out["revised_logits"], revise_log_probs(out["logits"], out["stripe_feats"], model.memory)
    )
    losses = model.compute_loss(out, {"pids": pids})
    ce_ref = F.cross_entropy(out["revised_logits"], pids, label_smoothing=0.1)
    assert set(losses) == {"ce", "triplet"}
    torch.testing.assert_close(losses["ce"], ce_ref, rtol=1e-5, atol=1e-6)
    total = sum(losses.values())
    model.zero_grad()
    total.backward()
    assert model.backbone.conv1.weight.grad is not None
    assert float(model.backbone.conv1.weight.grad.abs().sum()) > 0
    model.zero_grad()


def test_inference_ignores_memories(bot_cge):
    model = bot_cge
    model.eval()
    images, _ = _batch(seed=3)
    with torch.no_grad():
        model.memory.zero_()
        a = model.encode({"images": images})["post_bn"]
        model.memory.copy_(_unit(3, 4, model.backbone.out_channels, seed=21))
        b = model.encode({"images": images})["post_bn"]
    assert isinstance(a, torch.Tensor) and a.dim() == 2
    torch.testing.assert_close(a, b)
    # and equals the plain baseline with the same weights (memories dropped)
    base = build_method(_cfg("model.name=bot"), 4)
    state = {k: v for k, v in model.state_dict().items() if k not in ("memory", "momentum")}
    base.load_state_dict(state)
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base.encode({"images": images})["post_bn"], a)
    model.train()


def test_hooks_set_momentum_and_write_memory(bot_cge):
    model = bot_cge
    model.train()
    with torch.no_grad():
        model.memory.zero_()
    model.on_epoch_start(30, 120)
    assert float(model.momentum) == pytest.approx(0.25)
    images = _batch()[0][:4]
    pids = torch.tensor([1, 1, 3, 3])
    out = model({"images": images})
    with torch.no_grad():
        model.on_step_end(out, {"pids": pids})
    mean = out["stripe_feats"].detach()[:, :2].mean(dim=1)
    torch.testing.assert_close(model.memory[:, 1], F.normalize(mean, dim=-1))
    assert float(model.memory[:, [0, 2]].abs().sum()) == 0.0


def test_agw_gem_stripes_share_learned_p():
    torch.manual_seed(1)
    model = build_method(
        _cfg(
            "model.pooling=gem",
            "loss.metric=wrt",
            "model.non_local=true",
            "model.non_local_layers={layer2: [1], layer3: [1]}",
        ),
        4,
    )
    model.train()
    with torch.no_grad():
        model.pool.p.fill_(2.0)
    out = model({"images": _batch()[0]})
    fm = out["feat_map"].float()
    h = fm.shape[2] // 3
    ref = torch.stack(
        [
            F.normalize(
                fm[:, :, i * h : (i + 1) * h].clamp(min=1e-6).pow(2).mean(dim=(2, 3)).sqrt(), dim=-1
            )
            for i in range(3)
        ]
    )
    torch.testing.assert_close(out["stripe_feats"], ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.memory.copy_(_unit(3, 4, model.backbone.out_channels, seed=22))
    out = model({"images": _batch()[0]})
    out["revised_logits"].sum().backward()
    assert model.pool.p.grad is not None and float(model.pool.p.grad.abs()) > 0


def test_feature_level_and_no_glr_variants():
    torch.manual_seed(2)
    model = build_method(_cfg("model.cge.revise_level=feature"), 4)
    model.train()
    out = model({"images": _batch()[0]})
    maps = model.class_conv(out["feat_map"])
    torch.testing.assert_close(out["logits"], maps.mean(dim=(2, 3)))
    torch.testing.assert_close(
        out["revised_logits"],
        feature_level_logits(maps, glr_weights(out["stripe_feats"], model.memory)),
    )
    assert any(p is model.class_conv.weight for p in model.classifier_parameters())
    probs = build_method(_cfg("model.cge.revise_target=probs"), 4).train()
    with torch.no_grad():
        probs.memory.copy_(_unit(3, 4, probs.backbone.out_channels, seed=24))
    out = probs({"images": _batch()[0]})
    w = glr_weights(out["stripe_feats"], probs.memory)
    p_hat = torch.softmax(out["logits"], 1) * w
    torch.testing.assert_close(
        torch.softmax(out["revised_logits"], 1), p_hat / p_hat.sum(1, keepdim=True)
    )
    plain = build_method(_cfg("model.cge.glr=false"), 4).train()
    out = plain({"images": _batch()[0]})
    torch.testing.assert_close(out["revised_logits"], out["logits"])


def test_detach_weights_stops_gradient_through_w():
    torch.manual_seed(3)
    for detach in (True, False):
        model = build_method(
            _cfg(
                f"model.cge.detach_weights={str(detach).lower()}", "model.cge.revise_target=logits"
            ),
            4,
        ).train()
        with torch.no_grad():
            model.memory.copy_(_unit(3, 4, model.backbone.out_channels, seed=23))
        out = model({"images": _batch()[0]})
        w = glr_weights(out["stripe_feats"].detach(), model.memory)
        torch.testing.assert_close(out["revised_logits"], out["logits"] * w)
        (grad,) = torch.autograd.grad(
            out["revised_logits"].sum(), out["stripe_feats"], allow_unused=True
        )
        assert (grad is None) == detach


# ------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, result: dict) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    feats = _unit(2, 5, 4, seed=100)  # the global batch, split unevenly over ranks
    pids = torch.tensor([0, 1, 1, 2, 0])
    local = slice(0, 3) if rank == 0 else slice(3, 5)
    memory = torch.zeros(2, 3, 4)
    gf, gp = gather_for_memory(feats[:, local], pids[local])
    update_memory(memory, gf, gp, 0.5)
    result[rank] = (memory, gp)
    dist.destroy_process_group()


def test_memory_write_uses_all_ranks():
    manager = mp.Manager()
    result = manager.dict()
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, result), nprocs=2, join=True)
    ref = torch.zeros(2, 3, 4)
    update_memory(ref, _unit(2, 5, 4, seed=100), torch.tensor([0, 1, 1, 2, 0]), 0.5)
    for rank in (0, 1):
        memory, gp = result[rank]
        assert gp.tolist() == [0, 1, 1, 2, 0]
        torch.testing.assert_close(memory, ref)


# ------------------------------------------------------- faithfulness fixes (issue 9)
def test_glr_probs_lowers_easy_sample_loss_as_fig3():
    """Fig. 3: the revise lowers the CE of an easy sample (every stripe memory agrees with
    the label). Only the probability reading (the default) does that; the literal logits
    reading raises it (every logit is scaled by w < 1)."""
    n, num_classes, c = 3, 5, 8
    memory = F.normalize(_rand(n, num_classes, c, seed=40), dim=-1)
    label = 2
    stripes = memory[:, [label]].clone()  # cos 1 with the label's slots: w_label is the max
    logits = torch.tensor([[0.5, -1.0, 4.0, 0.2, -0.3]])  # confident on the label
    target = torch.tensor([label])
    plain = F.cross_entropy(logits, target)
    probs = F.cross_entropy(revise_log_probs(logits, stripes, memory), target)
    literal = F.cross_entropy(revise_logits(logits, stripes, memory), target)
    assert probs < plain < literal
    # and a hard sample (stripes agree with another class) gets a higher loss
    hard = F.cross_entropy(revise_log_probs(logits, memory[:, [0]].clone(), memory), target)
    assert hard > probs
    # the default is the probability reading
    assert build_method(_cfg(), 4).revise_target == "probs"


def test_momentum_rampup_option():
    assert momentum_at("rampup", 0, 100) == pytest.approx(math.exp(-5.0))
    assert momentum_at("rampup", 100, 100) == pytest.approx(1.0)
    assert momentum_at("rampup", 50, 100) == pytest.approx(math.exp(-5 * 0.25))
    # the printed Eq. 12 is kept as "exponential"
    assert momentum_at("exponential", 0, 100) == pytest.approx(math.exp(-5 * (1 / 100) ** 2))


def test_cge_configs_use_soft_margin_and_pre_bn_feature():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in (
        "cge/bot_market1501.yaml",
        "cge/bot_market1501_baseline.yaml",
        "synth/cge_bot.yaml",
    ):
        cfg = load_config(root / name)
        assert cfg.loss.metric == "soft_triplet", name
        assert cfg.test.feature == "pre_bn" and cfg.loss.triplet_feature == "pre_bn", name
    assert load_config(root / "cge/bot_market1501_baseline.yaml").model.name == "bot"
