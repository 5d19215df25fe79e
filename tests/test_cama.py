"""CAMA: the OAP loss (Eq. 5-6) against naive loops and hand-worked cases, the model's
shapes, CAM identity (Eq. 4), loss terms, test feature and configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reidkit.config import load_config
from reidkit.losses import overlapped_activation_penalty
from reidkit.losses.oap import resolve_topk
from reidkit.methods.cama import CAMA
from reidkit.models import build_backbone

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- OAP
def naive_oap(cams: torch.Tensor, k: int) -> float:
    """Eq. 5-6 with explicit loops over samples, branches and cells."""
    n, b, h, w = cams.shape
    total = 0.0
    for s in range(b):
        prod = [[1.0] * w for _ in range(h)]
        for i in range(n):
            values = sorted(cams[i, s].flatten().tolist(), reverse=True)
            sigma = values[k - 1]
            for y in range(h):
                for x in range(w):
                    prod[y][x] *= 1.0 / (1.0 + math.exp(-(float(cams[i, s, y, x]) - sigma)))
        total += sum(map(sum, prod)) / n
    return total / b


@pytest.mark.parametrize("n,k", [(2, 1), (3, 5), (4, 26)])
def test_oap_matches_naive_loops(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + k)
    cams = torch.randn(n, 3, 16, 8, generator=g, dtype=torch.float64) * 3
    got = overlapped_activation_penalty(cams, k)
    assert got.item() == pytest.approx(naive_oap(cams, k), rel=1e-5)


def test_oap_fraction_equals_count() -> None:
    cams = torch.randn(3, 2, 16, 8, dtype=torch.float64)
    assert resolve_topk(26 / 128, 128) == 26
    assert overlapped_activation_penalty(cams, 26 / 128).item() == pytest.approx(
        overlapped_activation_penalty(cams, 26).item()
    )
    # fraction scales with the map: 20 % of a 32x16 map is 102 cells
    assert resolve_topk(0.2, 512) == 102


def test_oap_hand_worked_disjoint_vs_identical() -> None:
    s10 = 1.0 / (1.0 + math.exp(10.0))  # sigmoid(-10)
    disjoint = torch.tensor([[[[0.0, 10.0]]], [[[10.0, 0.0]]]])  # (N=2, B=1, 1, 2)
    # branch 1: sigma=10 -> a=[s(-10), 0.5]; branch 2: a=[0.5, s(-10)]; sum of products / 2
    assert overlapped_activation_penalty(disjoint, 1).item() == pytest.approx(
        (0.5 * s10 * 2) / 2, rel=1e-5
    )
    same = torch.tensor([[[[0.0, 10.0]]], [[[0.0, 10.0]]]])
    assert overlapped_activation_penalty(same, 1).item() == pytest.approx(
        (s10**2 + 0.25) / 2, rel=1e-5
    )


def test_oap_gradients_and_detach() -> None:
    cams = torch.randn(3, 2, 4, 4, requires_grad=True)
    overlapped_activation_penalty(cams, 4).backward()
    assert cams.grad is not None and cams.grad.abs().sum() > 0
    # with a detached threshold the k-th cell gets only its own sigmoid(0) gradient;
    # the gradients differ from the non-detached version
    cams2 = cams.detach().clone().requires_grad_(True)
    overlapped_activation_penalty(cams2, 4, detach_threshold=True).backward()
    assert not torch.allclose(cams.grad, cams2.grad)


@pytest.mark.parametrize("k", [0, -1, 1.5, 17])
def test_oap_bad_k(k: float) -> None:
    with pytest.raises(ValueError, match="k"):
        overlapped_activation_penalty(torch.randn(2, 1, 4, 4), k)


def test_oap_bad_shape() -> None:
    with pytest.raises(ValueError, match="N branches, B, H, W"):
        overlapped_activation_penalty(torch.randn(2, 4, 4), 2)


# --------------------------------------------------------------------------- model
NUM_CLASSES = 5


def make_cama(*overrides: str, width: int = 8) -> CAMA:
    cfg = load_config(None, ["model.name=cama", "loss.metric=none", *overrides])
    torch.manual_seed(0)
    return CAMA(cfg, NUM_CLASSES, backbone=build_backbone("resnet18", width=width))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(1))


def test_branches_are_unshared_copies() -> None:
    model = make_cama()
    assert len(model.branches) == 3
    s0, s1 = model.branches[0].state_dict(), model.branches[1].state_dict()
    assert all(torch.equal(s0[key], s1[key]) for key in s0)  # same init
    p0, p1 = next(model.branches[0].parameters()), next(model.branches[1].parameters())
    assert p0.data_ptr() != p1.data_ptr()
    with torch.no_grad():
        p0.add_(1.0)
    assert not torch.equal(p0, p1)
    # the trunk's own layer4 is gone (no unused parameters)
    assert not any(n.startswith("backbone.layer4") for n, _ in model.named_parameters())


def test_pretrained_loaded_before_copy(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = build_backbone("resnet18", last_stride=1)
    path = tmp_path / "imagenet.pth"
    torch.save(ref.state_dict(), path)
    cfg = load_config(
        None,
        [
            "model.name=cama",
            "model.backbone=resnet18",
            f"model.pretrained={path}",
            "model.cama.num_branches=2",
        ],
    )
    model = CAMA(cfg, NUM_CLASSES)
    want = {k[len("layer4.") :]: v for k, v in ref.state_dict().items() if k.startswith("layer4.")}
    for branch in model.branches:
        got = branch.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)


def test_training_outputs_and_cam_identity(images: torch.Tensor) -> None:
    model = make_cama().train()
    out = model({"images": images})
    n, b, d = 3, images.shape[0], model.feat_dim
    h, w = images.shape[2] // 16, images.shape[3] // 16
    assert out["feat_maps"].shape == (n, b, d, h, w)
    assert out["branch_logits"].shape == (n, b, NUM_CLASSES)
    assert out["logits"].shape == (b, NUM_CLASSES)
    assert out["global_feat"].shape == (b, n * d)
    # Eq. 4: the GAP of the CAM of class c is the class score S_c, for every class
    cams = model.class_activation_maps(out["feat_maps"])  # (N, B, C, h, w)
    torch.testing.assert_close(cams.mean(dim=(-2, -1)), out["branch_logits"], rtol=1e-4, atol=1e-5)
    # and the target-class shortcut picks the right channel
    t = torch.tensor([0, 3, 4, 1])
    tc = model.class_activation_maps(out["feat_maps"], t)
    torch.testing.assert_close(tc, cams[:, torch.arange(b), t])


def test_branch_forward_matches_explicit_modules(images: torch.Tensor) -> None:
    model = make_cama().eval()
    with torch.no_grad():
        maps = model.forward_maps(images)
        bb = model.backbone
        x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(images))))
        x = bb.layer3(bb.layer2(bb.layer1(x)))
        for i in range(3):
            f = model.bns[i](model.branches[i](x))
            torch.testing.assert_close(maps["feat_maps"][i], f)
            logits = model.classifiers[i](f.mean(dim=(-2, -1)))
            torch.testing.assert_close(
                maps["cams"][i].mean(dim=(-2, -1)), logits, rtol=1e-4, atol=1e-6
            )


def test_compute_loss_terms(images: torch.Tensor) -> None:
    model = make_cama(
        "loss.label_smoothing=0.0", "model.cama.oap_k=3", "model.cama.oap_alpha=0.7"
    ).train()
    pids = torch.tensor([0, 1, 2, 2])
    out = model({"images": images})
    terms = model.compute_loss(out, {"pids": pids})
    assert set(terms) == {"ce_1", "ce_2", "ce_3", "oap"}
    for i in range(3):
        logp = F.log_softmax(out["branch_logits"][i], dim=-1)
        want = -logp[torch.arange(4), pids].mean()
        assert terms[f"ce_{i + 1}"].item() == pytest.approx(want.item(), rel=1e-5)
    w = torch.stack([c.weight for c in model.classifiers])  # (N, C, d)
    m_t = torch.stack(
        [
            torch.stack(
                [(out["feat_maps"][i, s] * w[i, pids[s]][:, None, None]).sum(0) for s in range(4)]
            )
            for i in range(3)
        ]
    )
    assert terms["oap"].item() == pytest.approx(0.7 * naive_oap(m_t.detach().double(), 3), rel=1e-4)
    sum(terms.values()).backward()
    assert model.classifiers[2].weight.grad is not None


def test_no_oap_term_without_alpha(images: torch.Tensor) -> None:
    model = make_cama("model.cama.oap_alpha=0").train()
    batch = {"images": images, "pids": torch.tensor([0, 1, 2, 3])}
    assert set(model.compute_loss(model(batch), batch)) == {
        "ce_1",
        "ce_2",
        "ce_3",
    }
    one = make_cama("model.cama.num_branches=1").train()
    assert set(one.compute_loss(one(batch), batch)) == {"ce_1"}


def test_oap_step_reduces_overlap(images: torch.Tensor) -> None:
    """A small gradient step on L_oap alone lowers the penalty (eval-mode BN, so the
    penalty is a fixed function of the weights)."""
    model = make_cama().eval()
    pids = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = overlapped_activation_penalty(model.forward_maps(images, pids)["target_cams"], 2)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = overlapped_activation_penalty(model.forward_maps(images, pids)["target_cams"], 2)
    assert after.item() < before.item()


def test_eval_feature_is_concat_of_normalised_branch_gap(images: torch.Tensor) -> None:
    model = make_cama().eval()
    with torch.no_grad():
        feat = model.encode({"images": images})["post_bn"]
        maps = model.forward_maps(images, torch.zeros(4, dtype=torch.long))
        want = torch.cat(
            [F.normalize(maps["feat_maps"][i].mean(dim=(-2, -1)), dim=1) for i in range(3)], dim=1
        )
        torch.testing.assert_close(feat, want)
        pre = model.forward_features(images)["pre_bn"]
        want_pre = torch.cat(
            [F.normalize(maps["raw_maps"][i].mean(dim=(-2, -1)), dim=1) for i in range(3)], dim=1
        )
        torch.testing.assert_close(pre, want_pre)
        # Table 5: the first n branches only
        two = make_cama("model.cama.test_branches=2").eval()
        two.load_state_dict(model.state_dict())
        torch.testing.assert_close(
            two.encode({"images": images})["post_bn"], feat[:, : 2 * model.feat_dim]
        )


def test_warm_phase_trains_only_the_classifiers() -> None:
    """CAMA's warm phase: only W^i train (the paper fixes everything else)."""
    model = make_cama()
    got = {id(p) for p in model.classifier_parameters()}
    want = {id(p) for m in model.classifiers for p in m.parameters()}
    assert got == want and len(got) == 3  # one weight per classifier, no BN


