"""ImageDataset and the train / test loaders on a tiny folder of real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reidkit.config import Config
from reidkit.data.loader import (
    CorruptImageError,
    ImageDataset,
    build_test_loader,
    build_train_loader,
    collate_reid,
    sample_seed,
)
from reidkit.data.records import ImageRecord
from reidkit.data.transforms import COCO_FLIP_INDEX, build_test_transforms

torch.set_num_threads(1)

H, W = 32, 16


def write_images(folder: Path, num_ids: int = 6, per_id: int = 4, keypoints: bool = True):
    rng = np.random.default_rng(0)
    records = []
    for pid in range(num_ids):
        for k in range(per_id):
            path = folder / f"{pid:04d}_c{k % 3}_{k}.png"
            arr = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(path)
            extras = {}
            if keypoints:
                kp = np.column_stack(
                    [rng.uniform(0, 20, 17), rng.uniform(0, 40, 17), np.full(17, 2.0)]
                )
                extras["keypoints"] = kp.tolist()
            records.append(ImageRecord(str(path), pid, k % 3, extras))
    return records


def make_cfg(**data) -> Config:
    cfg = Config()
    base = dict(
        height=H, width=W, pad=2, batch_size=8, num_instances=2, test_batch_size=5, num_workers=0
    )
    base.update(data)
    for k, v in base.items():
        setattr(cfg.data, k, v)
    cfg.seed = 11
    return cfg


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"))


def epoch_batches(loader, epoch: int, start_step: int = 0) -> list[dict]:
    loader.set_epoch(epoch, start_step=start_step)
    return list(loader)


def test_train_batch_dict_shapes_and_dtypes(records):
    loader = build_train_loader(make_cfg(), records)
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) > 0
    b = batches[0]
    assert set(b) == {"images", "pids", "camids", "paths", "index", "keypoints"}
    assert b["images"].shape == (8, 3, H, W) and b["images"].dtype == torch.float32
    assert b["pids"].dtype == b["camids"].dtype == b["index"].dtype == torch.int64
    assert b["keypoints"].shape == (8, 17, 3) and b["keypoints"].dtype == torch.float32
    assert len(b["paths"]) == 8
    for i, idx in enumerate(b["index"].tolist()):
        assert b["paths"][i] == records[idx].path
        assert b["pids"][i].item() == records[idx].pid
        assert b["camids"][i].item() == records[idx].camid
    # P x K structure
    pids = b["pids"].view(4, 2)
    assert (pids[:, 0] == pids[:, 1]).all() and len(set(pids[:, 0].tolist())) == 4


def test_keypoints_all_or_none_never_dropped_silently(records, tmp_path):
    from reidkit.data.loader import CollateError

    plain = write_images(tmp_path, num_ids=2, per_id=2, keypoints=False)
    assert "keypoints" not in next(iter(build_test_loader(make_cfg(), plain)))
    loader = build_test_loader(make_cfg(), records[:3] + plain)
    with pytest.raises(CollateError, match="disagree on 'keypoints'"):
        next(iter(loader))
    loader = build_test_loader(make_cfg(), records[:5])
    batch = next(iter(loader))
    assert batch["keypoints"].shape == (5, 17, 3)
    # test path: keypoints only resized (40x20 -> 32x16)
    kp0 = torch.tensor(records[0].extras["keypoints"], dtype=torch.float32)
    expected = kp0 * torch.tensor([W / 20, H / 40, 1.0])
    assert torch.allclose(batch["keypoints"][0], expected, atol=1e-5)


def test_train_keypoints_consistent_with_flip(records):
    cfg = make_cfg(pad=0, random_erasing_p=0.0, hflip_p=0.5)
    loader = build_train_loader(cfg, records)
    flips = set()
    for b in epoch_batches(loader, 0) + epoch_batches(loader, 1):
        for i, idx in enumerate(b["index"].tolist()):
            kp = torch.tensor(records[idx].extras["keypoints"], dtype=torch.float32)
            kp = kp * torch.tensor([W / 20, H / 40, 1.0])
            out = b["keypoints"][i]
            if torch.allclose(out, kp, atol=1e-4):
                flips.add(False)
            else:
                mirrored = kp[COCO_FLIP_INDEX].clone()
                mirrored[:, 0] = W - mirrored[:, 0]
                assert torch.allclose(out, mirrored, atol=1e-4)
                flips.add(True)
    assert flips == {False, True}


def test_test_loader_is_ordered_and_unaugmented(records):
    cfg = make_cfg()
    loader = build_test_loader(cfg, records)
    batches = list(loader)
    assert [len(b["paths"]) for b in batches] == [5, 5, 5, 5, 4]
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(len(records)))
    t = build_test_transforms(cfg.data)
    with Image.open(records[7].path) as im:
        expected = t(im.convert("RGB"))
    assert torch.equal(batches[1]["images"][2], expected)


def test_augmentation_independent_of_workers_and_replayable(records):
    cfg0 = make_cfg(num_workers=0)
    a = epoch_batches(build_train_loader(cfg0, records), 1)
    cfg2 = make_cfg(num_workers=2)
    loader2 = build_train_loader(cfg2, records)
    b = epoch_batches(loader2, 1)
    again = epoch_batches(loader2, 1)  # persistent workers, same epoch replayed
    other = epoch_batches(loader2, 2)
    assert len(a) == len(b)
    for x, y, z in zip(a, b, again):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["images"], y["images"])
        assert torch.equal(y["images"], z["images"])
    assert not torch.equal(a[0]["images"], other[0]["images"])


def test_ddp_ranks_see_disjoint_parts_of_the_same_global_batch(records):
    cfg = make_cfg()
    full = epoch_batches(build_train_loader(cfg, records), 3)
    r0 = epoch_batches(build_train_loader(cfg, records, rank=0, world_size=2), 3)
    r1 = epoch_batches(build_train_loader(cfg, records, rank=1, world_size=2), 3)
    assert len(r0) == len(r1) == len(full)
    for f, a, b in zip(full, r0, r1):
        assert a["images"].shape[0] == b["images"].shape[0] == 4
        assert torch.equal(torch.cat([a["index"], b["index"]]), f["index"])
        # same per-sample seeds -> identical augmented images as in the single-process run
        assert torch.equal(torch.cat([a["images"], b["images"]]), f["images"])
        assert not set(a["pids"].tolist()) & set(b["pids"].tolist())


def test_resume_mid_epoch(records):
    loader = build_train_loader(make_cfg(), records)
    full = epoch_batches(loader, 4)
    rest = epoch_batches(loader, 4, start_step=1)
    assert len(rest) == len(full) - 1
    for x, y in zip(full[1:], rest):
        assert torch.equal(x["images"], y["images"])


def test_epoch_seed_and_random_sampler(records):
    cfg = make_cfg(sampler="random", batch_size=6)
    loader = build_train_loader(cfg, records, epoch_seed=5)
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(records) // 6
    assert len({i for b in batches for i in b["index"].tolist()}) == len(records)
    other = epoch_batches(build_train_loader(cfg, records, epoch_seed=6), 0)
    assert batches[0]["index"].tolist() != other[0]["index"].tolist()


def test_unreadable_image_error_names_file(tmp_path, records):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    recs = [*records[:3], ImageRecord(str(bad), 0, 0, {})]
    ds = ImageDataset(recs, build_test_transforms(make_cfg().data))
    with pytest.raises(CorruptImageError, match="broken.jpg.*skip_corrupt"):
        ds[3]
    missing = ImageDataset([ImageRecord(str(tmp_path / "nope.png"), 0, 0)], None)
    with pytest.raises(CorruptImageError, match="nope.png"):
        missing[0]
    # skip_corrupt: the item is dropped from the batch with a warning
    loader = build_test_loader(make_cfg(skip_corrupt=True), recs)
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        batch = next(iter(loader))
    assert batch["index"].tolist() == [0, 1, 2] and batch["images"].shape[0] == 3


def test_bad_keypoints_shape_names_file(records):
    rec = ImageRecord(records[0].path, 0, 0, {"keypoints": [[1.0, 2.0, 2.0]] * 5})
    ds = ImageDataset([rec], build_test_transforms(make_cfg().data))
    with pytest.raises(ValueError, match=r"0000_c0_0.png.*17 rows"):
        ds[0]


def test_collate_and_seed_helpers():
    items = [
        {"image": torch.zeros(3, 2, 2), "pid": 1, "camid": 0, "path": "a", "index": 4},
        None,
        {"image": torch.ones(3, 2, 2), "pid": 2, "camid": 1, "path": "b", "index": 5},
    ]
    b = collate_reid(items)
    assert b["pids"].tolist() == [1, 2] and b["paths"] == ["a", "b"] and "keypoints" not in b
    assert b["images"].shape == (2, 3, 2, 2)
    seeds = {sample_seed(0, e, p) for e in range(3) for p in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_errors_for_bad_loader_config(records):
    with pytest.raises(ValueError, match="no training records"):
        build_train_loader(make_cfg(), [])
    with pytest.raises(ValueError, match="only 6"):
        build_train_loader(make_cfg(batch_size=32, num_instances=4), records)


@pytest.mark.parametrize(
    "overrides",
    [
        {"random_erasing_p": 0.7, "random_erasing_fill": "mean"},
        {"random_erasing_p": 0.7, "random_erasing_fill": "random", "color_jitter": 0.3},
    ],
)
def test_device_transforms_give_the_per_sample_batches(records, overrides):
    cfg = make_cfg(**overrides)
    ref = epoch_batches(build_train_loader(cfg, records), 2)
    loader = build_train_loader(cfg, records, device_transforms=True)
    raw = epoch_batches(loader, 2)
    assert len(raw) == len(ref) > 0
    for r, d in zip(ref, raw):
        # workers only decode: uint8 at the file's size, plus the drawn parameters
        assert d["images"].dtype == torch.uint8 and d["images"].shape == (8, 3, 40, 20)
        assert d["aug"].shape[0] == 8
        out = loader.prepare(d, "cpu")
        assert "aug" not in out and "erase_noise" not in out
        assert out["images"].shape == (8, 3, H, W) and out["images"].dtype == torch.float32
        assert torch.allclose(out["images"], r["images"], atol=1e-5, rtol=0)
        for key in ("keypoints", "index", "pids", "camids"):
            assert torch.equal(out[key], r[key])
        assert out["paths"] == r["paths"]
    # float loaders: prepare only moves tensors
    b = ref[0]
    assert torch.equal(build_train_loader(cfg, records).prepare(b, "cpu")["images"], b["images"])


def test_device_transforms_test_loader_and_mixed_sizes(records, tmp_path):
    cfg = make_cfg()
    tref = list(build_test_loader(cfg, records))
    loader = build_test_loader(cfg, records, device_transforms=True)
    got = [loader.prepare(b, "cpu") for b in loader]
    assert torch.equal(
        torch.cat([b["images"] for b in got]), torch.cat([b["images"] for b in tref])
    )
    # images of different sizes travel as a list and are resized group by group
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((30, 12, 3), np.uint8)).save(odd)
    # (the odd image carries keypoints too: a batch has them for every item or none)
    kp = [[1.0, 1.0, 2.0]] * 17
    recs = [*records[:3], ImageRecord(str(odd), 0, 0, {"keypoints": kp})]
    mixed = build_test_loader(cfg, recs, device_transforms=True)
    batch = next(iter(mixed))
    assert isinstance(batch["images"], list) and batch["images"][3].shape == (3, 30, 12)
    out = mixed.prepare(batch, "cpu")["images"]
    expected = next(iter(build_test_loader(cfg, recs)))["images"]
    assert out.shape == (4, 3, H, W) and torch.equal(out, expected)


def test_device_transforms_reject_other_pipelines(records):
    from reidkit.data.transforms import Compose, RandomHorizontalFlip, Resize

    with pytest.raises(ValueError, match="ending in Normalize"):
        ImageDataset(
            records, Compose([Resize((H, W)), RandomHorizontalFlip()]), device_transforms=True
        )


def test_device_transforms_batch_of_skipped_images(records, tmp_path):
    from reidkit.data.loader import collate_device_batch

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    loader = build_test_loader(
        make_cfg(skip_corrupt=True), [ImageRecord(str(bad), 0, 0, {})], device_transforms=True
    )
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        batch = next(iter(loader))
    out = loader.prepare(batch, "cpu")
    assert out["images"].shape == (0, 3, H, W) and out["pids"].numel() == 0
    assert collate_device_batch([None])["aug"].shape[0] == 0
