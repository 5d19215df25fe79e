"""The MGRe method: Eq. 6 and Eq. 9 against independent computations, the identity of the
whole-body region at initialisation, gradient flow into the location modules, the
ablation variants (Tables 4, 5, 7, Fig. 5), keypoint requirements and the region IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reidkit.config import ConfigError, load_config
from reidkit.methods.base import MissingBatchKeyError, check_requirements
from reidkit.methods.mgre import (
    REGION_KEYPOINTS,
    REGION_NAMES,
    STAGE_REGIONS,
    MGRe,
    add_midpoints,
    box_iou,
    keypoint_region_boxes,
    mean_region_iou,
    region_iou,
    region_sample_size,
    sample_regions,
    stage_priors,
    weighted_feature,
)
from reidkit.models import build_backbone

torch.set_num_threads(1)
H, W = 64, 32  # tiny input: stage maps 16x8, 8x4, 4x2, 4x2 with last stride 1


def make_model(*overrides: str, num_classes: int = 4, seed: int = 0) -> MGRe:
    cfg = load_config(None, ["model.name=mgre", "model.mgre.part_dim=8", *overrides])
    torch.manual_seed(seed)
    return MGRe(cfg, num_classes, backbone=build_backbone("resnet18", width=8))


def make_keypoints(b: int, seed: int = 0) -> torch.Tensor:
    """Pixel keypoints of a standing person in an H x W image, some invisible."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.tensor([5, 4, 4, 5, 5, 14, 14, 22, 22, 30, 30, 34, 34, 46, 46, 58, 58.0])
    xs = torch.tensor([16, 15, 17, 14, 18, 11, 21, 9, 23, 8, 24, 12, 20, 12, 20, 12, 20.0])
    kp = torch.stack([xs, ys, torch.full((17,), 2.0)], -1).repeat(b, 1, 1)
    kp[..., :2] += torch.randn(b, 17, 2, generator=g) * 1.5
    kp[..., 2] = torch.where(torch.rand(b, 17, generator=g) < 0.15, 0.0, 2.0)
    return kp


def make_batch(b: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(b, 3, H, W, generator=g),
        "pids": torch.arange(b) // 2 % 4,
        "keypoints": make_keypoints(b, seed),
    }


# ---------------------------------------------------------- independent formulas
def ls_ce(logits: torch.Tensor, pids: torch.Tensor, eps: float = 0.1) -> float:
    """Label-smoothed cross entropy with explicit loops."""
    logits = logits.double()
    total = 0.0
    c = logits.shape[1]
    for i in range(logits.shape[0]):
        logp = logits[i] - torch.logsumexp(logits[i], 0)
        for k in range(c):
            q = (1 - eps) * (k == int(pids[i])) + eps / c
            total -= q * float(logp[k])
    return total / logits.shape[0]


def batch_hard(feat: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> float:
    f = feat.double()
    n = f.shape[0]
    losses = []
    for a in range(n):
        dp = [float((f[a] - f[p]).norm()) for p in range(n) if p != a and pids[p] == pids[a]]
        dn = [float((f[a] - f[q]).norm()) for q in range(n) if pids[q] != pids[a]]
        if dp and dn:
            losses.append(max(0.0, max(dp) - min(dn) + margin))
    return sum(losses) / len(losses)


def naive_loc(
    boxes: torch.Tensor, kp: np.ndarray, regions: list[list[int]], m=0.05, w=1.0, h=1.0
) -> float:
    """Eq. 3 per (sample, region) with visible keypoints, averaged; differences measured in
    pixels of a w x h map (x by w, y by h), the margin a fraction of the image."""
    ext = add_midpoints(torch.as_tensor(kp)).numpy()
    vals = []
    for b in range(boxes.shape[0]):
        for r, idx in enumerate(regions):
            pts = [ext[b, i] for i in idx if ext[b, i, 2] > 0]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            x0, y0, x1, y1 = (float(v) for v in boxes[b, r])
            vals.append(
                (w * (x0 - min(xs) + m)) ** 2
                + (w * (x1 - max(xs) - m)) ** 2
                + (h * (y0 - min(ys) + m)) ** 2
                + (h * (y1 - max(ys) - m)) ** 2
            )
    return sum(vals) / len(vals)


# ------------------------------------------------------------------------ Eq. 6
def test_weighted_feature_eq6_hand_case():
    a = torch.tensor([[3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0, 0.0]])
    out = weighted_feature([a, b], [0.5, 2.0])
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.4, 0.0, 2.0, 0.0]]))


