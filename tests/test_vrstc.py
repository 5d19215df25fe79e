"""VRSTC building blocks: occlusion scoring, regions and masks, temporal attention, STCnet.

Scores and attention against naive loops over frames / positions; STCnet modules by
shapes at 256x128 and 64x32, the compositing formulas and gradient flow (tiny widths).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reidkit.methods import vrstc
from reidkit.methods.vrstc import (
    adjacent_unoccluded,
    detect_occluded,
    occlusion_scores,
    occlusion_scores_batched,
    random_region_masks,
    region_bounds,
    region_pixel_masks,
    region_pool,
    regions_to_mask,
    temporal_attention,
)
from reidkit.models.stcnet import (
    GlobalDiscriminator,
    LocalDiscriminator,
    SpatialStructureGenerator,
    STCNet,
    TemporalAttentionGenerator,
    crop_boxes,
    mask_bounding_boxes,
    rows_per_chunk,
)

torch.set_num_threads(1)
DT = torch.float64


# ----------------------------------------------------------------------------- scoring
def naive_scores(feats):
    t, r, d = feats.shape
    out = torch.empty(t, r, dtype=feats.dtype)
    for j in range(r):
        mean = [sum(float(feats[i, j, k]) for i in range(t)) / t for k in range(d)]
        mn = math.sqrt(sum(v * v for v in mean))
        for i in range(t):
            f = [float(v) for v in feats[i, j]]
            fn = math.sqrt(sum(v * v for v in f))
            out[i, j] = sum(a * b for a, b in zip(f, mean)) / (fn * mn)
    return out


def test_occlusion_scores_hand_case():
    # Region of 3 frames: two agree, one differs. Mean = (2/3, 1/3).
    feats = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    scores = occlusion_scores(feats)
    assert scores.shape == (3, 1)
    assert scores[0, 0].item() == pytest.approx(2 / math.sqrt(5))  # 0.894: just above tau
    assert scores[2, 0].item() == pytest.approx(1 / math.sqrt(5))
    assert detect_occluded(scores).flatten().tolist() == [False, False, True]


@pytest.mark.parametrize("shape", [(8, 3, 16), (1, 2, 4), (5, 4, 7)])
def test_occlusion_scores_match_loop(shape):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(*shape, generator=g, dtype=DT)
    torch.testing.assert_close(occlusion_scores(feats), naive_scores(feats))


def test_batched_scores_with_padding():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 6, 3, 8, generator=g, dtype=DT)
    lengths = [6, 2, 4]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    feats[~mask] = 1e6  # padding content must not matter
    scores = occlusion_scores_batched(feats, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(scores[b, :n], naive_scores(feats[b, :n]))
        assert torch.isnan(scores[b, n:]).all()
    assert not detect_occluded(scores)[~mask].any()
    torch.testing.assert_close(occlusion_scores_batched(feats[:1])[0], occlusion_scores(feats[0]))
    with pytest.raises(ValueError, match="no real frame"):
        occlusion_scores_batched(feats, torch.zeros(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(T, R, D\)"):
        occlusion_scores(feats)


# ----------------------------------------------------------------------------- regions
def test_region_bounds_partition():
    assert region_bounds(16, 3) == [(0, 5), (5, 10), (10, 16)]
    assert region_bounds(256, 3) == [(0, 85), (85, 170), (170, 256)]
    with pytest.raises(ValueError):
        region_bounds(2, 3)
    masks = region_pixel_masks(10, 4, 3)
    assert masks.shape == (3, 10, 4)
    assert torch.equal(masks.sum(0), torch.ones(10, 4))
    for i, (a, b) in enumerate(region_bounds(10, 3)):
        assert masks[i, a:b].eq(1).all() and masks[i].sum() == (b - a) * 4


def test_regions_to_mask_and_pool_match_loops():
    flags = torch.tensor([[True, False, True], [False, False, False]])
    m = regions_to_mask(flags, 16, 4)
    assert m.shape == (2, 1, 16, 4)
    assert m[0, 0, :5].eq(1).all() and m[0, 0, 5:10].eq(0).all() and m[0, 0, 10:].eq(1).all()
    assert m[1].eq(0).all()
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 5, 16, 3, generator=g, dtype=DT)
    pooled = region_pool(fmap, 3)
    for i, (a, b) in enumerate(region_bounds(16, 3)):
        torch.testing.assert_close(pooled[:, i], fmap[:, :, a:b].mean(dim=(2, 3)))


@pytest.mark.parametrize("rows,height", [(4, 64), (8, 128), (16, 256), (5, 37), (3, 3)])
def test_pixel_aligned_region_pool_matches_upsampled_average(rows, height):
    # the aligned pooling equals averaging the map upsampled to pixel rows (nearest,
    # each map row repeated over the pixels it covers) over each pixel region
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 4, rows, 3, generator=g, dtype=DT)
    pooled = region_pool(fmap, 3, image_height=height)
    steps = 1000  # sub-pixel grid so fractional spans are exact enough
    fine = fmap.repeat_interleave(steps, dim=2)  # rows * steps sub-rows
    for i, (a, b) in enumerate(region_bounds(height, 3)):
        lo, hi = round(a * rows * steps / height), round(b * rows * steps / height)
        want = fine[:, :, lo:hi].mean(dim=(2, 3))
        torch.testing.assert_close(pooled[:, i], want, atol=2e-3, rtol=0)
    # when the map rows align with the pixel regions, both poolings agree
    aligned = torch.randn(1, 2, 6, 2, generator=g, dtype=DT)
    torch.testing.assert_close(region_pool(aligned, 3, image_height=12), region_pool(aligned, 3))


def test_random_region_masks_are_seeded_and_region_shaped():
    m1, f1 = random_region_masks(200, 64, 32, num_regions=3, max_masked=2, generator=7)
    m2, f2 = random_region_masks(200, 64, 32, num_regions=3, max_masked=2, generator=7)
    m3, _ = random_region_masks(200, 64, 32, num_regions=3, max_masked=2, generator=8)
    assert torch.equal(m1, m2) and torch.equal(f1, f2) and not torch.equal(m1, m3)
    counts = f1.sum(1)
    assert counts.min() == 1 and counts.max() == 2
    torch.testing.assert_close(m1, regions_to_mask(f1, 64, 32))
    _, one = random_region_masks(3000, 12, 4, generator=torch.Generator().manual_seed(0))
    assert (one.sum(1) == 1).all()
    freq = one.float().mean(0)  # each region about 1/3 of the time
    assert (freq - 1 / 3).abs().max() < 0.03
    with pytest.raises(ValueError, match="max_masked"):
        random_region_masks(2, 12, 4, max_masked=4)


def naive_adjacent(flags):
    t = len(flags)
    prev, nxt = [], []
    for i in range(t):
        p = max((j for j in range(i) if flags[j]), default=-1)
        n = min((j for j in range(i + 1, t) if flags[j]), default=-1)
        prev.append(p if p >= 0 else n)
        nxt.append(n if n >= 0 else p)
    return prev, nxt


def test_adjacent_unoccluded_matches_loop():
    g = torch.Generator().manual_seed(0)
    flags = torch.rand(64, 7, generator=g) < 0.4
    flags[0] = False
    flags[1] = torch.tensor([0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    prev, nxt = adjacent_unoccluded(flags)
    for row in range(64):
        p, n = naive_adjacent(flags[row].tolist())
        assert prev[row].tolist() == p and nxt[row].tolist() == n, flags[row]
    assert (prev[0] == -1).all()


# ----------------------------------------------------------------------------- attention
def naive_temporal_attention(cur, adj_list, patch, scale):
    """Loop over positions a of the current map and b of every adjacent map."""
    b, c, h, w = cur.shape
    r = patch // 2

    def patch_vec(x, i, j):
        hh, ww = x.shape[-2:]
        v = []
        for di in range(-r, r + 1):
            for dj in range(-r, r + 1):
                y, z = i + di, j + dj
                inside = 0 <= y < hh and 0 <= z < ww
                v.append(x[:, y, z] if inside else torch.zeros(x.shape[0], dtype=x.dtype))
        v = torch.cat(v)
        n = float(v.norm())
        return v / n if n > 0 else v

    out = torch.zeros_like(cur)
    for n in range(b):
        keys, values = [], []
        for adj in adj_list:
            for i in range(adj.shape[-2]):
                for j in range(adj.shape[-1]):
                    keys.append(patch_vec(adj[n], i, j))
                    values.append(adj[n, :, i, j])
        for i in range(h):
            for j in range(w):
                q = patch_vec(cur[n], i, j)
                s = [scale * float(q @ k) for k in keys]
                mx = max(s)
                e = [math.exp(v - mx) for v in s]
                tot = sum(e)
                out[n, :, i, j] = sum((ei / tot) * v for ei, v in zip(e, values))
    return out


@pytest.mark.parametrize(
    "patch,scale,h,w,ha,wa", [(3, 10.0, 5, 4, 5, 4), (1, 10.0, 3, 3, 3, 3), (5, 3.0, 4, 6, 3, 5)]
)
def test_temporal_attention_matches_loop(patch, scale, h, w, ha, wa):
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(2, 3, h, w, generator=g, dtype=DT)
    adj = torch.randn(2, 3, ha, wa, generator=g, dtype=DT)
    ref = naive_temporal_attention(cur, [adj], patch, scale)
    for chunk in (None, 1, 2):
        got = temporal_attention(cur, adj, patch=patch, scale=scale, chunk_rows=chunk)
        torch.testing.assert_close(got, ref)


def test_joint_attention_over_two_frames_matches_loop():
    g = torch.Generator().manual_seed(1)
    cur = torch.randn(1, 2, 4, 3, generator=g, dtype=DT)
    adj = torch.randn(1, 2, 2, 4, 3, generator=g, dtype=DT)
    ref = naive_temporal_attention(cur, [adj[:, 0], adj[:, 1]], 3, 10.0)
    torch.testing.assert_close(temporal_attention(cur, adj), ref)


def test_temporal_attention_finds_the_shifted_frame():
    """The adjacent frame is the current one moved right by one column: with a sharp
    softmax every interior position copies its own feature back from its new place."""
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(1, 8, 6, 7, generator=g, dtype=DT)
    adj = torch.zeros_like(cur)
    adj[..., 1:] = cur[..., :-1]
    out = temporal_attention(cur, adj, scale=1000.0)
    torch.testing.assert_close(out[..., 1:-1, 1:-2], cur[..., 1:-1, 1:-2])


def test_temporal_attention_checkpoint_and_chunks_same_gradients():
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(2, 4, 6, 5, generator=g, dtype=DT, requires_grad=True)
    adj = torch.randn(2, 4, 6, 5, generator=g, dtype=DT, requires_grad=True)
    weight = torch.randn(2, 4, 6, 5, generator=g, dtype=DT)
    grads = []
    for kwargs in ({}, {"chunk_rows": 2}, {"chunk_rows": 2, "checkpoint": True}):
        cur.grad = adj.grad = None
        (temporal_attention(cur, adj, **kwargs) * weight).sum().backward()
        grads.append((cur.grad.clone(), adj.grad.clone()))
    for gc, ga in grads[1:]:
        torch.testing.assert_close(gc, grads[0][0])
        torch.testing.assert_close(ga, grads[0][1])
    assert torch.autograd.gradcheck(
        lambda a, b: temporal_attention(a, b, chunk_rows=2),
        (
            cur[:1, :2, :3, :3].detach().requires_grad_(),
            adj[:1, :2, :3, :3].detach().requires_grad_(),
        ),
    )


def test_temporal_attention_chunking_bounds_the_similarity_block():
    # 64x32 map, batch 8: each strip's (B, rows*W, HW) block stays within the budget.
    rows = rows_per_chunk(8, 32, 64 * 32, 1 << 23)
    assert rows == 16 and 8 * rows * 32 * 64 * 32 <= 1 << 23
    assert rows_per_chunk(8, 32, 64 * 32, 1 << 20) == 2
    assert rows_per_chunk(64, 32, 64 * 32, 10) == 1


def test_temporal_attention_dtype_and_errors():
    cur = torch.randn(1, 4, 4, 4).to(torch.bfloat16)
    assert temporal_attention(cur, cur).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="odd"):
        temporal_attention(cur, cur, patch=2)
    with pytest.raises(ValueError, match="channel"):
        temporal_attention(cur, cur[:, :2])
    with pytest.raises(ValueError, match="batch"):
        temporal_attention(cur, torch.cat([cur, cur]))
    assert vrstc.temporal_attention is temporal_attention


# ----------------------------------------------------------------------------- STCnet
def frames(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    prev = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    nxt = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    mask, _ = random_region_masks(b, h, w, generator=seed)
    return x, mask, prev, nxt


@pytest.mark.parametrize("size", [(256, 128), (64, 32)])
def test_stcnet_shapes_and_compositing(size):
    torch.manual_seed(0)
    net = STCNet(width=4, disc_width=4)
    x, mask, prev, nxt = frames(1, *size)
    with torch.no_grad():
        x1, x2 = net(x, mask, prev, nxt)
        assert x1.shape == x2.shape == x.shape
        keep = mask == 0
        assert torch.equal(x1.expand_as(x)[keep.expand_as(x)], x[keep.expand_as(x)])
        assert torch.equal(x2[keep.expand_as(x)], x[keep.expand_as(x)])
        _, raw1 = net.spatial(x, mask, return_raw=True)
        torch.testing.assert_close(x1, mask * raw1 + (1 - mask) * x)
        _, raw2 = net.temporal(x1, mask, prev, nxt, frame=x, return_raw=True)
        torch.testing.assert_close(x2, mask * raw2 + (1 - mask) * x)
        assert raw1.abs().max() <= 1  # tanh output
        assert net.global_disc(x2).shape == (1,)
        assert net.local_disc(x2, mask).shape == (1,)
    # The spatial generator never sees the occluded pixels.
    x_alt = torch.where(mask.bool(), torch.randn_like(x), x)
    with torch.no_grad():
        torch.testing.assert_close(net.spatial(x_alt, mask), x1)


@pytest.mark.parametrize("combine", ["concat", "mean", "joint"])
def test_temporal_generator_combine_modes(combine):
    torch.manual_seed(0)
    gen = TemporalAttentionGenerator(width=4, combine=combine)
    x, mask, prev, nxt = frames(2, 32, 16)
    out = gen(x, mask, prev, nxt)
    assert out.shape == x.shape
    # Swapping previous and next: symmetric combinations give the same result once the
    # two adjacent encoders are the same.
    gen_shared = TemporalAttentionGenerator(width=4, combine=combine, share_adjacent_encoder=True)
    n_sep = sum(p.numel() for p in gen.parameters())
    n_shared = sum(p.numel() for p in gen_shared.parameters())
    assert n_shared < n_sep
    with torch.no_grad():
        a = gen_shared(x, mask, prev, nxt)
        b = gen_shared(x, mask, nxt, prev)
    if combine in ("mean", "joint"):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="combine"):
        TemporalAttentionGenerator(width=4, combine="sum")


def test_generator_gradient_flow():
    torch.manual_seed(0)
    net = STCNet(width=4, disc_width=4)
    x, mask, prev, nxt = frames(2, 64, 32)
    x1, x2 = net(x, mask, prev, nxt)
    ((x1 - x).abs().mean() + (x2 - x).abs().mean() + net.global_disc(x2).mean()).backward()
    for name, p in net.named_parameters():
        if name.startswith(("spatial", "temporal")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    # x2's loss reaches G_s through x1, unless x1 is detached.
    net.zero_grad(set_to_none=True)
    _, x2 = net(x, mask, prev, nxt, detach_x1=True)
    (x2 - x).abs().mean().backward()
    assert all(p.grad is None for p in net.spatial.parameters())
    assert all(p.grad is not None for p in net.temporal.parameters())
    assert len(list(net.generator_parameters())) + len(list(net.discriminator_parameters())) == len(
        list(net.parameters())
    )


@pytest.mark.parametrize("region", ["masked", "crop"])
def test_discriminator_gradient_flow(region):
    torch.manual_seed(0)
    gd = GlobalDiscriminator(width=4, spectral_norm=True)
    ld = LocalDiscriminator(width=4, region=region)
    x, mask, _, _ = frames(2, 64, 32)
    outside = (mask == 0).expand_as(x)
    x_local = x.clone().requires_grad_(True)
    ld(x_local, mask).sum().backward()
    # The local critic reads the occluded region only: zero gradient outside it.
    assert x_local.grad[~outside].abs().sum() > 0
    assert x_local.grad[outside].abs().max() == 0
    x_global = x.clone().requires_grad_(True)
    gd(x_global).sum().backward()
    assert x_global.grad[outside].abs().sum() > 0 and x_global.grad[~outside].abs().sum() > 0
    for p in list(gd.parameters()) + list(ld.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


def test_local_discriminator_ignores_pixels_outside_the_region():
    torch.manual_seed(0)
    x, mask, _, _ = frames(2, 64, 32)
    noise = torch.randn_like(x) * (1 - mask)
    for region in ("masked", "crop"):
        ld = LocalDiscriminator(width=4, region=region)
        with torch.no_grad():
            torch.testing.assert_close(ld(x, mask), ld(x + noise, mask))


def test_crop_is_exact_for_pixel_aligned_boxes():
    x = torch.arange(2 * 3 * 12 * 8, dtype=torch.float32).view(2, 3, 12, 8)
    mask = torch.zeros(2, 1, 12, 8)
    mask[0, :, 4:8] = 1  # a full-width band
    mask[1, :, 2:5, 3:7] = 1
    boxes = mask_bounding_boxes(mask)
    assert boxes.tolist() == [[4, 7, 0, 7], [2, 4, 3, 6]]
    torch.testing.assert_close(crop_boxes(x[:1], boxes[:1], (4, 8)), x[:1, :, 4:8])
    torch.testing.assert_close(crop_boxes(x[1:], boxes[1:], (3, 4)), x[1:, :, 2:5, 3:7])
    # Resizing (up and down) equals interpolating the cropped tensor.
    for size in ((7, 5), (2, 3), (16, 16)):
        got = crop_boxes(x, boxes, size)
        for i, (t, b, left, r) in enumerate(boxes.tolist()):
            ref = F.interpolate(
                x[i : i + 1, :, t : b + 1, left : r + 1], size, mode="bilinear", align_corners=False
            )
            torch.testing.assert_close(got[i : i + 1], ref)
    assert mask_bounding_boxes(torch.zeros(1, 1, 12, 8)).tolist() == [[0, 11, 0, 7]]


def test_stcnet_input_checks():
    gen = SpatialStructureGenerator(width=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        gen(torch.zeros(1, 3, 30, 16), torch.zeros(1, 1, 30, 16))
    with pytest.raises(ValueError, match="mask"):
        gen(torch.zeros(1, 3, 32, 16), torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match="region"):
        LocalDiscriminator(region="bbox")
