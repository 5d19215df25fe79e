"""MGRe building blocks against hand-worked cases and literal re-implementations of the
paper's Eqs. 2-5 (naive loops), plus gradient checks and the whole-map identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reidkit.methods.mgre import (
    HIP_MIDPOINT,
    REGION_CENTERS,
    REGION_KEYPOINTS,
    REGION_PRIOR_SIZES,
    REGION_SAMPLE_SIZES,
    SHOULDER_MIDPOINT,
    STAGE_REGIONS,
    RegionLocator,
    add_midpoints,
    box_iou,
    keypoint_boxes,
    location_loss,
    region_boxes,
    sample_regions,
    stage_priors,
    stage_region_keypoints,
)


# ------------------------------------------------------------------------ constants
def test_table1_constants_and_prior_sizes():
    assert STAGE_REGIONS == {
        1: ("head", "left_torso", "right_torso", "legs"),
        2: ("upper_body", "lower_body"),
        3: ("whole_body",),
    }
    assert REGION_CENTERS["head"] == (0.5, 1 / 12)
    assert REGION_CENTERS["left_torso"] == REGION_CENTERS["right_torso"] == (0.5, 1 / 3)
    assert REGION_CENTERS["legs"] == REGION_CENTERS["lower_body"] == (0.5, 0.75)
    assert REGION_CENTERS["whole_body"] == (0.5, 0.5)
    assert REGION_SAMPLE_SIZES["legs"] == (24, 32) and REGION_SAMPLE_SIZES["whole_body"] == (16, 8)
    # prior size = Table 1 sample size over the stage map (64x32, 32x16, 16x8)
    assert REGION_PRIOR_SIZES["head"] == (8 / 32, 8 / 64)
    assert REGION_PRIOR_SIZES["left_torso"] == (0.5, 0.5)
    assert REGION_PRIOR_SIZES["legs"] == (1.0, 24 / 64)
    assert REGION_PRIOR_SIZES["upper_body"] == (1.0, 0.5)
    assert REGION_PRIOR_SIZES["whole_body"] == (1.0, 1.0)
    centers, sizes = stage_priors(1)
    assert centers.shape == sizes.shape == (4, 2)
    assert stage_region_keypoints(2) == [list(range(13)), [11, 12, 13, 14, 15, 16]]
    for side, (shoulder, hip) in {"left_torso": (5, 11), "right_torso": (6, 12)}.items():
        assert set(REGION_KEYPOINTS[side]) == {shoulder, hip, SHOULDER_MIDPOINT, HIP_MIDPOINT}
    with pytest.raises(ValueError, match="stages 1-3"):
        stage_priors(4)


def test_add_midpoints_hand_case():
    kp = torch.zeros(1, 17, 3)
    kp[0, 5] = torch.tensor([0.6, 0.2, 2.0])
    kp[0, 6] = torch.tensor([0.4, 0.3, 1.0])
    kp[0, 11] = torch.tensor([0.58, 0.55, 2.0])
    kp[0, 12] = torch.tensor([0.42, 0.55, 0.0])  # right hip invisible -> hip midpoint too
    out = add_midpoints(kp)
    assert out.shape == (1, 19, 3)
    torch.testing.assert_close(out[0, :17], kp[0])
    torch.testing.assert_close(out[0, SHOULDER_MIDPOINT], torch.tensor([0.5, 0.25, 1.0]))
    assert out[0, HIP_MIDPOINT, 2] == 0
    with pytest.raises(ValueError, match=r"\(B, 17, 3\)"):
        add_midpoints(torch.zeros(2, 16, 3))


# ----------------------------------------------------------------------------- Eq. 2
def naive_boxes(params: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Eq. 2 literally, with W = H = 1 (normalised) and dC = tanh, l = exp."""
    out = np.zeros_like(params)
    for b in range(params.shape[0]):
        for r in range(params.shape[1]):
            dcx, dcy = math.tanh(params[b, r, 0]), math.tanh(params[b, r, 1])
            l1, l2 = math.exp(params[b, r, 2]), math.exp(params[b, r, 3])
            cx, cy = centers[r]
            out[b, r] = [
                (cx + dcx) * 1 - l1 / 2,
                (cy + dcy) * 1 - l2 / 2,
                (cx + dcx) * 1 + l1 / 2,
                (cy + dcy) * 1 + l2 / 2,
            ]
    return out