def test_encode_is_eq6_of_the_bn_parts():
    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        enc = model.encode(batch)
        out = model(batch)  # eval mode: BNs use running statistics in both
    weights = (0.35, 0.5, 0.7, 0.8)
    expected_post, expected_pre = [], []
    for s, w in zip((1, 2, 3, 4), weights):
        for name, store in (("bn_feat", expected_post), ("feat", expected_pre)):
            v = out[f"{name}_{s}"].double().numpy()
            store.append(w * v / np.linalg.norm(v, axis=1, keepdims=True))
    np.testing.assert_allclose(enc["post_bn"].numpy(), np.concatenate(expected_post, 1), atol=1e-5)
    np.testing.assert_allclose(enc["pre_bn"].numpy(), np.concatenate(expected_pre, 1), atol=1e-5)
    assert enc["post_bn"].shape == (8, 4 * 8)  # four parts of part_dim
    # each part's norm is its Eq. 6 weight
    norms = enc["post_bn"].view(8, 4, 8).norm(dim=-1)
    torch.testing.assert_close(norms, torch.tensor(weights).expand(8, 4))


# ------------------------------------------------------------------------ Eq. 9
@pytest.mark.parametrize("lam, units", [(1.0, "map_pixels"), (0.3, "normalized")])
def test_compute_loss_is_eq9(lam: float, units: str):
    model = make_model(f"model.mgre.lam={lam}", f"model.mgre.loc_units={units}").train()
    batch = make_batch()
    out = model(batch)
    terms = model.compute_loss(out, batch)
    assert set(terms) == {f"{k}_{s}" for k in ("ce", "triplet") for s in (1, 2, 3, 4)} | {
        "loc_1",
        "loc_2",
        "loc_3",
    }
    pids = batch["pids"]
    kp = (batch["keypoints"] / torch.tensor([W, H, 1.0])).double().numpy()
    total = 0.0
    for s in (1, 2, 3, 4):
        stage_sum = ls_ce(out[f"logits_{s}"].detach(), pids) + batch_hard(
            out[f"feat_{s}"].detach(), pids
        )
        if s < 4:
            regions = [list(REGION_KEYPOINTS[n]) for n in STAGE_REGIONS[s]]
            # stage maps of a 64x32 input: 16x8, 8x4, 4x2 (W, H below)
            w, h = {1: (8, 16), 2: (4, 8), 3: (2, 4)}[s] if units == "map_pixels" else (1, 1)
            assert out[f"map_size_{s}"].tolist() == list({1: (8, 16), 2: (4, 8), 3: (2, 4)}[s])
            loc = naive_loc(out[f"boxes_{s}"].detach().double(), kp, regions, w=w, h=h)
            assert float(terms[f"loc_{s}"].detach()) == pytest.approx(lam * loc, rel=1e-4)
            stage_sum += loc
        total += (lam if s < 4 else 1.0) * stage_sum
    assert float(sum(terms.values()).detach()) == pytest.approx(total, rel=1e-4)


