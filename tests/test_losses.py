"""Every loss against a naive per-sample / per-pair loop of its paper formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reidkit.config import LossConfig
from reidkit.losses import (
    EXTRA_LOSSES,
    CenterLoss,
    SphereLoss,
    ZeroLoss,
    build_extra_loss,
    build_id_loss,
    build_metric_loss,
    circle_loss,
    contrastive_loss,
    cross_entropy_label_smooth,
    focal_loss,
    instance_loss,
    lifted_structure_loss,
    metric_loss_key,
    sphere_loss,
    triplet_batch_hard,
    weighted_regularized_triplet,
)
from reidkit.losses.pairwise import chebyshev_cos_multiple, sphere_logits

torch.set_num_threads(1)
DT = torch.float64


def batch(p: int = 4, k: int = 3, d: int = 5, seed: int = 0, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(p * k, d, generator=g, dtype=DT)
    pids = torch.arange(p).repeat_interleave(k)
    if shuffle:
        perm = torch.randperm(p * k, generator=g)
        feats, pids = feats[perm], pids[perm]
    return feats, pids


def dist(a, b) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


# ----------------------------------------------------------------------------- ID losses
def naive_smoothed_ce(logits, targets, eps):
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        z = [float(v) for v in logits[i]]
        lse = math.log(sum(math.exp(v) for v in z))
        for j in range(c):
            q = (1 - eps) * (j == int(targets[i])) + eps / c
            total += -q * (z[j] - lse)
    return total / b


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_label_smooth(eps):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 7, generator=g, dtype=DT)
    targets = torch.randint(0, 7, (6,), generator=g)
    got = cross_entropy_label_smooth(logits, targets, eps)
    assert got.item() == pytest.approx(naive_smoothed_ce(logits, targets, eps), rel=1e-10)
    if eps == 0:
        torch.testing.assert_close(got, F.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="targets must be"):
        cross_entropy_label_smooth(logits, targets[:3], eps)


def naive_focal(logits, targets, gamma, alpha, eps):
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        z = [float(v) for v in logits[i]]
        s = sum(math.exp(v) for v in z)
        for j in range(c):
            p = math.exp(z[j]) / s
            q = (1 - eps) * (j == int(targets[i])) + eps / c
            a = 1.0 if alpha is None else (alpha if isinstance(alpha, float) else float(alpha[j]))
            total += -a * q * (1 - p) ** gamma * math.log(p)
    return total / b


@pytest.mark.parametrize(
    "gamma,alpha,eps",
    [(2.0, None, 0.0), (0.5, 0.25, 0.0), (2.0, None, 0.1), (1.0, "vector", 0.1)],
)
def test_focal_loss(gamma, alpha, eps):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, generator=g, dtype=DT) * 2
    targets = torch.randint(0, 4, (5,), generator=g)
    if alpha == "vector":
        alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)
    got = focal_loss(logits, targets, gamma, alpha, eps)
    assert got.item() == pytest.approx(naive_focal(logits, targets, gamma, alpha, eps), rel=1e-9)
    # gamma 0 without alpha is the (smoothed) cross entropy
    ce = cross_entropy_label_smooth(logits, targets, eps)
    torch.testing.assert_close(focal_loss(logits, targets, 0.0, None, eps), ce)


# ------------------------------------------------------------------------------ triplet
def cos_dist(a, b) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(y) ** 2 for y in b))
    return 1.0 - dot / (na * nb)


def naive_batch_hard(feats, pids, margin, soft, d=dist):
    losses = []
    n = len(pids)
    for a in range(n):
        pos = [d(feats[a], feats[p]) for p in range(n) if p != a and pids[p] == pids[a]]
        neg = [d(feats[a], feats[q]) for q in range(n) if pids[q] != pids[a]]
        if not pos or not neg:
            continue
        x = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(x)) if soft else max(0.0, x + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_batch_hard(soft, seed):
    feats, pids = batch(seed=seed)
    got = triplet_batch_hard(feats, pids, margin=0.3, soft=soft)
    assert got.item() == pytest.approx(naive_batch_hard(feats, pids, 0.3, soft), rel=1e-8)
    normed = F.normalize(feats, dim=1)
    got_n = triplet_batch_hard(feats, pids, margin=0.3, soft=soft, normalize=True)
    assert got_n.item() == pytest.approx(naive_batch_hard(normed, pids, 0.3, soft), rel=1e-8)


@pytest.mark.parametrize("soft", [False, True])
def test_triplet_batch_hard_cosine_distance(soft):
    feats, pids = batch(seed=3)
    got = triplet_batch_hard(feats, pids, margin=0.3, soft=soft, distance="cosine")
    assert got.item() == pytest.approx(naive_batch_hard(feats, pids, 0.3, soft, cos_dist), rel=1e-8)
    # scale-invariant per sample, unlike the Euclidean distance
    scaled = feats * torch.rand(len(feats), 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert triplet_batch_hard(scaled + 0, pids, 0.3, soft, distance="cosine").item() == (
        pytest.approx(got.item(), rel=1e-8)
    )
    # hand-worked: directions at 0, 90 (id 0) and 180, 45 degrees (id 1), margin 0.3
    ang = torch.tensor([0.0, 90.0, 180.0, 45.0], dtype=DT) * math.pi / 180
    unit = torch.stack([ang.cos(), ang.sin()], dim=1)
    two = torch.tensor([0, 0, 1, 1])
    c45 = 1 - math.cos(math.pi / 4)
    # anchor 0: d_ap 1, d_an min(2, c45) -> 1 - c45 + 0.3; anchor 1: 1 vs c45 -> 1 - c45 + 0.3
    # anchor 2: d_ap 1 - cos(135) = 1 + c, d_an min(2, 1) = 1 -> cos(45) + 0.3; anchor 3:
    # d_ap 1 + cos(45), d_an c45 -> 2 cos(45) + 0.3
    c = math.cos(math.pi / 4)
    expected = (2 * (1 - c45 + 0.3) + (c + 0.3) + (2 * c + 0.3)) / 4
    assert triplet_batch_hard(unit, two, 0.3, distance="cosine").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="distance"):
        triplet_batch_hard(feats, pids, distance="manhattan")


def test_triplet_hand_worked_case():
    # 1-D points: id 0 at 0 and 1, id 1 at 3 and 7.
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=DT)
    pids = torch.tensor([0, 0, 1, 1])
    # anchors: 0: d_ap 1, d_an 3 -> 0; 1: 1 vs 2 -> 0; 2: 4 vs 2 -> 2.3; 3: 4 vs 6 -> 0
    got = triplet_batch_hard(feats, pids, margin=0.3)
    assert got.item() == pytest.approx(2.3 / 4)


def test_triplet_edge_cases_and_gradients():
    feats, pids = batch(p=3, k=2)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: triplet_batch_hard(f, pids, 0.3, soft=True), (feats,))
    assert torch.autograd.gradcheck(lambda f: weighted_regularized_triplet(f, pids), (feats,))
    single = torch.zeros(4, dtype=torch.long)  # one identity: no negatives
    loss = triplet_batch_hard(feats[:4], single)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    singletons = torch.arange(4)  # no positives
    assert triplet_batch_hard(feats[:4].detach(), singletons).item() == 0.0
    assert weighted_regularized_triplet(feats[:4].detach(), singletons).item() == 0.0
    # anchors without positives are skipped (not counted as zero)
    pids_mixed = torch.tensor([0, 0, 1, 2])
    f = feats[:4].detach()
    assert triplet_batch_hard(f, pids_mixed, 0.3).item() == pytest.approx(
        naive_batch_hard(f, pids_mixed, 0.3, False)
    )
    # half precision input (AMP) is computed in float32
    assert triplet_batch_hard(f.half(), pids_mixed).dtype == torch.float32


def naive_wrt(feats, pids, include_self=False):
    losses = []
    n = len(pids)
    for a in range(n):
        pos = [
            dist(feats[a], feats[p])
            for p in range(n)
            if (p != a or include_self) and pids[p] == pids[a]
        ]
        neg = [dist(feats[a], feats[q]) for q in range(n) if pids[q] != pids[a]]
        if len(pos) == (1 if include_self else 0) or not neg:
            continue
        wp = [math.exp(d) for d in pos]
        wn = [math.exp(-d) for d in neg]
        d_ap = sum(w * d for w, d in zip(wp, pos)) / sum(wp)
        d_an = sum(w * d for w, d in zip(wn, neg)) / sum(wn)
        losses.append(math.log1p(math.exp(d_ap - d_an)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("include_self", [False, True])
def test_weighted_regularized_triplet(include_self):
    feats, pids = batch(p=3, k=4, seed=3)
    got = weighted_regularized_triplet(feats, pids, include_self_positive=include_self)
    assert got.item() == pytest.approx(naive_wrt(feats, pids, include_self), rel=1e-6)


# ---------------------------------------------------------------------------- center
def test_center_loss():
    torch.manual_seed(0)
    module = CenterLoss(5, 3)
    feats = torch.randn(6, 3)
    pids = torch.tensor([0, 4, 4, 2, 1, 0])
    expected = (
        sum(
            sum(
                (float(feats[i, d]) - float(module.centers.detach()[int(pids[i]), d])) ** 2
                for d in range(3)
            )
            for i in range(6)
        )
        / 6
    )
    loss = module(feats, pids)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # only the centers of classes in the batch receive gradient
    assert module.centers.grad[3].abs().sum() == 0 and module.centers.grad[4].abs().sum() > 0


# ---------------------------------------------------------------------------- circle
def naive_circle(feats, pids, m, gamma):
    f = F.normalize(feats, dim=1)
    n = len(pids)
    losses = []
    for a in range(n):
        sp = [float(f[a] @ f[p]) for p in range(n) if p != a and pids[p] == pids[a]]
        sn = [float(f[a] @ f[q]) for q in range(n) if pids[q] != pids[a]]
        if not sp or not sn:
            continue
        sum_n = sum(math.exp(gamma * max(0.0, s + m) * (s - m)) for s in sn)
        sum_p = sum(math.exp(-gamma * max(0.0, 1 + m - s) * (s - 1 + m)) for s in sp)
        losses.append(math.log(1 + sum_n * sum_p))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("m,gamma", [(0.25, 2.0), (0.25, 64.0), (0.4, 16.0)])
def test_circle_loss(m, gamma):
    feats, pids = batch(p=3, k=3, seed=4)
    got = circle_loss(feats, pids, m=m, gamma=gamma)
    assert got.item() == pytest.approx(naive_circle(feats, pids, m, gamma), rel=1e-8)


# ---------------------------------------------------------------------------- sphere
def test_chebyshev_is_cos_of_multiple_angle():
    theta = torch.linspace(0, math.pi, 50, dtype=DT)
    for m in (1, 2, 3, 4, 5):
        torch.testing.assert_close(
            chebyshev_cos_multiple(torch.cos(theta), m), torch.cos(m * theta)
        )


def naive_sphere_logits(feats, weight, targets, m, lam):
    out = torch.zeros(feats.shape[0], weight.shape[0], dtype=DT)
    for i in range(feats.shape[0]):
        xn = float(feats[i].norm())
        for c in range(weight.shape[0]):
            cos = float(feats[i] @ weight[c]) / (xn * float(weight[c].norm()))
            if c == int(targets[i]):
                theta = math.acos(max(-1.0, min(1.0, cos)))
                k = min(m - 1, math.floor(m * theta / math.pi))
                psi = (-1) ** k * math.cos(m * theta) - 2 * k
                out[i, c] = xn * (lam * cos + psi) / (1 + lam)
            else:
                out[i, c] = xn * cos
    return out


@pytest.mark.parametrize("m,lam", [(4, 0.0), (4, 5.0), (2, 1.0), (1, 0.0)])
def test_sphere_loss(m, lam):
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(6, 4, generator=g, dtype=DT)
    weight = torch.randn(3, 4, generator=g, dtype=DT)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = naive_sphere_logits(feats, weight, targets, m, lam)
    torch.testing.assert_close(sphere_logits(feats, weight, targets, m, lam), expected)
    torch.testing.assert_close(
        sphere_loss(feats, weight, targets, m, lam), F.cross_entropy(expected, targets)
    )
    # psi is monotonically decreasing in theta (the point of the -2k term)
    theta = torch.linspace(0, math.pi, 200, dtype=DT)
    cos = torch.cos(theta).unsqueeze(1)
    w = torch.tensor([[1.0, 0.0]], dtype=DT)
    x = torch.cat([cos, torch.sin(theta).unsqueeze(1)], 1)
    psi = sphere_logits(x, w, torch.zeros(200, dtype=torch.long), m, 0.0)[:, 0]
    assert torch.all(psi[1:] <= psi[:-1] + 1e-12)


def test_sphere_module_anneals_lambda():
    module = SphereLoss(4, 3, m=4, lambda_base=1000, lambda_gamma=0.12, lambda_min=5)
    assert module.current_lambda() == pytest.approx(1000.0)
    feats, pids = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    for _ in range(10):
        module(feats, pids)
    assert module.current_lambda() == pytest.approx(1000 / (1 + 0.12 * 10))
    module.iteration.fill_(10**6)
    assert module.current_lambda() == 5.0
    module.eval()
    module(feats, pids)
    assert int(module.iteration) == 10**6  # eval calls do not advance the schedule
    with pytest.raises(ValueError, match="integer"):
        SphereLoss(4, 3, m=1.5)


# ---------------------------------------------------------------------------- lifted
def naive_lifted(feats, pids, margin):
    n = len(pids)
    d = [[dist(feats[i], feats[j]) for j in range(n)] for i in range(n)]
    terms = []
    for i in range(n):
        for j in range(n):
            if i == j or pids[i] != pids[j]:
                continue
            s = sum(math.exp(margin - d[i][k]) for k in range(n) if pids[k] != pids[i])
            s += sum(math.exp(margin - d[j][l]) for l in range(n) if pids[l] != pids[j])  # noqa: E741
            terms.append(max(0.0, math.log(s) + d[i][j]) ** 2)
    return sum(terms) / (2 * len(terms))


@pytest.mark.parametrize("margin", [0.5, 1.0, 3.0])
def test_lifted_structure_loss(margin):
    feats, pids = batch(p=3, k=3, seed=6)
    got = lifted_structure_loss(feats, pids, margin=margin)
    assert got.item() == pytest.approx(naive_lifted(feats, pids, margin), rel=1e-8)
    f = feats.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lifted_structure_loss(x, pids, margin), (f,))
    assert lifted_structure_loss(feats, torch.zeros_like(pids)).item() == 0.0


# --------------------------------------------------------------------------- instance
def test_instance_loss():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(5, 4, generator=g, dtype=DT)
    weight = torch.randn(3, 4, generator=g, dtype=DT)
    targets = torch.tensor([0, 2, 1, 1, 0])
    logits = torch.zeros(5, 3, dtype=DT)
    for i in range(5):
        for c in range(3):
            logits[i, c] = (
                16.0 * float(feats[i] @ weight[c]) / float(feats[i].norm() * weight[c].norm())
            )
    torch.testing.assert_close(
        instance_loss(feats, weight, targets, 16.0), F.cross_entropy(logits, targets)
    )


# ------------------------------------------------------------------------ contrastive
@pytest.mark.parametrize("squared", [False, True])
def test_contrastive_loss(squared):
    feats, pids = batch(p=3, k=2, seed=8)
    fn = F.normalize(feats, dim=1)
    pos, neg = [], []
    for i in range(len(pids)):
        for j in range(len(pids)):
            if i == j:
                continue
            d = dist(fn[i], fn[j])
            if pids[i] == pids[j]:
                pos.append(max(0.0, d - 0.1) ** (2 if squared else 1))
            else:
                neg.append(max(0.0, 1.2 - d) ** (2 if squared else 1))
    expected = sum(pos) / len(pos) + sum(neg) / len(neg)
    got = contrastive_loss(feats, pids, margin=1.2, pos_margin=0.1, squared=squared)
    assert got.item() == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------------------- builders
def test_build_metric_loss_from_config():
    feats, pids = batch(seed=9)
    cfg = LossConfig(metric="triplet", triplet_margin=0.5)
    assert build_metric_loss(cfg)(feats, pids).item() == pytest.approx(
        triplet_batch_hard(feats, pids, 0.5).item()
    )
    cfg = LossConfig(metric="soft_triplet")
    assert build_metric_loss(cfg)(feats, pids).item() == pytest.approx(
        triplet_batch_hard(feats, pids, soft=True).item()
    )
    cfg = LossConfig(metric="triplet", triplet_margin=0.3, triplet_distance="cosine")
    assert build_metric_loss(cfg)(feats, pids).item() == pytest.approx(
        naive_batch_hard(feats, pids, 0.3, False, cos_dist)
    )
    cfg = LossConfig(metric="wrt")
    assert build_metric_loss(cfg)(feats, pids).item() == pytest.approx(
        weighted_regularized_triplet(feats, pids).item()
    )
    cfg = LossConfig(metric="circle", circle_m=0.3, circle_gamma=8.0)
    assert build_metric_loss(cfg)(feats, pids).item() == pytest.approx(
        circle_loss(feats, pids, 0.3, 8.0).item()
    )
    none = build_metric_loss(LossConfig(metric="none"))
    assert isinstance(none, ZeroLoss) and none(feats, pids).item() == 0.0
    assert [metric_loss_key(m) for m in ("triplet", "soft_triplet", "wrt", "circle")] == [
        "triplet",
        "triplet",
        "wrt",
        "circle",
    ]


def test_build_id_loss():
    logits, targets = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0])
    ce = build_id_loss(LossConfig(label_smoothing=0.2))
    assert ce(logits, targets).item() == pytest.approx(naive_smoothed_ce(logits, targets, 0.2))
    focal = build_id_loss(LossConfig(label_smoothing=0.1, focal_gamma=2.0))
    assert focal(logits, targets).item() == pytest.approx(
        naive_focal(logits, targets, 2.0, None, 0.1)
    )


@pytest.mark.parametrize("name", EXTRA_LOSSES)
def test_build_extra_losses_train(name):
    """Each extra loss is finite and a few SGD steps on the features lower it."""
    torch.manual_seed(0)
    feats, pids = batch(p=4, k=2, d=8, seed=10)
    feats = feats.float().requires_grad_(True)
    loss_fn = build_extra_loss(
        name, num_classes=4, feat_dim=8, loss_cfg=LossConfig(circle_gamma=2.0)
    )
    params = [feats, *loss_fn.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    first = None
    for _ in range(30):
        loss = loss_fn(feats, pids)
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn(feats, pids).item() < first
    with pytest.raises(ValueError, match="unknown extra loss"):
        build_extra_loss("arcface")
    if name in ("sphere", "instance"):
        with pytest.raises(ValueError, match="needs num_classes"):
            build_extra_loss(name)


def test_losses_compute_in_float32_under_autocast():
    """Inside an AMP region the distances/logits are not computed in bf16."""
    feats, pids = batch(p=4, k=2, d=16, seed=11)
    feats_bf16 = feats.to(torch.bfloat16)
    reference = feats_bf16.float()  # same (rounded) inputs, full precision
    weight = torch.randn(4, 16)
    cases = [
        lambda f: triplet_batch_hard(f, pids),
        lambda f: weighted_regularized_triplet(f, pids),
        lambda f: circle_loss(f, pids),
        lambda f: lifted_structure_loss(f, pids),
        lambda f: contrastive_loss(f, pids),
        lambda f: sphere_loss(f, weight, pids),
        lambda f: instance_loss(f, weight, pids),
    ]
    for fn in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(feats_bf16)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(reference), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    p=st.integers(1, 4),
    k=st.integers(1, 3),
    d=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    soft=st.booleans(),
)
def test_triplet_and_wrt_match_naive_on_random_batches(p, k, d, seed, soft):
    feats, pids = batch(p=p, k=k, d=d, seed=seed)
    n = p * k
    has_valid = any(
        any(pids[j] == pids[a] for j in range(n) if j != a)
        and any(pids[j] != pids[a] for j in range(n))
        for a in range(n)
    )
    got = triplet_batch_hard(feats, pids, 0.3, soft=soft)
    wrt = weighted_regularized_triplet(feats, pids, include_self_positive=False)
    circ = circle_loss(feats, pids, 0.25, 2.0)
    if not has_valid:
        assert got.item() == 0.0 and wrt.item() == 0.0 and circ.item() == 0.0
        return
    assert got.item() == pytest.approx(naive_batch_hard(feats, pids, 0.3, soft), rel=1e-7, abs=1e-9)
    assert wrt.item() == pytest.approx(naive_wrt(feats, pids), rel=1e-6, abs=1e-9)
    assert circ.item() == pytest.approx(naive_circle(feats, pids, 0.25, 2.0), rel=1e-7, abs=1e-9)