def test_region_boxes_hand_case_and_formula():
    params = torch.tensor([[[math.atanh(0.1), math.atanh(-0.2), math.log(0.5), math.log(0.25)]]])
    box = region_boxes(params, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(box, torch.tensor([[[0.35, 0.175, 0.85, 0.425]]]))
    zero = region_boxes(torch.zeros(1, 1, 4), torch.tensor([[0.5, 0.25]]))
    torch.testing.assert_close(zero, torch.tensor([[[0.0, -0.25, 1.0, 0.75]]]))

    g = torch.Generator().manual_seed(0)
    params = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    centers, _ = stage_priors(1, dtype=torch.float64)
    got = region_boxes(params, centers)
    torch.testing.assert_close(got.numpy(), naive_boxes(params.numpy(), centers.numpy()))
    with pytest.raises(ValueError, match="centers"):
        region_boxes(params, centers[:3])


def test_region_boxes_gradcheck():
    g = torch.Generator().manual_seed(1)
    params = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    centers = torch.rand(3, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: region_boxes(p, centers), (params,))


# ----------------------------------------------------------------------------- Eq. 3
def naive_location_loss(boxes, keypoints, region_keypoints, margin=0.05) -> float:
    """Eq. 3 literally with Python lists; midpoints computed by hand."""
    total, count = 0.0, 0
    for b in range(boxes.shape[0]):
        pts = {i: keypoints[b, i].tolist() for i in range(17)}
        for mid, (p, q) in {SHOULDER_MIDPOINT: (5, 6), HIP_MIDPOINT: (11, 12)}.items():
            a, c = pts[p], pts[q]
            vis = 1.0 if a[2] > 0 and c[2] > 0 else 0.0
            pts[mid] = [(a[0] + c[0]) / 2, (a[1] + c[1]) / 2, vis]
        for r, indices in enumerate(region_keypoints):
            xs = [pts[i][0] for i in indices if pts[i][2] > 0]
            ys = [pts[i][1] for i in indices if pts[i][2] > 0]
            if not xs:
                continue
            x_min, y_min, x_max, y_max = boxes[b, r].tolist()
            total += (
                (x_min - min(xs) + margin) ** 2
                + (x_max - max(xs) - margin) ** 2
                + (y_min - min(ys) + margin) ** 2
                + (y_max - max(ys) - margin) ** 2
            )
            count += 1
    return total / count if count else 0.0


def random_keypoints(batch: int, seed: int, p_visible: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(batch, 17, 3, generator=g, dtype=torch.float64)
    kp[..., 2] = (torch.rand(batch, 17, generator=g) < p_visible).double() * 2
    return kp


def test_location_loss_hand_case():
    kp = torch.zeros(1, 17, 3)
    kp[0, 0] = torch.tensor([0.2, 0.3, 2.0])
    kp[0, 1] = torch.tensor([0.4, 0.6, 1.0])
    kp[0, 2] = torch.tensor([0.9, 0.9, 0.0])  # invisible: ignored
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.7]]])
    # target (0.15, 0.25, 0.45, 0.65): four squared differences of 0.05
    loss = location_loss(boxes, kp, [[0, 1, 2]])
    torch.testing.assert_close(loss, torch.tensor(4 * 0.05**2))
    # the same box exactly on target: zero
    target = torch.tensor([[[0.15, 0.25, 0.45, 0.65]]])
    torch.testing.assert_close(location_loss(target, kp, [[0, 1, 2]]), torch.tensor(0.0))


def test_half_torso_boxes_use_midpoints():
    kp = torch.zeros(1, 17, 3)
    kp[0, 5] = torch.tensor([0.6, 0.3, 2.0])  # left shoulder
    kp[0, 6] = torch.tensor([0.4, 0.3, 2.0])
    kp[0, 11] = torch.tensor([0.58, 0.55, 2.0])  # left hip
    kp[0, 12] = torch.tensor([0.42, 0.55, 2.0])
    boxes, valid = keypoint_boxes(kp, stage_region_keypoints(1))
    assert valid.tolist() == [[False, True, True, True]]  # no face point: head empty
    torch.testing.assert_close(boxes[0, 1], torch.tensor([0.5, 0.3, 0.6, 0.55]))
    torch.testing.assert_close(boxes[0, 2], torch.tensor([0.4, 0.3, 0.5, 0.55]))
    torch.testing.assert_close(boxes[0, 0], torch.zeros(4))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_location_loss_matches_naive(stage):
    regions = stage_region_keypoints(stage)
    kp = random_keypoints(6, seed=stage, p_visible=0.5)
    kp[0, :, 2] = 0  # a sample with nothing visible
    g = torch.Generator().manual_seed(10 + stage)
    boxes = torch.rand(6, len(regions), 4, generator=g, dtype=torch.float64)
    got = location_loss(boxes, kp, regions)
    want = naive_location_loss(boxes, kp, regions)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    got_m = location_loss(boxes, kp, regions, margin=0.0)
    assert got_m.item() == pytest.approx(naive_location_loss(boxes, kp, regions, 0.0), rel=1e-12)