# ------------------------------------------------------- initialisation identities
def test_whole_body_region_is_the_stage3_map_at_init():
    model = make_model().eval()
    batch = make_batch(4)
    with torch.no_grad():
        out = model.run(batch["images"])
    maps, sources = out["stage_maps"], out["sources"]
    # guidance starts at zero: the modules read the plain stage maps
    for s in (1, 2):
        torch.testing.assert_close(sources[s], maps[s - 1])
    # the whole-body box is the whole image; sampled at the map's size it is the map
    torch.testing.assert_close(
        out["boxes"][3], torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).expand(4, 1, 4)
    )
    size = region_sample_size("whole_body", maps[2].shape[-2:])
    assert size == tuple(maps[2].shape[-2:])
    sampled = sample_regions(sources[3], out["boxes"][3], size)[:, 0]
    torch.testing.assert_close(sampled, maps[2], atol=1e-6, rtol=0)
    # every box starts at its Table 1 prior
    for s in (1, 2, 3):
        centers, sizes = stage_priors(s)
        torch.testing.assert_close(
            out["boxes"][s],
            torch.cat([centers - sizes / 2, centers + sizes / 2], -1).expand(4, -1, 4),
        )
    # a new feature-extraction block is the identity on its (non-negative) input
    block = model.region_blocks["3"][0]
    torch.testing.assert_close(block(maps[2]), maps[2])


def test_sample_sizes_follow_table1():
    assert region_sample_size("head", (64, 32)) == (8, 8)
    assert region_sample_size("legs", (64, 32)) == (24, 32)
    assert region_sample_size("left_torso", (64, 32)) == (32, 16)
    assert region_sample_size("upper_body", (32, 16)) == (16, 16)
    assert region_sample_size("whole_body", (16, 8)) == (16, 8)
    # half the input: half the size; table1 mode keeps Table 1
    assert region_sample_size("legs", (32, 16)) == (12, 16)
    assert region_sample_size("legs", (32, 16), "table1") == (24, 32)
    assert region_sample_size("head", (4, 2)) == (1, 1)


# ------------------------------------------------------------------ gradient flow
def _locator_grads(model: MGRe, loss: torch.Tensor) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        f"{s}.{name}": float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for s, loc in model.locators.items()
        for name, p in loc.named_parameters()
    }


def test_gradients_reach_the_location_modules_from_both_losses():
    model = make_model().train()
    batch = make_batch()
    # move the FC off zero so the conv below it receives gradient too
    with torch.no_grad():
        for loc in model.locators.values():
            loc.fc.weight.normal_(0, 1e-3)
    terms = model.compute_loss(model(batch), batch)
    loc_only = _locator_grads(model, sum(v for k, v in terms.items() if k.startswith("loc")))
    terms = model.compute_loss(model(batch), batch)
    id_only = _locator_grads(model, sum(v for k, v in terms.items() if k.startswith("ce")))
    for grads in (loc_only, id_only):
        for s in ("1", "2", "3"):
            assert grads[f"{s}.fc.weight"] > 0 and grads[f"{s}.fc.bias"] > 0
            assert grads[f"{s}.conv.weight"] > 0
    # the stage-4 terms alone do not reach the location modules
    terms = model.compute_loss(model(batch), batch)
    global_only = _locator_grads(model, terms["ce_4"] + terms["triplet_4"])
    assert all(v == 0 for v in global_only.values())