@pytest.mark.parametrize(
    "override,match",
    [("model.cama.test_branches=4", "test_branches"), ("model.pooling=gem", "average pooling")],
)
def test_config_errors(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_cama(override)


def test_registered_as_cama() -> None:
    from reidkit.methods import build_method

    cfg = load_config(None, ["model.name=cama", "model.backbone=resnet18", "loss.metric=none"])
    model = build_method(cfg, 3)
    assert isinstance(model, CAMA) and model.num_branches == 3


# -------------------------------------------------------------------------- configs
CONFIGS = sorted((REPO / "configs" / "cama").glob("*.yaml")) + sorted(
    (REPO / "configs" / "synth").glob("cama*.yaml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name in ("cama", "ide_bn")


def test_paper_schedule_config() -> None:
    cfg = load_config(REPO / "configs" / "cama" / "market1501.yaml")
    s = cfg.solver
    assert (s.optimizer, s.lr, s.classifier_warm_epochs) == ("adam", 3e-4, 10)
    assert (s.classifier_warm_lr_start, s.classifier_warm_lr_end) == (3e-6, 3e-4)
    assert (s.max_epochs, s.milestones, s.gamma, s.warmup_epochs) == (50, [20, 40], 0.1, 0)
    assert cfg.data.batch_size == 32 and (cfg.data.height, cfg.data.width) == (256, 128)
    assert cfg.model.cama.num_branches == 3 and cfg.model.cama.oap_alpha == 1.0
    assert round(cfg.model.cama.oap_k * 128) == 26
    mltb = load_config(REPO / "configs" / "cama" / "market1501_mltb.yaml")
    assert mltb.model.cama.oap_alpha == 0 and mltb.model.cama.num_branches == 3


def test_detach_threshold_option(images: torch.Tensor) -> None:
    """Same penalty value, different gradient when sigma^i is a constant."""
    pids = torch.tensor([0, 1, 2, 3])
    grads, values = [], []
    for flag in ("false", "true"):
        model = make_cama(f"model.cama.oap_detach_threshold={flag}").eval()
        loss = model.compute_loss(
            {**model.forward_maps(images, pids), "branch_logits": torch.zeros(3, 4, NUM_CLASSES)},
            {"pids": pids},
        )["oap"]
        loss.backward()
        values.append(loss.item())
        grads.append(model.classifiers[0].weight.grad.clone())
    assert values[0] == pytest.approx(values[1])
    assert not torch.allclose(grads[0], grads[1])
