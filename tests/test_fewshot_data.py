"""Few-shot dataset parsers on fake trees and caches, and the restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reidkit.data.datasets.base import DatasetError
from reidkit.fewshot.datasets import (
    load_mini_imagenet,
    load_reid_as_fewshot,
    load_tiered_imagenet,
)
from reidkit.fewshot.safe_pickle import UnsafePickleError, safe_load_pickle, safe_loads_pickle

CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}


def _jpg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 7)).save(path)


def _csv_tree(root: Path) -> Path:
    ddir = root / "mini-imagenet"
    for split, classes in CLASSES.items():
        lines = ["filename,label"]
        for ci, cls in enumerate(classes):
            for k in range(3):
                name = f"{cls}{k:08d}.jpg"
                _jpg(ddir / "images" / name, 20 * ci + k)
                lines.append(f"{name},{cls}")
        (ddir / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return ddir


def test_mini_imagenet_csv_layout(tmp_path):
    _csv_tree(tmp_path)
    ds = load_mini_imagenet(tmp_path)
    assert set(ds.splits) == {"train", "val", "test"} and ds.notes == ["layout: csv"]
    train = ds.split("train")
    assert train.class_names == ["n01", "n02", "n03"] and len(train) == 9
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    img = train.load(4)
    assert isinstance(img, Image.Image) and img.size == (12, 10)
    assert img.getpixel((0, 0))[0] == 21  # n02, k = 1


def test_csv_errors_name_the_file(tmp_path):
    ddir = _csv_tree(tmp_path)
    (ddir / "images" / "n0600000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"test.csv are missing.*n0600000001.jpg"):
        load_mini_imagenet(tmp_path, "csv")
    (ddir / "val.csv").write_text("file,class\nx.jpg,n04\n")
    with pytest.raises(DatasetError, match=r"val.csv: expected the header 'filename,label'"):
        load_mini_imagenet(tmp_path, "csv")


def test_class_folders_layout_and_missing_dataset_message(tmp_path):
    ddir = tmp_path / "tiered-imagenet"
    for split, classes in CLASSES.items():
        for ci, cls in enumerate(classes):
            for k in range(2):
                _jpg(ddir / split / cls / f"{cls}_{k}.JPEG", ci)
        (ddir / split / classes[0] / "notes.txt").write_text("not an image")
    ds = load_tiered_imagenet(tmp_path)
    assert ds.notes == ["layout: folders"]
    assert ds.split("val").class_names == ["n04", "n05"] and len(ds.split("val")) == 4
    with pytest.raises(DatasetError, match=r"(?s)mini_imagenet: dataset not found.*Tried"):
        load_mini_imagenet(tmp_path / "nowhere")
    del ds.splits["val"]
    with pytest.raises(DatasetError, match="no 'val' split"):
        ds.split("val")


def test_class_shared_between_splits_is_refused(tmp_path):
    ddir = tmp_path / "d"
    for split in ("train", "val", "test"):
        _jpg(ddir / split / ("same" if split != "val" else "v") / "a.jpg", 1)
    with pytest.raises(DatasetError, match="'same' is in both the train and the test split"):
        load_tiered_imagenet(ddir, "folders")


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_mini_imagenet_cache_pickles(tmp_path):
    arrays = {}
    for i, (split, classes) in enumerate(CLASSES.items()):
        imgs = _images(2 * len(classes), i)
        # class_dict indices interleaved on purpose
        class_dict = {cls: [k, k + len(classes)] for k, cls in enumerate(classes)}
        arrays[split] = imgs
        with open(tmp_path / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": imgs, "class_dict": class_dict}, f, protocol=4)
    ds = load_mini_imagenet(tmp_path)
    assert ds.notes == ["layout: pickle"]
    train = ds.split("train")
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    x = train.load(4)
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
    assert torch.equal(x, torch.from_numpy(arrays["train"][4]).permute(2, 0, 1))


def test_mini_imagenet_category_split_pickles_protocol_2(tmp_path):
    names = {"train": "train_phase_train", "val": "val", "test": "test"}
    offset = 0
    for split, classes in CLASSES.items():
        labels = [offset + k % len(classes) for k in range(2 * len(classes))]
        obj = {
            "data": _images(len(labels), offset),
            "labels": labels,
            "catname2label": {cls: offset + k for k, cls in enumerate(classes)},
        }
        offset += len(classes)
        path = tmp_path / f"miniImageNet_category_split_{names[split]}.pickle"
        path.write_bytes(pickle.dumps(obj, protocol=2))  # the old caches are protocol 2
    ds = load_mini_imagenet(tmp_path, "pickle")
    assert ds.split("test").class_names == ["n06", "n07"]
    assert ds.split("train").labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_tiered_imagenet_npz_and_png_caches(tmp_path):
    for i, (split, classes) in enumerate(CLASSES.items()):
        n = 2 * len(classes)
        specific = np.arange(n) % len(classes)
        labels = {
            "label_specific": specific,
            "label_general": np.zeros(n, dtype=np.int64),
            "label_specific_str": [f"{c}_name" for c in classes],
        }
        with open(tmp_path / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2)
        imgs = _images(n, 10 + i)
        if split == "test":  # the PNG-bytes variant
            encoded = []
            for img in imgs:
                path = tmp_path / "tmp.png"
                Image.fromarray(img).save(path)
                encoded.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
            with open(tmp_path / f"{split}_images_png.pkl", "wb") as f:
                pickle.dump(encoded, f)
        else:
            np.savez(tmp_path / f"{split}_images.npz", images=imgs)
    ds = load_tiered_imagenet(tmp_path)
    assert ds.split("train").class_names == ["n01_name", "n02_name", "n03_name"]
    assert ds.split("val").array is not None and ds.split("test").encoded is not None
    img = ds.split("test").load(1)
    assert np.array_equal(np.asarray(img), _images(4, 12)[1])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker  # type: ignore[attr-defined]
    payload = pickle.dumps({"image_data": np.zeros((1, 2, 2, 3), np.uint8), "x": evil})
    for split in CLASSES:
        (tmp_path / f"mini-imagenet-cache-{split}.pkl").write_bytes(payload)
    with pytest.raises(
        UnsafePickleError, match=r"refused to unpickle the global '(posix|nt|os)\.system'"
    ):
        load_mini_imagenet(tmp_path)
    assert not marker.exists()
    for bad in (pickle.dumps(eval), pickle.dumps(getattr), pickle.dumps(_Evil)):
        with pytest.raises(UnsafePickleError):
            safe_loads_pickle(bad)
    # what the caches contain is allowed, in every protocol
    ok = {"a": np.arange(3), "s": {1, 2}, "b": b"xy", "n": np.float32(1.5), "t": (1, "x")}
    for proto in range(2, 6):
        back = safe_loads_pickle(pickle.dumps(ok, protocol=proto))
        assert np.array_equal(back["a"], ok["a"]) and back["s"] == {1, 2} and back["b"] == b"xy"
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        safe_load_pickle(tmp_path / "junk.pkl")


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory) -> Path:
    from reidkit.data.synth import generate

    root = tmp_path_factory.mktemp("fsdata")
    generate(
        root / "synth-tiny", preset="tiny", seed=0, workers=1, progress=False, height=32, width=16
    )
    return root


def test_reid_dataset_as_few_shot_set(tiny_synth):
    ds = load_reid_as_fewshot("synth", tiny_synth, {"preset": "tiny"})
    assert set(ds.splits) == {"train", "test"}
    train, test = ds.split("train"), ds.split("test")
    assert train.num_classes == 24 and len(train) == 144
    # test identities: query + gallery, without junk (-1) and distractors (0)
    assert test.num_classes == 24
    assert not any("/0000_" in p or "/-1_" in p for p in test.paths)
    assert len(test) == 48 + 96
    assert isinstance(test.load(0), Image.Image)
    keep_zero = load_reid_as_fewshot("synth", tiny_synth, {"preset": "tiny"}, exclude_pids=[])
    assert keep_zero.split("test").num_classes == 25  # distractors become one class