# ------------------------------------------------------------- variants / options
@pytest.mark.parametrize(
    "overrides, parts, located, dim",
    [
        ([], [1, 2, 3, 4], [1, 2, 3], 32),
        (["model.mgre.stages=[1]"], [1, 4], [1], 16),  # Table 4 Baseline+1
        (["model.mgre.stages=[2,3]"], [2, 3, 4], [2, 3], 24),  # Baseline+2+3
        (["model.mgre.granularity=single_features"], [1, 2, 3, 4], [1, 2, 3], 32),  # Table 5
        (["model.mgre.granularity=single_regions"], [1, 2, 3, 4], [], 32),
        (["model.mgre.whole_map_stages=[3]"], [1, 2, 3, 4], [1, 2], 32),
        (  # Table 7 Baseline+JO: location modules, BoT head, global feature only
            [
                "model.mgre.region_features=false",
                "model.mgre.global_head=bnneck",
                "model.mgre.semantic_guidance=false",
            ],
            [4],
            [1, 2, 3],
            64,
        ),
        (["model.mgre.regions_from=keypoints"], [1, 2, 3, 4], [1, 2, 3], 32),  # w/o JO
        (["model.mgre.part_dim=16"], [1, 2, 3, 4], [1, 2, 3], 64),  # Fig. 5
    ],
)
def test_variants_build_train_and_encode(overrides, parts, located, dim):
    model = make_model(*overrides)
    assert [p.stage for p in model.parts] == parts
    assert sorted(model.located_source) == located
    batch = make_batch(8)
    out = model.train()(batch)
    terms = model.compute_loss(out, batch)
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    # every trainable parameter is used (no unused parameters under DDP)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    with torch.no_grad():
        enc = model.eval().encode(batch)
    assert enc["post_bn"].shape == (8, dim)
    assert enc["boxes"].shape == (8, 7, 4)
    located_names = {n for s in located for n in STAGE_REGIONS[s]}
    for r, name in enumerate(REGION_NAMES):
        assert bool(torch.isnan(enc["boxes"][:, r]).all()) == (name not in located_names)


def test_single_features_regions_come_from_layer4():
    model = make_model("model.mgre.granularity=single_features")
    assert set(model.located_source.values()) == {4}
    assert all(p.source == 4 for p in model.parts)
    assert len(model.guidance) == 0  # no stage-1/2 map is read


def test_without_joint_optimisation_regions_follow_the_keypoints():
    model = make_model("model.mgre.regions_from=keypoints").eval()
    assert len(model.locators) == 0
    batch = make_batch(6)
    with torch.no_grad():
        boxes = model.encode(batch)["boxes"]
    kp = batch["keypoints"] / torch.tensor([W, H, 1.0])
    for s in (1, 2, 3):
        idx = [REGION_NAMES.index(n) for n in STAGE_REGIONS[s]]
        centers, sizes = stage_priors(s)
        regions = [list(REGION_KEYPOINTS[n]) for n in STAGE_REGIONS[s]]
        expected = keypoint_region_boxes(kp, regions, centers, sizes, 0.05)
        torch.testing.assert_close(boxes[:, idx], expected)
    # no keypoints at test time: refused with the way to provide them
    with pytest.raises(MissingBatchKeyError, match="data.keypoints"):
        model.encode({"images": batch["images"]})


def test_keypoint_region_boxes_fall_back_to_priors():
    kp = torch.zeros(2, 17, 3)
    kp[0, 0] = torch.tensor([0.5, 0.1, 2.0])  # only the nose of sample 0
    centers, sizes = stage_priors(1)
    regions = [list(REGION_KEYPOINTS[n]) for n in STAGE_REGIONS[1]]
    boxes = keypoint_region_boxes(kp, regions, centers, sizes, 0.05)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.45, 0.05, 0.55, 0.15]))
    prior = torch.cat([centers - sizes / 2, centers + sizes / 2], -1)
    torch.testing.assert_close(boxes[0, 1:], prior[1:])
    torch.testing.assert_close(boxes[1], prior)


def test_batch_requirements_follow_the_options():
    def req(*overrides):
        cfg = load_config(None, ["model.name=mgre", *overrides])
        return MGRe.batch_requirements(cfg)

    both, images = frozenset({"images", "keypoints"}), frozenset({"images"})
    assert req() == (both, images)
    assert req("model.mgre.loc_weight=0") == (images, images)  # no location loss
    assert req("model.mgre.granularity=single_regions") == (images, images)
    assert req("model.mgre.regions_from=keypoints") == (both, both)
    train, _ = req()
    with pytest.raises(MissingBatchKeyError, match="reidkit keypoints --onnx"):
        check_requirements("mgre", train, {"images", "pids"})


