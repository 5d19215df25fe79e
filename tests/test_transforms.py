"""Transforms against hand-worked cases, naive reference computations and statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reidkit.config import DataConfig
from reidkit.data.transforms import (
    COCO_FLIP_INDEX,
    ColorJitter,
    Compose,
    Normalize,
    RandomErasing,
    RandomHorizontalFlip,
    RandomPadCrop,
    Resize,
    ToTensor,
    build_test_transforms,
    build_train_transforms,
    to_uint8_tensor,
)

torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_u8(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=gen(seed), dtype=torch.uint8)


def coord_image(h: int, w: int) -> torch.Tensor:
    """uint8 image whose pixel (i, j) holds (j, i, 255): reading a pixel tells where it came from."""
    jj = torch.arange(w).expand(h, w)
    ii = torch.arange(h)[:, None].expand(h, w)
    return torch.stack([jj, ii, torch.full((h, w), 255)]).to(torch.uint8)


class FixedPadCrop(RandomPadCrop):
    def __init__(self, pad: int, offset: tuple[int, int], size=None) -> None:
        super().__init__(pad, size)
        self.offset = offset

    def offsets(self, h, w, generator):
        return self.offset


# ------------------------------------------------------------------------------ flip
def test_flip_reverses_columns_hand_worked():
    x = torch.tensor([[[1, 2, 3], [4, 5, 6]]], dtype=torch.uint8)
    out = RandomHorizontalFlip(p=1.0)(x)
    assert out.tolist() == [[[3, 2, 1], [6, 5, 4]]]
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)


def test_flip_pil_matches_tensor():
    x = rand_u8(7, 5)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    out = RandomHorizontalFlip(p=1.0)(pil)
    assert torch.equal(to_uint8_tensor(out), x.flip(-1))


def test_flip_probability():
    t = RandomHorizontalFlip(p=0.3)
    x = torch.arange(2, dtype=torch.uint8).view(1, 1, 2)
    n = 4000
    flips = sum(int(t(x, gen(s))[0, 0, 0] == 1) for s in range(n))
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(flips - 0.3 * n) < 4 * sd


def test_flip_keypoints_swap_left_right():
    kp = torch.zeros(17, 3)
    kp[:, 0] = torch.arange(17, dtype=torch.float32)  # x = index
    kp[:, 1] = 3.0
    kp[:, 2] = 2.0
    img = torch.zeros(3, 10, 40, dtype=torch.uint8)
    _, out = Compose([RandomHorizontalFlip(p=1.0)]).apply(img, kp, gen(0))
    # left wrist (9) of the output is the old right wrist (10), mirrored: x -> W - x
    assert out[9, 0].item() == 40 - 10
    assert out[10, 0].item() == 40 - 9
    assert out[0, 0].item() == 40 - 0  # nose keeps its index
    assert COCO_FLIP_INDEX[5] == 6 and COCO_FLIP_INDEX[6] == 5
    assert sorted(COCO_FLIP_INDEX) == list(range(17))


# ------------------------------------------------------------------------- pad + crop
def test_padcrop_hand_worked_offsets():
    x = torch.arange(1, 21, dtype=torch.uint8).view(1, 4, 5)
    pad = 2
    # offset (0, 0): top-left corner of the padded image -> content shifted by +2, +2
    out = FixedPadCrop(pad, (0, 0))(x)
    assert out.shape == x.shape
    assert (out[:, :2, :] == 0).all() and (out[:, :, :2] == 0).all()
    assert torch.equal(out[:, 2:, 2:], x[:, :2, :3])
    # offset (2p, 2p): bottom-right -> content shifted by -2, -2
    out = FixedPadCrop(pad, (4, 4))(x)
    assert torch.equal(out[:, :2, :3], x[:, 2:, 2:])
    assert (out[:, 2:, :] == 0).all() and (out[:, :, 3:] == 0).all()
    # offset (p, p): identity
    assert torch.equal(FixedPadCrop(pad, (2, 2))(x), x)


@pytest.mark.parametrize("size", [None, (6, 5), (3, 4)])
def test_padcrop_matches_explicit_pad_then_crop(size):
    x = rand_u8(6, 5, seed=3)
    t = RandomPadCrop(pad=3, size=size)
    oh, ow = size or (6, 5)
    for s in range(30):
        i, j = t.offsets(6, 5, gen(s))
        padded = F.pad(x, (3, 3, 3, 3), value=0)
        assert torch.equal(t(x, gen(s)), padded[:, i : i + oh, j : j + ow])


def test_padcrop_offsets_cover_range_uniformly():
    t = RandomPadCrop(pad=2)
    counts = np.zeros((5, 5))
    n = 5000
    for s in range(n):
        i, j = t.offsets(8, 8, gen(s))
        counts[i, j] += 1
    expected = n / 25
    assert counts.min() > 0
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 70  # 24 dof: p ~ 2e-6


def test_padcrop_keypoints_follow_pixels_and_hide_outside():
    h, w = 12, 9
    img = coord_image(h, w)
    g = torch.Generator().manual_seed(0)
    ii = torch.randint(0, h, (17,), generator=g)
    jj = torch.randint(0, w, (17,), generator=g)
    kp = torch.stack([jj + 0.5, ii + 0.5, torch.full((17,), 2.0)], 1)
    t = Compose([RandomHorizontalFlip(p=1.0), RandomPadCrop(pad=4)])
    seen_hidden = False
    for s in range(40):
        out, okp = t.apply(img, kp, gen(s))
        for a in range(17):
            src = COCO_FLIP_INDEX[a]
            x, y, v = okp[a].tolist()
            inside = 0 <= x < w and 0 <= y < h
            assert (v > 0) == inside
            if inside:
                px = out[:, int(y), int(x)].tolist()
                assert px == [int(jj[src]), int(ii[src]), 255]
            else:
                seen_hidden = True
    assert seen_hidden


def test_padcrop_rejects_too_large_crop():
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomPadCrop(pad=1, size=(20, 20))(rand_u8(4, 4))


# ----------------------------------------------------------------------------- resize
def test_resize_matches_pil_bilinear():
    """PIL's own Image.resize is the reference for the uint8 path (up- and down-scaling)."""
    x = rand_u8(64, 32, seed=4)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    for size in [(32, 16), (128, 64), (50, 30), (256, 128)]:
        ref = torch.from_numpy(np.array(pil.resize((size[1], size[0]), Image.BILINEAR))).permute(
            2, 0, 1
        )
        for inp in (pil, x):
            out = Resize(size)(inp)
            assert out.shape == (3, *size) and out.dtype == torch.uint8
            assert (out.int() - ref.int()).abs().max() <= 1
    # float tensors stay float; a constant image stays constant
    const = torch.full((3, 10, 6), 0.25)
    assert torch.allclose(Resize((23, 7))(const), torch.full((3, 23, 7), 0.25))
    assert isinstance(Resize((8, 4), keep_pil=True)(pil), Image.Image)