def test_location_loss_empty_pairs_add_nothing_and_no_pair_keeps_graph():
    regions = [[0, 1], [15, 16]]
    kp = random_keypoints(2, seed=3, p_visible=1.0)
    kp[1, 15:, 2] = 0  # sample 1, region 1: no visible keypoint
    boxes = torch.rand(2, 2, 4, dtype=torch.float64, requires_grad=True)
    loss = location_loss(boxes, kp, regions)
    loss.backward()
    assert torch.isfinite(boxes.grad).all()
    assert (boxes.grad[1, 1] == 0).all() and (boxes.grad[0] != 0).any()
    moved = boxes.detach().clone()
    moved[1, 1] += 5.0  # the uncounted pair's box does not matter
    assert location_loss(moved, kp, regions).item() == pytest.approx(loss.item())
    # mean over the 3 counted pairs, not 4
    assert loss.item() == pytest.approx(naive_location_loss(boxes.detach(), kp, regions))

    kp[..., 2] = 0
    boxes.grad = None
    empty = location_loss(boxes, kp, regions)
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert (boxes.grad == 0).all()
    with pytest.raises(ValueError, match="index 19"):
        location_loss(boxes, kp, [[0], [19]])
    with pytest.raises(ValueError, match="regions"):
        location_loss(boxes, kp, [[0]])


def test_location_loss_gradcheck():
    regions = stage_region_keypoints(1)
    kp = random_keypoints(3, seed=5, p_visible=0.6)
    boxes = torch.rand(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: location_loss(b, kp, regions), (boxes,))


# --------------------------------------------------------------------------- Eq. 4-5
def naive_sample(fmap: np.ndarray, boxes: np.ndarray, n_out: int, m_out: int) -> np.ndarray:
    """Eq. 4 at output pixel centres (x^t = j + 1/2) in map pixels, then Eq. 5's bilinear
    sum over every input pixel (pixel m's centre is at m + 1/2)."""
    b_, c_, h, w = fmap.shape
    r_ = boxes.shape[1]
    out = np.zeros((b_, r_, c_, n_out, m_out))
    for b in range(b_):
        for r in range(r_):
            x0, y0, x1, y1 = boxes[b, r]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            l1, l2 = (x1 - x0) * w, (y1 - y0) * h  # size in map pixels
            for i in range(n_out):
                for j in range(m_out):
                    xs = cx * w + (j + 0.5 - m_out / 2) * l1 / m_out - 0.5
                    ys = cy * h + (i + 0.5 - n_out / 2) * l2 / n_out - 0.5
                    for n in range(h):
                        for m in range(w):
                            k = max(0.0, 1 - abs(xs - m)) * max(0.0, 1 - abs(ys - n))
                            out[b, r, :, i, j] += fmap[b, :, n, m] * k
    return out


def test_sample_regions_matches_eq5_loops():
    g = torch.Generator().manual_seed(7)
    fmap = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [[0.1, 0.2, 0.6, 0.9], [-0.2, 0.5, 0.4, 1.3]],  # second box leaves the map
            [[0.3, 0.05, 0.95, 0.45], [0.0, 0.0, 1.0, 1.0]],
        ],
        dtype=torch.float64,
    )
    got = sample_regions(fmap, boxes, (4, 3))
    assert got.shape == (2, 2, 3, 4, 3)
    want = naive_sample(fmap.numpy(), boxes.numpy(), 4, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_sample_regions_whole_map_identity_and_sub_box():
    g = torch.Generator().manual_seed(8)
    fmap = torch.randn(2, 4, 16, 8, generator=g)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, 3, 4)
    out = sample_regions(fmap, whole, (16, 8))
    for r in range(3):
        assert torch.equal(out[:, r], fmap)  # power-of-two sizes: bit-exact
    odd = torch.randn(1, 2, 7, 5, generator=g)
    out_odd = sample_regions(odd, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), (7, 5))
    torch.testing.assert_close(out_odd[:, 0], odd, rtol=0, atol=1e-6)
    # the left half at half width is the left half of the map
    left = sample_regions(fmap, torch.tensor([[0.0, 0.0, 0.5, 1.0]]).expand(2, 1, 4), (16, 4))
    assert torch.equal(left[:, 0], fmap[..., :4])
    with pytest.raises(ValueError, match="boxes"):
        sample_regions(fmap, torch.zeros(3, 1, 4), (2, 2))