def test_evaluation_refuses_a_dataset_without_keypoints_for_wo_jo():
    from reidkit.data.records import ImageRecord, ReIDDataset
    from reidkit.engine import evaluate_model

    cfg = load_config(None, ["model.name=mgre", "model.mgre.regions_from=keypoints"])
    model = make_model("model.mgre.regions_from=keypoints")
    recs = [ImageRecord("/nonexistent/a.jpg", 1, 0)]
    ds = ReIDDataset("fake", "/nonexistent", recs, recs, recs)
    with pytest.raises(MissingBatchKeyError, match="query/gallery.*data.keypoints"):
        evaluate_model(cfg, model, ds, "cpu")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mgre.stages=[4]", "among 1, 2, 3"),
        ("model.mgre.whole_map_stages=[2]", r"whole_map_stages \[2\] are not in stages"),
        ("model.mgre.stages=[1,2]", None),
        ("model.mgre.region_keypoints={hand: [9]}", "unknown region 'hand'"),
        ("model.mgre.region_keypoints={head: [19]}", "0-16"),
        ("model.mgre.feature_weights=[1,1,1]", "4 positive weights"),
        ("model.mgre.lamda=0.5", "did you mean 'model.mgre.lam'"),
    ],
)
def test_options_are_validated(override, message):
    overrides = ["model.name=mgre", override]
    if "whole_map" in override:
        overrides.append("model.mgre.stages=[1]")
    if message is None:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_region_keypoints_override_changes_the_location_target():
    model = make_model("model.mgre.region_keypoints={head: [0]}")
    assert model.region_keypoints[1][0] == [0]
    assert model.region_keypoints[1][1] == list(REGION_KEYPOINTS["left_torso"])


# ---------------------------------------------------------------------- analyses
def test_mean_region_iou_matches_a_direct_computation():
    model = make_model().eval()
    batches = [make_batch(4, seed=i) for i in range(2)]
    got = mean_region_iou(model, batches, "cpu")
    per_region = mean_region_iou(model, batches, "cpu", per_region=True)
    assert set(got) == {1, 2, 3} and set(per_region) == set(REGION_NAMES)
    # independent: loop over samples and regions with box_iou of explicit keypoint boxes
    sums = {s: [0.0, 0] for s in (1, 2, 3)}
    for batch in batches:
        boxes = model.predict_boxes(batch["images"], batch["keypoints"])
        kp = add_midpoints(batch["keypoints"] / torch.tensor([W, H, 1.0]))
        for b in range(boxes.shape[0]):
            for r, name in enumerate(REGION_NAMES):
                pts = [kp[b, i] for i in REGION_KEYPOINTS[name] if kp[b, i, 2] > 0]
                if not pts:
                    continue
                xs = [float(p[0]) for p in pts]
                ys = [float(p[1]) for p in pts]
                target = torch.tensor(
                    [min(xs) - 0.05, min(ys) - 0.05, max(xs) + 0.05, max(ys) + 0.05]
                )
                s = next(s for s, names in STAGE_REGIONS.items() if name in names)
                sums[s][0] += float(box_iou(boxes[b, r], target))
                sums[s][1] += 1
    for s in (1, 2, 3):
        assert got[s] == pytest.approx(sums[s][0] / sums[s][1], rel=1e-5)
    iou, valid = region_iou(
        torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]),
        torch.zeros(1, 17, 3),
        [[0]],
    )
    assert not valid.any() and float(iou) == 0.0


def test_stage_activation_maps_shapes_and_range():
    model = make_model().eval()
    batch = make_batch(3)
    maps = model.stage_activation_maps(batch["images"], batch["pids"][:3])
    assert set(maps) == {"stage1", "stage2", "stage3", "stage4", "final"}
    assert maps["stage1"].shape == (3, 16, 8) and maps["final"].shape == (3, H, W)
    for m in maps.values():
        assert float(m.min()) >= 0 and float(m.max()) <= 1 + 1e-6
        assert not m.requires_grad
    assert not any(p.grad is not None for p in model.parameters())


