"""Keypoint files (simple JSON and COCO) attached to datasets: matching, conversion,
normalisation, and the errors that name the file and the record."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reidkit.config import config_from_dict
from reidkit.data.datasets import build_dataset, dataset_from_config, format_stats
from reidkit.data.keypoints import (
    KeypointFileError,
    normalize_keypoints,
    read_keypoint_file,
    write_json_atomic,
)
from reidkit.data.loader import ImageDataset
from reidkit.data.transforms import Resize

W, H = 32, 64  # stored image size (width, height)
TREE = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg"],
    "query": ["0001_c1s1_001051_00.jpg"],
    "bounding_box_test": ["0001_c2s1_000301_01.jpg", "0000_c1s1_000151_01.jpg"],
}


def make_market(root: Path) -> Path:
    base = root / "market1501"
    for folder, names in TREE.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.new("RGB", (W, H), (90, 60, 30)).save(base / folder / name)
    return base


def rows(seed: int, visible: int = 2) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform([1, 1], [W - 1, H - 1], size=(17, 2)).round(2)
    return [[float(x), float(y), visible] for x, y in xy]


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def load(root: Path, kp: Path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset("market1501", root, keypoints=str(kp), **kw)
    return ds, [str(w.message) for w in caught]


# ------------------------------------------------------------------------ simple JSON
def test_simple_json_by_name_and_relative_path_missing_images_warned(tmp_path):
    make_market(tmp_path)
    data = {
        "0002_c1s1_000451_03.jpg": rows(0),  # file name
        "bounding_box_train/0002_c2s1_000301_01.jpg": rows(1),  # relative path
        "./query/0001_c1s1_001051_00.jpg": rows(2),
    }
    ds, msgs = load(tmp_path, write(tmp_path / "kp.json", data))
    by_name = {Path(r.path).name: r.extras["keypoints"] for r in ds.train + ds.query + ds.gallery}
    assert by_name["0002_c1s1_000451_03.jpg"] == rows(0)
    assert by_name["0002_c2s1_000301_01.jpg"] == rows(1)
    assert by_name["0001_c1s1_001051_00.jpg"] == rows(2)
    # gallery images have no record: all-invisible keypoints and one counted warning
    assert by_name["0000_c1s1_000151_01.jpg"] == [[0.0, 0.0, 0.0]] * 17
    (warning,) = [m for m in msgs if "no record" in m]
    assert "2 image(s)" in warning and "gallery 2" in warning
    stats = format_stats(ds)
    assert "train 2/2, query 1/1, gallery 0/2" in stats


def test_config_field_reaches_the_dataset(tmp_path):
    make_market(tmp_path)
    kp = write(tmp_path / "kp.json", {n: rows(i) for i, n in enumerate(TREE["query"])})
    cfg = config_from_dict(
        {"data": {"dataset": "market1501", "root": str(tmp_path), "keypoints": str(kp)}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dataset_from_config(cfg.data)
    assert ds.query[0].extras["keypoints"] == rows(0)
    assert all("keypoints" in r.extras for r in ds.train)  # zeros: the batch always has them


def test_explicit_file_replaces_the_parsers_keypoints(tmp_path):
    base = make_market(tmp_path)
    (base / "keypoints").mkdir()
    name = TREE["bounding_box_train"][0]
    write(base / "keypoints" / "bounding_box_train.json", {name: rows(5)})
    plain = build_dataset("market1501", tmp_path)
    assert plain.train[0].extras["keypoints"] == rows(5)
    ds, _ = load(tmp_path, write(tmp_path / "kp.json", {name: rows(6)}))
    assert ds.train[0].extras["keypoints"] == rows(6)
    # the Market keypoints/ folder also takes <folder>/<file> keys (reidkit keypoints output)
    write(base / "keypoints" / "bounding_box_train.json", {f"bounding_box_train/{name}": rows(7)})
    assert build_dataset("market1501", tmp_path).train[0].extras["keypoints"] == rows(7)


def test_keypoints_reach_the_batch_and_normalise(tmp_path):
    make_market(tmp_path)
    name = TREE["query"][0]
    data = {name: rows(3)}
    ds, _ = load(tmp_path, write(tmp_path / "kp.json", data))
    item = ImageDataset(ds.query, Resize((16, 8)))[0]
    got = normalize_keypoints(item["keypoints"][None], 16, 8)[0]
    want = torch.tensor(rows(3), dtype=torch.float32) / torch.tensor([W, H, 1.0])
    torch.testing.assert_close(got, want)


def test_normalize_keypoints_hand_case():
    kp = torch.tensor([[[32.0, 16.0, 2.0], [0.0, 64.0, 0.0]]])
    out = normalize_keypoints(kp, height=64, width=32)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.25, 2.0], [0.0, 1.0, 0.0]]]))
    assert kp[0, 0, 0] == 32  # input untouched


def test_slightly_outside_hidden_far_outside_and_normalised_rejected(tmp_path):
    make_market(tmp_path)
    name = TREE["query"][0]
    near = rows(4)
    near[0] = [W + 3.0, 10.0, 2]  # 3 px right of the image: kept, made invisible
    ds, _ = load(tmp_path, write(tmp_path / "near.json", {name: near}))
    assert ds.query[0].extras["keypoints"][0] == [W + 3.0, 10.0, 0.0]
    assert ds.query[0].extras["keypoints"][1] == near[1]
    assert any("1 visible keypoint(s) slightly outside" in n for n in ds.notes)

    far = rows(4)
    far[9] = [10.0, 2.0 * H, 2]  # keypoints of a 2x resized image
    with pytest.raises(
        KeypointFileError,
        match=r"far.json: record '0001_c1s1_001051_00.jpg'.*9 \(left_wrist\).*32x64",
    ):
        load(tmp_path, write(tmp_path / "far.json", {name: far}))
    far[9][2] = 0  # invisible points may be anywhere
    load(tmp_path, write(tmp_path / "far.json", {name: far}))

    normed = [[x / W, y / H, v] for x, y, v in rows(4)]
    with pytest.raises(KeypointFileError, match="looks normalised"):
        load(tmp_path, write(tmp_path / "norm.json", {name: normed}))


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", r"bad.json: invalid JSON"),
        ([1, 2], r"bad.json: record 0: expected an object"),
        ({"a.jpg": [[1, 2, 2]] * 16}, r"bad.json: record 'a.jpg'.*got 16 rows"),
        ({"a.jpg": [[1, 2, 2]] * 16 + [[1, 2]]}, r"record 'a.jpg'.*row 16 \(right_ankle\) has 2"),
        ({"a.jpg": [[1, "2", 2]] * 17}, r"record 'a.jpg'.*row 0 \(nose\) holds a non-number"),
        ({"a.jpg": [[1, 2, 3]] * 17}, r"record 'a.jpg'.*visibility 3; expected a COCO flag"),
        ({"a.jpg": {"x": 1}}, r"record 'a.jpg': expected 17 rows"),
    ],
)
def test_malformed_files_name_the_file_and_record(tmp_path, content, pattern):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(KeypointFileError, match=pattern):
        read_keypoint_file(path)


def test_non_finite_and_duplicate_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"a.jpg": [' + ",".join(["[1, NaN, 2]"] * 17) + "]}")
    with pytest.raises(
        KeypointFileError, match=r"record 'a.jpg': keypoint 0 \(nose\) is not finite"
    ):
        read_keypoint_file(path)
    row = json.dumps(rows(0))
    path.write_text(f'{{"a.jpg": {row}, "a.jpg": {row}}}')
    with pytest.raises(KeypointFileError, match="'a.jpg' appears twice"):
        read_keypoint_file(path)


def test_wrong_images_errors_and_unmatched_warning(tmp_path):
    base = make_market(tmp_path)
    with pytest.raises(
        KeypointFileError, match=r"none of its 2 records matches one of the dataset's 5 images"
    ):
        load(tmp_path, write(tmp_path / "other.json", {"x.jpg": rows(0), "y.jpg": rows(1)}))
    name = TREE["query"][0]
    with pytest.raises(KeypointFileError, match="both for image"):
        load(tmp_path, write(tmp_path / "two.json", {name: rows(0), f"query/{name}": rows(1)}))
    ds, msgs = load(tmp_path, write(tmp_path / "extra.json", {name: rows(0), "x.jpg": rows(1)}))
    assert any("1 record(s) match no image" in m and "'x.jpg'" in m for m in msgs)
    # the same file name in two folders: a bare name is ambiguous, the relative path is not
    Image.new("RGB", (W, H)).save(base / "bounding_box_test" / name)
    with pytest.raises(KeypointFileError, match="names 2 different images"):
        load(tmp_path, write(tmp_path / "amb.json", {name: rows(0)}))
    ds, _ = load(tmp_path, write(tmp_path / "rel.json", {f"query/{name}": rows(0)}))
    assert ds.query[0].extras["keypoints"] == rows(0)


# ------------------------------------------------------------------------------- COCO
def coco_record(image_id, seed: int, score=0.9, conf=0.8, category=1) -> dict:
    flat = []
    for x, y, _ in rows(seed):
        flat += [x, y, conf]
    rec = {"image_id": image_id, "category_id": category, "keypoints": flat}
    if score is not None:
        rec["score"] = score
    return rec


def test_coco_object_with_images_scores_and_duplicates(tmp_path):
    make_market(tmp_path)
    names = [*TREE["bounding_box_train"], *TREE["query"]]
    low = coco_record(0, seed=1, score=0.3)
    best = coco_record(0, seed=0, score=0.95)
    best["keypoints"][2] = 0.1  # nose below the 0.2 threshold: invisible
    obj = {
        "images": [{"id": i, "file_name": f"some/prefix/{n}"} for i, n in enumerate(names)],
        "annotations": [
            low,
            best,
            coco_record(1, seed=2),
            coco_record(2, seed=3, category=2),  # not a person: ignored
        ],
    }
    ds, _ = load(tmp_path, write(tmp_path / "coco.json", obj))
    by_name = {Path(r.path).name: r.extras["keypoints"] for r in ds.train + ds.query}
    want = [[x, y, 2.0] for x, y, _ in rows(0)]
    want[0][2] = 0.0
    assert by_name[names[0]] == want
    assert by_name[names[1]] == [[x, y, 2.0] for x, y, _ in rows(2)]
    assert by_name[names[2]] == [[0.0, 0.0, 0.0]] * 17
    assert any("1 extra record(s)" in n for n in ds.notes)
    assert any("category_id != 1" in n for n in ds.notes)
    # a higher threshold hides more
    ds, _ = load(tmp_path, tmp_path / "coco.json", keypoint_threshold=0.9)
    assert all(v == 0 for _, _, v in ds.train[0].extras["keypoints"])


def test_coco_annotations_use_visibility_flags(tmp_path):
    make_market(tmp_path)
    name = TREE["query"][0]
    rec = coco_record(name, seed=0, score=None, conf=2)
    rec["keypoints"][5] = 1  # keypoint 1: labelled but hidden (flag 1) stays 1
    table = read_keypoint_file(write(tmp_path / "gt.json", [rec]))
    assert table.format == "coco"
    assert table.entries[name][1, 2] == 1 and table.entries[name][0, 2] == 2
    rec["keypoints"][2] = 0.5  # flags must be 0-2; 0.5 is fine, 5 is not
    rec["keypoints"][8] = 5
    with pytest.raises(
        KeypointFileError,
        match=r"record 0 \(image_id '0001.*keypoint 2 \(right_eye\) has visibility 5",
    ):
        read_keypoint_file(write(tmp_path / "gt.json", [rec]))


def test_coco_results_with_separate_images_file(tmp_path):
    make_market(tmp_path)
    names = TREE["query"]
    results = write(tmp_path / "results.json", [coco_record(7, seed=0)])
    with pytest.raises(
        KeypointFileError, match=r"results.json: record 0 \(image_id 7\).*keypoint_images=FILE"
    ):
        load(tmp_path, results)
    images = write(tmp_path / "images.json", {"images": [{"id": 7, "file_name": names[0]}]})
    ds, _ = load(tmp_path, results, keypoint_images=str(images))
    assert ds.query[0].extras["keypoints"] == [[x, y, 2.0] for x, y, _ in rows(0)]
    write(tmp_path / "images.json", [{"id": 8, "file_name": names[0]}])
    with pytest.raises(
        KeypointFileError,
        match=r"record 0 \(image_id 7\): image_id not in the images list of .*images.json",
    ):
        load(tmp_path, results, keypoint_images=str(images))


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        (
            {"image_id": "a.jpg", "keypoints": [1.0] * 50, "score": 1},
            r"record 0 \(image_id 'a.jpg'\): 'keypoints' must be 51 numbers.*got 50",
        ),
        ({"image_id": "a.jpg", "score": 1}, r"record 0 \(image_id 'a.jpg'\): missing keypoints"),
        ({"image_id": "a.jpg", "keypoints": [1.0] * 51, "score": "x"}, r"'score' must be a number"),
        ({"image_id": "a.jpg", "keypoints": [None] * 51, "score": 1}, r"holds a non-number"),
    ],
)
def test_malformed_coco_records(tmp_path, record, pattern):
    with pytest.raises(KeypointFileError, match=pattern):
        read_keypoint_file(write(tmp_path / "r.json", [record]))


def test_write_json_atomic_refuses_to_overwrite(tmp_path):
    out = write_json_atomic(tmp_path / "sub" / "k.json", {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_json_atomic(out, {"a": 2})
    write_json_atomic(out, {"a": 2}, overwrite=True)
    assert json.loads(out.read_text()) == {"a": 2}
    assert [p.name for p in out.parent.iterdir()] == ["k.json"]  # no temporary left


def test_datasets_stats_reports_keypoint_coverage(tmp_path, capsys):
    from reidkit.cli import main

    make_market(tmp_path)
    kp = write(tmp_path / "kp.json", {n: rows(i) for i, n in enumerate(TREE["bounding_box_train"])})
    args = ["datasets", "stats", "--name", "market1501", "--root", str(tmp_path)]
    assert main([*args, "--option", f"keypoints={kp}"]) == 0
    out = capsys.readouterr().out
    assert "train 2/2, query 0/1, gallery 0/2" in out
    assert "no record for 3 image(s) (query 1, gallery 2" in out
    kp.write_text("[")
    assert main([*args, "--option", f"keypoints={kp}"]) == 1
    assert "kp.json: invalid JSON" in capsys.readouterr().err


def test_synthetic_keypoints_pass_the_checks_unchanged(tmp_path):
    from reidkit.data.synth import SynthPreset, generate

    micro = SynthPreset("micro", 3, 3, 6, 6, 8, 2, 2, min_train_images_per_id=2)
    out = tmp_path / "synth-micro"
    generate(out, micro, seed=3, workers=1, progress=False, height=64, width=32)
    merged = {}
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        for name, kp in json.loads((out / "keypoints" / f"{folder}.json").read_text()).items():
            merged[f"{folder}/{name}"] = kp
    kp_file = write(tmp_path / "all.json", merged)
    auto = build_dataset("synth", tmp_path, preset="micro")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image matched, nothing unmatched
        ds = build_dataset("synth", tmp_path, preset="micro", keypoints=str(kp_file))
    # the junk boxes (pid -1) have records but are not part of the dataset: notes only
    assert any("2 record(s) for image files the dataset leaves out" in n for n in ds.notes)
    for split in ("train", "query", "gallery"):
        got = [r.extras["keypoints"] for r in getattr(ds, split)]
        want = [
            [[float(v) for v in row] for row in r.extras["keypoints"]] for r in getattr(auto, split)
        ]
        assert got == want
