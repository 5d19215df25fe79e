"""Clip sampling, per-clip augmentation, clip datasets / collation / loaders
(reidkit.data.clips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reidkit.config import DataConfig
from reidkit.data.clips import (
    ClipDataset,
    ClipOptions,
    ClipTransform,
    build_clip_test_loader,
    build_clip_train_loader,
    chunk_clip,
    collate_clips,
    sample_clip,
)
from reidkit.data.loader import CorruptImageError
from reidkit.data.records import TrackletRecord
from reidkit.data.transforms import (
    ColorJitter,
    Compose,
    Normalize,
    RandomErasing,
    RandomHorizontalFlip,
    RandomPadCrop,
    Resize,
    ToTensor,
)

H, W = 32, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- sampling
def test_evenly_all_and_short_policies() -> None:
    idx, valid = sample_clip(10, 4, "evenly")
    assert idx.tolist() == [0, 2, 5, 7] and valid.all()  # floor(i * n / T)
    assert sample_clip(8, 4, "evenly")[0].tolist() == [0, 2, 4, 6]
    idx, valid = sample_clip(3, 5, "evenly", short="pad")
    assert idx.tolist() == [0, 1, 2, 2, 2] and valid.tolist() == [True] * 3 + [False] * 2
    idx, valid = sample_clip(3, 5, "evenly", short="repeat")  # torchreid
    assert idx.tolist() == [0, 1, 2, 2, 2] and valid.all()
    idx, valid = sample_clip(7, 99, "all")
    assert idx.tolist() == list(range(7)) and valid.all()
    with pytest.raises(ValueError, match="at least one frame"):
        sample_clip(0, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_clip(5, 4, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="short must be"):
        sample_clip(5, 4, "random", short="loop")  # type: ignore[arg-type]


def test_random_is_sorted_distinct_uniform_and_seeded() -> None:
    counts = np.zeros(20)
    for s in range(400):
        idx, valid = sample_clip(20, 5, "random", gen(s))
        assert valid.all() and len(set(idx.tolist())) == 5
        assert idx.tolist() == sorted(idx.tolist()) and 0 <= idx.min() and idx.max() < 20
        counts[idx] += 1
    assert counts.min() > 0.5 * counts.mean()  # every frame is drawn about equally often
    a, b = sample_clip(20, 5, "random", gen(3))[0], sample_clip(20, 5, "random", gen(3))[0]
    assert np.array_equal(a, b)
    idx, valid = sample_clip(3, 6, "random", gen(0), short="pad")
    assert idx.tolist()[:3] == [0, 1, 2] and valid.sum() == 3
    idx, valid = sample_clip(3, 6, "random", gen(0), short="repeat")
    assert len(idx) == 6 and valid.all() and idx.tolist() == sorted(idx.tolist())


def test_tkp_random_temporal_crop_matches_the_authors_rule() -> None:
    """TKP: n >= T * stride: frames[begin : begin + (T-1) * stride + 1 : stride] with begin
    uniform in [0, n - (T-1) * stride - 1]; T <= n < T * stride: T sorted distinct frames;
    n < T: T sorted frames with replacement."""
    n, t, stride = 40, 4, 8
    begins = set()
    for s in range(300):
        idx, valid = sample_clip(n, t, "tkp", gen(s), stride=stride)
        begin = int(idx[0])
        assert idx.tolist() == list(range(n))[begin : begin + (t - 1) * stride + 1 : stride]
        assert valid.all()
        begins.add(begin)
    assert begins == set(range(n - (t - 1) * stride))  # 0 .. 15, all reached
    for s in range(50):
        idx, _ = sample_clip(20, t, "tkp", gen(s), stride=stride)  # 4 <= 20 < 32
        assert len(set(idx.tolist())) == t and idx.tolist() == sorted(idx.tolist())
        idx, valid = sample_clip(3, t, "tkp", gen(s), stride=stride)  # shorter than T
        assert len(idx) == t and valid.all() and idx.tolist() == sorted(idx.tolist())
        assert set(idx.tolist()) <= {0, 1, 2}


def test_chunks_cover_every_frame_once() -> None:
    assert chunk_clip(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert chunk_clip(5, 32) == [(0, 5)]
    with pytest.raises(ValueError):
        chunk_clip(5, 0)


# ----------------------------------------------------------------------------- augmentation
def _train_pipeline(p_erase: float = 1.0) -> Compose:
    return Compose(
        [
            Resize((H, W)),
            RandomHorizontalFlip(0.5),
            RandomPadCrop(3, (H, W)),
            ColorJitter(0.3, 0.3, 0.3),
            Normalize(),
            RandomErasing(p=p_erase, inplace=True),
        ]
    )


def test_clip_transform_is_the_image_pipeline_applied_once_per_clip() -> None:
    """Independent check: each frame of the transformed clip equals the image pipeline
    applied to that frame alone with a generator in the same state, keypoints included
    (so every frame got the same flip, crop, jitter and erasing box)."""
    torch.manual_seed(0)
    t = 5
    clip = torch.randint(0, 256, (t, 3, 40, 20), dtype=torch.uint8)
    kps = torch.rand(t, 17, 3) * torch.tensor([20.0, 40.0, 1.0])
    kps[..., 2] = 2.0
    pipeline = _train_pipeline()
    ct = ClipTransform(pipeline)
    flipped = 0
    for seed in range(12):
        out, out_kp = ct.apply(clip, kps, gen(seed))
        assert out.shape == (t, 3, H, W) and out_kp.shape == (t, 17, 3)
        for f in range(t):
            ref, ref_kp = pipeline.apply(clip[f], kps[f], gen(seed))
            assert torch.allclose(out[f], ref, atol=1e-5), (seed, f)
            assert torch.allclose(out_kp[f], ref_kp, atol=1e-5), (seed, f)
        # the pipeline's first draw decides the flip: both outcomes are covered
        flipped += int(torch.rand(1, generator=gen(seed), dtype=torch.float64) < 0.5)
    assert 0 < flipped < 12
    same = clip[:1].expand(t, -1, -1, -1).contiguous()
    out, _ = ct.apply(same, None, gen(5))
    assert all(torch.equal(out[0], out[f]) for f in range(t))


def test_color_jitter_single_image_unchanged_by_clip_support() -> None:
    x = torch.rand(3, 8, 4)
    a = ColorJitter(0.4, 0.4, 0.4)(x, gen(1))
    b = ColorJitter(0.4, 0.4, 0.4)(x.unsqueeze(0), gen(1))[0]
    assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- datasets
def _frame_image(track: int, t: int) -> Image.Image:
    arr = np.full((H + 4, W + 2, 3), 60, np.uint8)  # stored slightly larger: Resize runs
    arr[..., 0] = t * 10
    arr[..., 1] = track * 10
    arr[:, : (W + 2) // 2, 2] = 200  # left half marked: flips are visible
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tracklets(tmp_path_factory) -> list[TrackletRecord]:
    """8 identities x 2 cameras, tracklet lengths 2..13, frames encode (track, t)."""
    root = tmp_path_factory.mktemp("clips")
    records = []
    for k in range(16):
        n = 2 + (k * 5) % 12
        paths = []
        for t in range(n):
            p = root / f"t{k:02d}_f{t:02d}.png"
            _frame_image(k, t).save(p)
            paths.append(str(p))
        kp = np.zeros((n, 17, 3), np.float32)
        kp[:, :, 0], kp[:, :, 1], kp[:, :, 2] = 5.0, np.arange(n)[:, None], 2.0
        records.append(
            TrackletRecord(tuple(paths), pid=k // 2, camid=k % 2, extras={"keypoints": kp})
        )
    return records


def _cfg(**kw) -> DataConfig:
    base = dict(
        height=H,
        width=W,
        batch_size=4,
        num_instances=2,
        num_workers=0,
        test_batch_size=16,
        pad=2,
        random_erasing_p=0.5,
    )
    base.update(kw)
    return DataConfig(**base)


def _decode_ids(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(track, t) per frame of un-augmented clips normalised with the ImageNet stats."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    raw = (clips * std + mean) * 255.0
    centre = raw[..., :, H // 2, W // 4]  # (..., 3)
    return (centre[..., 1] / 10).round().long(), (centre[..., 0] / 10).round().long()


def test_train_loader_pk_over_tracklets_and_batch_keys(tracklets) -> None:
    clip = ClipOptions(seq_len=4, sampling="tkp", stride=2)
    loader = build_clip_train_loader(_cfg(), tracklets, clip)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for b in batches:
        assert b["clips"].shape == (4, 4, 3, H, W) and b["clips"].dtype == torch.float32
        assert b["clip_mask"].shape == (4, 4) and b["clip_mask"].all()
        assert b["keypoints"].shape == (4, 4, 17, 3)
        pids = b["pids"].tolist()
        assert len(set(pids)) == 2 and all(pids.count(p) == 2 for p in set(pids))  # P x K
        for i, ti in enumerate(b["index"].tolist()):
            r = tracklets[ti]
            assert pids[i] == r.pid and b["camids"][i] == r.camid
            frames = b["frames"][i].tolist()
            assert frames == sorted(frames) and len(b["paths"][i]) == 4
            assert b["paths"][i] == [r.paths[f] for f in frames]
            # keypoints follow the frames: y was the frame index, then resized and shifted
            # by the same crop in every frame
            y_in = torch.from_numpy(r.extras["keypoints"][frames, 0, 1]) * H / (H + 4)
            ys = b["keypoints"][i, :, 0, 1] - y_in
            assert torch.allclose(ys, ys[0].expand_as(ys), atol=1e-5)


def test_batches_do_not_depend_on_num_workers(tracklets) -> None:
    clip = ClipOptions(seq_len=3, sampling="random")
    out = []
    for workers in (0, 2):
        loader = build_clip_train_loader(
            _cfg(num_workers=workers, color_jitter=0.2), tracklets, clip
        )
        loader.set_epoch(3)
        out.append(list(loader))
    assert len(out[0]) == len(out[1])
    for a, b in zip(*out):
        assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["frames"], b["frames"])
        assert torch.equal(a["keypoints"], b["keypoints"]) and a["paths"] == b["paths"]
    again = build_clip_train_loader(_cfg(), tracklets, clip)
    again.set_epoch(4)
    assert not torch.equal(next(iter(again))["clips"], out[0][0]["clips"])


def test_chunked_test_loader_reads_every_frame_once_in_order(tracklets) -> None:
    loader = build_clip_test_loader(_cfg(), tracklets, ClipOptions(chunk_len=5))
    assert loader.batch_size == 16 // 5
    seen: dict[int, list[int]] = {}
    for b in loader:
        track, t = _decode_ids(b["clips"])
        for i in range(len(b["pids"])):
            ti, m = int(b["index"][i]), b["clip_mask"][i]
            frames = b["frames"][i][m].tolist()
            assert track[i][m].tolist() == [ti] * len(frames)  # pixels are that tracklet's
            assert t[i][m].tolist() == frames
            assert int(b["chunk"][i]) == len(seen.get(ti, [])) // 5
            assert not m[len(frames) :].any() and (b["frames"][i][~m] == -1).all()
            assert (b["keypoints"][i][~m] == 0).all()
            seen.setdefault(ti, []).extend(frames)
    assert {k: v for k, v in seen.items()} == {
        i: list(range(len(r))) for i, r in enumerate(tracklets)
    }


def test_short_clips_pad_and_all_mode_collation(tracklets) -> None:
    ds = ClipDataset(
        tracklets, Compose([Resize((H, W)), Normalize()]), seq_len=8, sampling="evenly"
    )
    short = next(i for i, r in enumerate(tracklets) if len(r) < 8)
    item = ds[short]
    n = len(tracklets[short])
    assert item["clip_mask"].tolist() == [True] * n + [False] * (8 - n)
    assert torch.equal(item["clip"][-1], item["clip"][n - 1])  # padding repeats the last frame
    assert len(item["paths"]) == n

    ds_all = ClipDataset(tracklets, Compose([Resize((H, W)), Normalize()]), sampling="all")
    items = [ds_all[i] for i in (0, 1, 2)]
    batch = collate_clips(items)
    lengths = [len(tracklets[i]) for i in (0, 1, 2)]
    assert batch["clips"].shape[1] == max(lengths)
    assert batch["clip_mask"].sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert torch.equal(
            batch["clips"][b, n - 1 :],
            batch["clips"][b, n - 1 : n].expand(max(lengths) - n + 1, -1, -1, -1),
        )
        assert len(batch["paths"][b]) == n
    # keypoints: every clip has them or none; a mixed batch is an error naming the tracklet
    from reidkit.data.loader import CollateError

    bare = TrackletRecord(tracklets[0].paths, tracklets[0].pid, tracklets[0].camid)
    mixed = ClipDataset([tracklets[1], bare], Compose([Resize((H, W)), Normalize()]), 4)
    assert "keypoints" not in collate_clips([mixed[1], mixed[1]])
    with pytest.raises(CollateError, match="tracklet 1"):
        collate_clips([mixed[0], mixed[1]])
    assert collate_clips([None])["clips"].shape[0] == 0


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_deferred_normalisation_matches_the_float_pipeline(tracklets, jitter: float) -> None:
    """uint8 clips + erase boxes, normalised and erased by ``prepare``, equal the float
    pipeline (up to the uint8 rounding of colour-jittered frames, as for images)."""
    cfg = _cfg(random_erasing_p=1.0, color_jitter=jitter)
    clip = ClipOptions(seq_len=4, sampling="random")
    plain = build_clip_train_loader(cfg, tracklets, clip)
    deferred = build_clip_train_loader(cfg, tracklets, clip, defer_normalize=True)
    for loader in (plain, deferred):
        loader.set_epoch(1)
    a = next(iter(plain))
    b_raw = next(iter(deferred))
    assert b_raw["clips"].dtype == torch.uint8 and b_raw["erase_boxes"].shape == (4, 4)
    b = deferred.prepare(b_raw, "cpu")
    tol = 1e-5 if jitter == 0 else 0.6 / 255 / 0.225
    assert torch.allclose(a["clips"], b["clips"], atol=tol)
    # the erasing box is the same in every frame of a clip
    for i, (top, left, eh, ew) in enumerate(b_raw["erase_boxes"].tolist()):
        region = b["clips"][i, :, :, top : top + eh, left : left + ew]
        assert eh > 0 and torch.equal(region, region[:1].expand_as(region))


def test_unreadable_frames_named_or_masked(tracklets, tmp_path: Path) -> None:
    r = tracklets[3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    broken = TrackletRecord((r.paths[0], str(bad), *r.paths[2:]), r.pid, r.camid)
    pipeline = Compose([Resize((H, W)), ToTensor()])
    with pytest.raises(CorruptImageError, match=r"bad\.png.*skip_corrupt"):
        ClipDataset([broken], pipeline, sampling="all")[0]
    ds = ClipDataset([broken], pipeline, sampling="all", skip_corrupt=True)
    with pytest.warns(RuntimeWarning, match="unreadable frame"):
        item = ds[0]
    assert item["clip_mask"].tolist() == [True, False] + [True] * (len(r) - 2)
    assert str(bad) not in item["paths"] and ds.num_skipped == 1
    only_bad = TrackletRecord((str(bad),), 0, 0)
    with pytest.warns(RuntimeWarning):
        assert ClipDataset([only_bad], pipeline, skip_corrupt=True)[0] is None


def test_clip_options_validation_and_from_config() -> None:
    from reidkit.data.clips import clip_options_from_config

    with pytest.raises(ValueError, match="sampling"):
        ClipOptions(sampling="middle")
    with pytest.raises(ValueError, match="chunk_len"):
        ClipOptions(chunk_len=0)

    class Cfg:
        seq_len = 6
        clip_sampling = "evenly"
        test_chunk_len = 16

    opts = clip_options_from_config(Cfg(), stride=4)
    assert (opts.seq_len, opts.sampling, opts.chunk_len, opts.stride) == (6, "evenly", 16, 4)


def test_batch_normalisation_in_collate_equals_per_clip_float_items(tracklets) -> None:
    """The loaders ship uint8 clips and normalise + erase the whole batch in the collate;
    the batch equals the float clips the dataset gives item by item with the same seeds."""
    cfg = _cfg(random_erasing_p=0.7)
    clip = ClipOptions(seq_len=4, sampling="tkp", stride=2)
    loader = build_clip_train_loader(cfg, tracklets, clip)
    loader.set_epoch(2)
    batch = next(iter(loader))
    reference = ClipDataset(
        tracklets, loader.dataset.transform, seq_len=4, sampling="tkp", stride=2
    )
    pairs = list(loader.sampler)[: len(batch["pids"])]
    items = [reference[p] for p in pairs]
    expected = torch.stack([it["clip"] for it in items])
    assert batch["clips"].dtype == torch.float32
    assert torch.allclose(batch["clips"], expected, atol=1e-6)
    assert [it["index"] for it in items] == batch["index"].tolist()


def test_frames_of_different_sizes_are_resized_first(tmp_path: Path) -> None:
    """DukeMTMC-VideoReID boxes change size inside a tracklet: every frame is resized to
    the model size before stacking (the pipeline must start with Resize)."""
    paths = []
    for t, (h, w) in enumerate([(36, 18), (50, 22), (36, 18)]):
        p = tmp_path / f"f{t}.png"
        Image.fromarray(np.full((h, w, 3), 40 * (t + 1), np.uint8)).save(p)
        paths.append(str(p))
    rec = TrackletRecord(tuple(paths), 0, 0)
    item = ClipDataset([rec], Compose([Resize((H, W)), ToTensor()]), sampling="all")[0]
    assert item["clip"].shape == (3, 3, H, W)
    assert torch.allclose(item["clip"][:, 0, 5, 5], torch.tensor([40.0, 80.0, 120.0]) / 255)
    with pytest.raises(ValueError, match="differ in size.*must start with Resize"):
        ClipDataset([rec], Compose([ToTensor()]), sampling="all")[0]