def test_region_iou_of_the_prior_boxes_is_what_box_iou_says():
    kp = torch.zeros(1, 17, 3)
    kp[0, 0] = torch.tensor([0.45, 0.05, 2.0])
    kp[0, 4] = torch.tensor([0.55, 0.15, 2.0])
    head = torch.tensor([[[0.4, 0.0, 0.6, 0.2]]])
    iou, valid = region_iou(head, kp, [[0, 1, 2, 3, 4]])
    # target = [0.4, 0.0, 0.6, 0.2]: identical
    assert bool(valid.all()) and float(iou) == pytest.approx(1.0)
    half = torch.tensor([[[0.4, 0.0, 0.5, 0.2]]])
    assert float(region_iou(half, kp, [[0, 1, 2, 3, 4]])[0]) == pytest.approx(0.5)


def test_reid_box_grad_zero_keeps_the_id_loss_out_of_the_boxes():
    model = make_model("model.mgre.reid_box_grad=0").train()
    batch = make_batch()
    with torch.no_grad():
        for loc in model.locators.values():
            loc.fc.weight.normal_(0, 1e-3)
    terms = model.compute_loss(model(batch), batch)
    id_only = _locator_grads(model, sum(v for k, v in terms.items() if k.startswith("ce")))
    assert all(v == 0 for v in id_only.values())
    terms = model.compute_loss(model(batch), batch)
    loc_only = _locator_grads(model, sum(v for k, v in terms.items() if k.startswith("loc")))
    assert all(loc_only[f"{s}.fc.weight"] > 0 for s in ("1", "2", "3"))
    with pytest.raises(ConfigError, match="nothing would train the location modules"):
        load_config(
            None, ["model.name=mgre", "model.mgre.reid_box_grad=0", "model.mgre.loc_weight=0"]
        )


@pytest.mark.parametrize("factor", [0.01, 1.0])
def test_location_modules_get_their_own_learning_rate(factor):
    cfg = load_config(
        None, ["model.name=mgre", "model.mgre.part_dim=8", f"model.mgre.locator_lr_factor={factor}"]
    )
    torch.manual_seed(0)
    model = MGRe(cfg, 4, backbone=build_backbone("resnet18", width=8))
    main = model.optimizers(cfg)["main"].optimizer
    seen = [id(p) for g in main.param_groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)  # every parameter exactly once
    locator = {id(p) for p in model.locators.parameters()}
    for group in main.param_groups:
        ids = {id(p) for p in group["params"]}
        base = cfg.solver.bias_lr_factor if group["group_name"].endswith("bias") else 1.0
        if ids <= locator and factor != 1.0:
            assert group["lr_factor"] == pytest.approx(base * factor)
            assert group["lr"] == pytest.approx(cfg.solver.lr * base * factor)
        else:
            assert not (ids & locator) or factor == 1.0
            assert group["lr_factor"] == pytest.approx(base)
    # the engine's schedule keeps the factor
    from reidkit.engine.optim import LRScheduler

    LRScheduler(main, lambda e: 2e-3).set_epoch(0)
    lrs = {g["group_name"]: g["lr"] for g in main.param_groups}
    assert lrs["weight"] == pytest.approx(2e-3)
    if factor != 1.0:
        assert lrs["locator_weight"] == pytest.approx(2e-3 * factor)


def test_locator_pooling_equals_the_adaptive_pooling_and_exports(tmp_path):
    from reidkit.methods.mgre import RegionLocator

    loc = RegionLocator.for_stage(1, 8).eval()
    for hw in ((32, 16), (16, 8), (12, 6), (4, 2)):  # divisible, and smaller than the grid
        x = torch.randn(2, 64, *hw)
        torch.testing.assert_close(loc._max_pool(x), loc.pool(x))
    from reidkit.export import export_onnx

    pytest.importorskip("onnxruntime")
    model = make_model().eval()
    result = export_onnx(model, tmp_path / "mgre.onnx", (128, 64), dynamic_batch=False)
    assert result.dim == 4 * 8 and result.rel_diff < 1e-4