def test_sample_regions_gradcheck():
    g = torch.Generator().manual_seed(9)
    fmap = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(
        [[[0.13, 0.21, 0.71, 0.83], [0.31, 0.07, 0.94, 0.62]]],
        dtype=torch.float64,
        requires_grad=True,
    )
    assert torch.autograd.gradcheck(lambda f, b: sample_regions(f, b, (3, 2)), (fmap, boxes))


def test_box_iou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(
        box_iou(torch.tensor([0.0, 0.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 3.0, 1.0])),
        torch.tensor(1 / 3),
    )


# ------------------------------------------------------------------ location module
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_region_locator_starts_at_priors(stage):
    torch.manual_seed(0)
    loc = RegionLocator.for_stage(stage, in_channels=8, mid_channels=4)
    x = torch.randn(3, 8, 16, 8)
    params = loc(x)
    assert params.shape == (3, len(STAGE_REGIONS[stage]), 4)
    centers, sizes = stage_priors(stage)
    prior = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)
    torch.testing.assert_close(loc.boxes(x), prior.expand(3, -1, -1))
    assert "centers" not in loc.state_dict()  # priors come from the config, not the weights


def person_keypoints(center_x: torch.Tensor) -> torch.Tensor:
    """A standing person (COCO-17, normalised, all visible) centred at ``center_x`` (B,)."""
    template = torch.tensor(
        [
            [0.0, 0.08], [0.03, 0.06], [-0.03, 0.06], [0.06, 0.07], [-0.06, 0.07],
            [0.12, 0.2], [-0.12, 0.2], [0.15, 0.35], [-0.15, 0.35], [0.16, 0.48],
            [-0.16, 0.48], [0.08, 0.52], [-0.08, 0.52], [0.08, 0.72], [-0.08, 0.72],
            [0.08, 0.92], [-0.08, 0.92],
        ]
    )  # fmt: skip
    kp = torch.zeros(len(center_x), 17, 3)
    kp[..., 0] = template[:, 0] + center_x[:, None]
    kp[..., 1] = template[:, 1]
    kp[..., 2] = 2
    return kp


def test_region_locator_learns_where_the_person_is():
    # the feature map marks the person's column; the boxes must follow it
    torch.manual_seed(0)
    columns = torch.arange(8)
    x = torch.zeros(8, 4, 16, 8)
    x[columns, :, :, columns] = 1.0
    kp = person_keypoints((columns + 0.5) / 8 * 0.6 + 0.2)
    loc = RegionLocator.for_stage(1, in_channels=4, mid_channels=8, pool_size=(4, 8))
    regions = stage_region_keypoints(1)
    opt = torch.optim.Adam(loc.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = location_loss(loc.boxes(x), kp, regions)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    loc.eval()
    final = location_loss(loc.boxes(x), kp, regions).item()
    assert final < 0.1 * losses[0], (losses[0], final)
    # better than the best box that ignores the input (the mean target box)
    target, _ = keypoint_boxes(kp, regions, margin=0.05)
    constant = location_loss(target.mean(0, keepdim=True).expand_as(target), kp, regions)
    assert final < 0.5 * constant.item(), (final, constant.item())
    with pytest.raises(ValueError, match="positive"):
        RegionLocator(4, torch.zeros(1, 2), torch.zeros(1, 2))


def test_location_loss_scale_measures_in_map_pixels():
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9]]])
    kp = torch.zeros(1, 17, 3)
    kp[0, 0] = torch.tensor([0.2, 0.3, 2.0])
    kp[0, 1] = torch.tensor([0.5, 0.7, 2.0])
    # target box with margin 0.05: [0.15, 0.25, 0.55, 0.75]
    dx0, dy0, dx1, dy1 = 0.1 - 0.15, 0.2 - 0.25, 0.6 - 0.55, 0.9 - 0.75
    plain = location_loss(boxes, kp, [[0, 1]])
    assert float(plain) == pytest.approx(dx0**2 + dy0**2 + dx1**2 + dy1**2)
    scaled = location_loss(boxes, kp, [[0, 1]], scale=(32, 64))
    expected = 32**2 * (dx0**2 + dx1**2) + 64**2 * (dy0**2 + dy1**2)
    assert float(scaled) == pytest.approx(expected, rel=1e-5)
