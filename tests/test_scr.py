"""SCR: parts and their order, channel-group boundaries, stripe / group pooling against a
direct computation, the loss against an independent computation, ablation switches,
test feature, Grad-CAM of a part, and the identity epoch in a short training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reidkit.config import load_config
from reidkit.methods import build_method
from reidkit.methods.scr import SCR, channel_groups, scr_parts
from reidkit.models import build_backbone
from reidkit.viz.grad_cam import compute_grad_cam, part_logit

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 6
AUTHORS_ORDER = [
    "p1", "p2", "p3", "p2_c1", "p2_c2", "p2_s1", "p2_s2",
    "p3_c1", "p3_c2", "p3_c3", "p3_s1", "p3_s2", "p3_s3",
]  # fmt: skip


def make_scr(*overrides: str, width: int = 8, num_classes: int = NUM_CLASSES) -> SCR:
    cfg = load_config(None, ["model.name=scr", *overrides])
    torch.manual_seed(0)
    return SCR(cfg, num_classes, backbone=build_backbone("resnet18", width=width))


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "images": torch.randn(8, 3, 64, 32, generator=g),
        "pids": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    }


# --------------------------------------------------------------------------- parts
def test_channel_group_boundaries() -> None:
    # the authors' cuts for ResNet-50 (2048 channels)
    assert channel_groups(2048, 2) == [(0, 1024), (1024, 2048)]
    assert channel_groups(2048, 3) == [(0, 683), (683, 1366), (1366, 2048)]
    # other widths scale the same rule: multiples of ceil(C / n)
    assert channel_groups(512, 3) == [(0, 171), (171, 342), (342, 512)]
    assert channel_groups(64, 3) == [(0, 22), (22, 44), (44, 64)]
    for c in (7, 64, 100, 511, 2048):
        for n in (1, 2, 3):
            groups = channel_groups(c, n)
            assert groups[0][0] == 0 and groups[-1][1] == c
            assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))  # contiguous
            assert all(stop - start == math.ceil(c / n) for start, stop in groups[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        channel_groups(4, 3)  # ceil(4/3) = 2: the third group would be empty


def test_parts_shapes_and_authors_order(batch) -> None:
    model = make_scr()
    assert model.part_names == AUTHORS_ORDER
    assert model.channels == 64  # resnet18 at width 8
    groups = {p.name: (p.start, p.stop) for p in model.parts if p.kind == "channel"}
    assert groups == {
        "p2_c1": (0, 32), "p2_c2": (32, 64),
        "p3_c1": (0, 22), "p3_c2": (22, 44), "p3_c3": (44, 64),
    }  # fmt: skip
    out = model(batch)
    assert list(out["part_logits"]) == AUTHORS_ORDER
    for name in AUTHORS_ORDER:
        assert out["part_feats"][name].shape == (8, 256)
        assert out["part_logits"][name].shape == (8, NUM_CLASSES)
    assert out["post_bn"].shape == (8, 13 * 256) == (8, 3328)
    assert out["global_feats"].shape == (3, 8, 256)
    # the concatenation is in the authors' order
    torch.testing.assert_close(
        out["post_bn"], torch.cat([out["part_feats"][n] for n in AUTHORS_ORDER], dim=1)
    )
    # each part has its own reduction (1x1 conv, no bias, + BN) and classifier with a bias
    conv, bn = model.reductions["p3_c2"]
    assert conv.bias is None and conv.in_channels == 22 and conv.out_channels == 256
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert model.classifiers["p2_s1"].bias is not None
    # three unshared branches, all with layer4 at stride 1
    assert len(model.branches) == 3
    maps = model.branch_maps(batch["images"])
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 2)] * 3  # 64x32 / 16
    p0, p1 = next(model.branches[0].parameters()), next(model.branches[1].parameters())
    assert p0.data_ptr() != p1.data_ptr()


def test_pooling_of_stripes_and_groups_against_direct_computation(batch) -> None:
    model = make_scr().eval()
    with torch.no_grad():
        maps = model.branch_maps(batch["images"])
        pooled = model.pooled_parts(maps)
    m2, m3 = maps[1], maps[2]  # (B, C, 4, 2)
    torch.testing.assert_close(pooled["p2"], m2.amax(dim=(2, 3)))
    torch.testing.assert_close(pooled["p2_s1"], m2[:, :, :2].amax(dim=(2, 3)))
    torch.testing.assert_close(pooled["p2_s2"], m2[:, :, 2:].amax(dim=(2, 3)))
    torch.testing.assert_close(pooled["p2_c2"], m2.amax(dim=(2, 3))[:, 32:64])
    torch.testing.assert_close(pooled["p3_c3"], m3.amax(dim=(2, 3))[:, 44:64])
    # 3 stripes of a 4-row map: adaptive bins [0, 2), [1, 3), [2, 4)
    torch.testing.assert_close(pooled["p3_s2"], m3[:, :, 1:3].amax(dim=(2, 3)))
    # average pooling variant
    avg = make_scr("model.pooling=avg").eval()
    with torch.no_grad():
        maps = avg.branch_maps(batch["images"])
        pooled = avg.pooled_parts(maps)
    torch.testing.assert_close(pooled["p2_s1"], maps[1][:, :, :2].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="pooling"):
        make_scr("model.pooling=gem")


# ---------------------------------------------------------------------------- loss
def naive_batch_hard(feats: torch.Tensor, pids: torch.Tensor, margin: float) -> float:
    total, count = 0.0, 0
    n = len(pids)
    for a in range(n):
        pos = [
            float((feats[a] - feats[p]).norm()) for p in range(n) if p != a and pids[p] == pids[a]
        ]
        neg = [float((feats[a] - feats[q]).norm()) for q in range(n) if pids[q] != pids[a]]
        if pos and neg:
            total += max(0.0, max(pos) - min(neg) + margin)
            count += 1
    return total / count


def test_loss_composition_against_independent_computation(batch) -> None:
    model = make_scr()
    cfg = load_config(None, ["model.name=scr"])
    # the presets are the paper's: no smoothing, CE weight 2, triplet margin 1.2
    assert (cfg.loss.label_smoothing, cfg.loss.ce_weight, cfg.loss.triplet_margin) == (
        0.0,
        2.0,
        1.2,
    )
    assert cfg.model.pooling == "max" and cfg.test.flip and cfg.test.metric == "euclidean"
    out = model(batch)
    terms = model.compute_loss(out, batch)
    assert set(terms) == {"ce", "triplet"}
    pids = batch["pids"]
    ce = sum(
        float(F.cross_entropy(out["part_logits"][n].detach().double(), pids)) for n in AUTHORS_ORDER
    ) / len(AUTHORS_ORDER)
    tri = (
        sum(
            naive_batch_hard(out["part_feats"][g].detach().double(), pids, 1.2)
            for g in ("p1", "p2", "p3")
        )
        / 3
    )
    assert terms["ce"].item() == pytest.approx(2.0 * ce, rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(tri, rel=1e-5)
    # the triplet term sees the reduced globals, the CE term every classifier
    sum(terms.values()).backward()
    assert model.reductions["p2_s1"][0].weight.grad.abs().sum() > 0
    assert model.classifiers["p3_c3"].weight.grad.abs().sum() > 0


def test_loss_weights_and_pre_bn_triplet_follow_the_config(batch) -> None:
    model = make_scr("loss.ce_weight=1.0", "loss.metric_weight=0.5", "loss.triplet_feature=pre_bn")
    out = model(batch)
    terms = model.compute_loss(out, batch)
    pids = batch["pids"]
    ce = (
        sum(float(F.cross_entropy(out["part_logits"][n].detach(), pids)) for n in AUTHORS_ORDER)
        / 13
    )
    tri = (
        sum(
            naive_batch_hard(out["part_pre_bn"][g].detach().double(), pids, 1.2)
            for g in ("p1", "p2", "p3")
        )
        / 3
    )
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(0.5 * tri, rel=1e-5)


# ----------------------------------------------------------------------- ablations
@pytest.mark.parametrize(
    "spatial,channel,expected",
    [
        (True, True, AUTHORS_ORDER),
        (True, False, ["p1", "p2", "p3", "p2_s1", "p2_s2", "p3_s1", "p3_s2", "p3_s3"]),
        (False, True, ["p1", "p2", "p3", "p2_c1", "p2_c2", "p3_c1", "p3_c2", "p3_c3"]),
        (False, False, ["p1", "p2", "p3"]),
    ],
)
def test_ablation_switches(batch, spatial: bool, channel: bool, expected: list[str]) -> None:
    model = make_scr(
        f"model.scr.spatial={str(spatial).lower()}", f"model.scr.channel={str(channel).lower()}"
    )
    assert model.part_names == expected
    assert [p.name for p in scr_parts(64, spatial, channel)] == expected
    assert set(model.reductions) == set(expected) == set(model.classifiers)
    with torch.no_grad():
        enc = model.eval().encode(batch)
    assert enc["post_bn"].shape == (8, 256 * len(expected))


def test_test_feature_and_flip_sum(batch) -> None:
    model = make_scr().eval()
    with torch.no_grad():
        enc = model.encode(batch)
        out = model(batch)
        flipped = model.encode({"images": batch["images"].flip(-1)})
    torch.testing.assert_close(enc["post_bn"], out["post_bn"])
    # sum then normalise (authors) == average then normalise: so the engine's flip TTA
    # (the mean of both, tested in tests/test_engine.py) gives the authors' feature
    summed = F.normalize(enc["post_bn"] + flipped["post_bn"], dim=1)
    averaged = F.normalize((enc["post_bn"] + flipped["post_bn"]) / 2, dim=1)
    torch.testing.assert_close(summed, averaged)


def test_grad_cam_of_one_part(batch) -> None:
    model = make_scr()
    layer = model.default_cam_layer("p2_s1")
    assert layer == "branches.1.stages.1"  # branch 2's layer4
    assert model.default_cam_layer("p3_c2") == "branches.2.stages.1"
    assert model.default_cam_layer() == "backbone.layer3"  # the trunk: every branch reads it
    trunk = model.get_submodule("backbone.layer3")
    assert len(trunk) == 1  # only layer3[0] stays in the trunk
    full = compute_grad_cam(
        model, batch["images"][:2], "backbone.layer3", part_logit("p1", index=0),
        forward=lambda x: model({"images": x}),
    )  # fmt: skip
    assert full.maps.shape == (2, 4, 2)
    res = compute_grad_cam(
        model,
        batch["images"][:3],
        layer,
        part_logit("p2_s1", index=torch.tensor([0, 1, 2])),
        forward=lambda x: model({"images": x}),
    )
    assert res.maps.shape == (3, 4, 2)
    assert float(res.weights.abs().sum()) > 0
    # the upper stripe's logit depends on nothing in the lower half of the map
    grads = {}

    def keep_grad(module, inputs, output) -> None:
        output.register_hook(lambda g: grads.setdefault("g", g))

    handle = model.get_submodule(layer).register_forward_hook(keep_grad)
    try:
        model.eval()({"images": batch["images"][:3]})["part_logits"]["p2_s1"][:, 0].sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    g = grads["g"]  # (3, C, 4, 2): rows 0-1 are the upper stripe
    assert float(g[:, :, 2:].abs().max()) == 0.0 and float(g[:, :, :2].abs().max()) > 0
    with torch.no_grad():
        logits = model.eval()({"images": batch["images"][:3]})["part_logits"]["p2_s1"]
    torch.testing.assert_close(res.scores, logits.gather(1, torch.tensor([[0], [1], [2]]))[:, 0])
    with pytest.raises(ValueError, match="no part"):
        model.default_cam_layer("p4")


def test_inference_only_and_registry(batch) -> None:
    model = make_scr(num_classes=0).eval()
    with torch.no_grad():
        out = model(batch)
    assert "part_logits" not in out and out["post_bn"].shape == (8, 3328)
    with pytest.raises(RuntimeError, match="num_classes=0"):
        model.compute_loss(out, batch)
    cfg = load_config(REPO / "configs/scr/market1501.yaml", ["model.pretrained=null"])
    assert cfg.model.name == "scr" and cfg.data.pk_epoch == "identities"
    assert cfg.solver.max_epochs == 500 and cfg.solver.milestones == [300, 400]
    assert (cfg.solver.lr, cfg.solver.amsgrad, cfg.data.batch_size) == (2e-4, True, 16)
    assert (cfg.data.height, cfg.data.width, cfg.data.pad) == (384, 192, 0)
    assert cfg.data.random_erasing_fill == "zero"
    small = load_config(None, ["model.name=scr", "model.backbone=resnet18"])
    assert isinstance(build_method(small, 5), SCR)