def test_resize_keypoints_scale():
    kp = torch.tensor([[10.0, 20.0, 2.0]] * 17)
    _, out = Compose([Resize((256, 128))]).apply(torch.zeros(3, 128, 64, dtype=torch.uint8), kp)
    assert out[0].tolist() == [20.0, 40.0, 2.0]
    _, out = Compose([Resize((64, 16))]).apply(torch.zeros(3, 128, 64, dtype=torch.uint8), kp)
    assert out[3].tolist() == [2.5, 10.0, 2.0]


# ---------------------------------------------------------------------------- normalise
def test_normalize_numeric():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 3).expand(3, 1, 3).contiguous()
    out = Normalize(mean, std)(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    for c in range(3):
        for k, v in enumerate([0, 51, 255]):
            assert out[c, 0, k].item() == pytest.approx((v / 255 - mean[c]) / std[c], abs=1e-6)
    # float input taken as [0, 1]; PIL input like uint8
    f = ToTensor()(x)
    assert torch.allclose(Normalize(mean, std)(f), out, atol=1e-6)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    assert torch.allclose(Normalize(mean, std)(pil), out, atol=1e-6)


def test_normalize_imagenet_defaults():
    x = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = Normalize()(x)
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    assert out[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------- erasing
def erased_box(out: torch.Tensor, sentinel: float) -> tuple[int, int, int, int] | None:
    mask = (out != sentinel).any(0)
    if not mask.any():
        return None
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert mask[top:bottom, left:right].all(), "erased region must be a rectangle"
    assert int(mask.sum()) == int((bottom - top) * (right - left))
    return int(top), int(left), int(bottom - top), int(right - left)


def test_erasing_mean_fill_bounds_and_input_untouched():
    h, w = 256, 128
    sl, sh, r1 = 0.02, 0.4, 0.3
    t = RandomErasing(p=1.0, sl=sl, sh=sh, r1=r1, fill="mean")
    x = torch.full((3, h, w), 100.0)
    for s in range(200):
        out = t(x, gen(s))
        box = erased_box(out, 100.0)
        assert box is not None
        top, left, bh, bw = box
        assert 0 < bh < h and 0 < bw < w
        # h = round(sqrt(A r)), w = round(sqrt(A / r)): bounds up to the rounding
        assert (bh - 0.5) * (bw - 0.5) <= sh * h * w + 1e-9
        assert (bh + 0.5) * (bw + 0.5) >= sl * h * w - 1e-9
        assert (bh - 0.5) / (bw + 0.5) <= 1 / r1 + 1e-9
        assert (bh + 0.5) / (bw - 0.5) >= r1 - 1e-9
        region = out[:, top : top + bh, left : left + bw]
        for c, m in enumerate((0.485, 0.456, 0.406)):
            assert torch.all(region[c] == torch.tensor(m))
    assert (x == 100.0).all()


def naive_bot_erasing_area(h: int, w: int, sl: float, sh: float, r1: float, rng: random.Random):
    """The BoT code's loop, scalar Python: erased area fraction, or None."""
    for _ in range(100):
        target = rng.uniform(sl, sh) * h * w
        aspect = rng.uniform(r1, 1 / r1)
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            return eh * ew / (h * w), eh / ew
    return None


def test_erasing_statistics_match_naive_reference():
    h, w, sl, sh, r1 = 64, 32, 0.02, 0.4, 0.3
    t = RandomErasing(p=0.5, sl=sl, sh=sh, r1=r1, fill="zero")
    x = torch.full((3, h, w), 7.0)
    n = 3000
    areas, applied = [], 0
    for s in range(n):
        box = erased_box(t(x, gen(s)), 7.0)
        if box is not None:
            applied += 1
            areas.append(box[2] * box[3] / (h * w))
    assert abs(applied - n / 2) < 4 * math.sqrt(n / 4)
    rng = random.Random(0)
    ref = [naive_bot_erasing_area(h, w, sl, sh, r1, rng) for _ in range(20000)]
    ref_areas = np.array([r[0] for r in ref if r is not None])
    ours = np.array(areas)
    # means agree within 4 standard errors; the distributions' quartiles too
    se = math.sqrt(ours.var() / len(ours) + ref_areas.var() / len(ref_areas))
    assert abs(ours.mean() - ref_areas.mean()) < 4 * se
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(ours, q) - np.quantile(ref_areas, q)) < 0.03


def test_erasing_fill_modes_and_probability_zero():
    x = torch.full((3, 64, 32), 5.0)
    assert torch.equal(RandomErasing(p=0.0)(x, gen(0)), x)
    out = RandomErasing(p=1.0, fill="zero")(x, gen(1))
    top, left, bh, bw = erased_box(out, 5.0)
    assert (out[:, top : top + bh, left : left + bw] == 0).all()
    out = RandomErasing(p=1.0, fill="random", sl=0.3, sh=0.4)(x, gen(2))
    top, left, bh, bw = erased_box(out, 5.0)
    noise = out[:, top : top + bh, left : left + bw]
    assert abs(noise.mean().item()) < 0.2 and abs(noise.std().item() - 1.0) < 0.2


def test_erasing_requires_float_tensor():
    with pytest.raises(TypeError, match="after Normalize"):
        RandomErasing(p=1.0)(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sl <= sh"):
        RandomErasing(sl=0.5, sh=0.1)


# ------------------------------------------------------------------------- colour jitter
def test_color_jitter_semantics():
    x = rand_u8(8, 6, seed=5)
    xf = x.float() / 255
    # brightness only: out = clamp(x * f), f in [0.6, 1.4]
    for s in range(10):
        out = ColorJitter(brightness=0.4)(x, gen(s))
        unclipped = (out > 0) & (out < 1) & (xf > 0)
        ratio = out[unclipped] / xf[unclipped]
        assert ratio.max() - ratio.min() < 1e-5
        assert 0.6 - 1e-6 <= ratio.mean() <= 1.4 + 1e-6
    # saturation leaves a grey image unchanged; contrast leaves a constant image unchanged
    grey = torch.full((3, 4, 4), 0.3)
    assert torch.allclose(ColorJitter(saturation=0.9)(grey, gen(0)), grey, atol=1e-6)
    assert torch.allclose(ColorJitter(contrast=0.9)(grey, gen(0)), grey, atol=1e-6)
    assert torch.equal(ColorJitter()(x, gen(0)), x)  # strength 0: no-op


# ------------------------------------------------------------------------------ builders
def small_cfg(**kw) -> DataConfig:
    return DataConfig(height=32, width=16, pad=2, **kw)


def test_train_transforms_deterministic_by_seed():
    t = build_train_transforms(small_cfg(color_jitter=0.2))
    pil = Image.fromarray(rand_u8(40, 20, seed=1).permute(1, 2, 0).numpy())
    a, b, c = t(pil, gen(3)), t(pil, gen(3)), t(pil, gen(4))
    assert a.shape == (3, 32, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_test_transforms_are_resize_then_normalise():
    cfg = small_cfg()
    pil = Image.fromarray(rand_u8(40, 20, seed=2).permute(1, 2, 0).numpy())
    out = build_test_transforms(cfg)(pil)
    resized = np.asarray(pil.resize((16, 32), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = np.array(cfg.mean, np.float32), np.array(cfg.std, np.float32)
    expected = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1).copy())
    # PIL is the reference: at most one grey level (1/255/std) apart
    assert torch.allclose(out, expected, atol=1.01 / (255 * min(cfg.std)))


def test_train_pipeline_keypoints_consistent():
    """Full training pipeline (no erasing): a keypoint still lands on its own pixel."""
    h, w = 32, 16
    cfg = small_cfg(random_erasing_p=0.0, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    t = build_train_transforms(cfg)
    img = coord_image(h, w)
    g = torch.Generator().manual_seed(1)
    ii, jj = torch.randint(0, h, (17,), generator=g), torch.randint(0, w, (17,), generator=g)
    kp = torch.stack([jj + 0.5, ii + 0.5, torch.full((17,), 1.0)], 1)
    outcomes = set()
    for s in range(30):
        out, okp = t.apply(img, kp, gen(s))
        out = out.round().to(torch.int64)  # back to pixel values (mean 0, std 1/255)
        visible = [a for a in range(17) if okp[a, 2] > 0]
        assert visible
        pixels = {a: out[:, int(okp[a, 1]), int(okp[a, 0])].tolist() for a in visible}
        plain = all(pixels[a] == [int(jj[a]), int(ii[a]), 255] for a in visible)
        mirrored = all(
            pixels[a] == [int(jj[COCO_FLIP_INDEX[a]]), int(ii[COCO_FLIP_INDEX[a]]), 255]
            for a in visible
        )
        assert plain or mirrored
        outcomes.add("plain" if plain else "mirrored")
    assert outcomes == {"plain", "mirrored"}


def test_erase_batch_fills_exactly_the_boxes():
    x = torch.full((3, 3, 6, 5), 9.0)
    boxes = torch.tensor([[1, 2, 2, 3], [0, 0, 0, 0], [5, 4, 1, 1]])
    out = RandomErasing(fill="mean", mean=(0.1, 0.2, 0.3)).erase_batch(x.clone(), boxes)
    expected = torch.full((3, 3, 6, 5), 9.0)
    for c, m in enumerate((0.1, 0.2, 0.3)):
        expected[0, c, 1:3, 2:5] = m
        expected[2, c, 5, 4] = m
    assert torch.equal(out, expected)
    # same boxes as apply() draws from the same generator
    t = RandomErasing(p=0.5, fill="zero")
    imgs = torch.randn(6, 3, 20, 10, generator=gen(0))
    boxes = []
    for s in range(6):
        box = t.sample_box(20, 10, gen(s))
        boxes.append(box if box is not None else (0, 0, 0, 0))
    batched = t.erase_batch(imgs.clone(), torch.tensor(boxes))
    single = torch.stack([t(imgs[s], gen(s)) for s in range(6)])
    assert torch.equal(batched, single)
