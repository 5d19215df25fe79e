"""Dataset parsers on small fake trees with real-format file names."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidkit.config import load_config
from reidkit.data.datasets import (
    DatasetError,
    available_datasets,
    build_dataset,
    dataset_from_config,
    format_stats,
    split_stats,
)
from reidkit.data.images import find_bad_images

h5py = pytest.importorskip("h5py")
scipy_io = pytest.importorskip("scipy.io")

MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


# ------------------------------------------------------------------------ helpers
def write_img(path: Path, color: tuple[int, int, int] = (120, 30, 200), size=(4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_tree(base: Path, layout: dict[str, list[str]]) -> None:
    for folder, names in layout.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_img(base / folder / name)


MARKET = {
    "bounding_box_train": [
        "0015_c6s1_002301_02.jpg",
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0007_c3s3_070952_01.jpg",
    ],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c4s1_000001_00.jpg"],
    "bounding_box_test": [
        "0001_c2s1_000301_01.jpg",
        "0003_c5s2_000001_01.jpg",
        "0000_c1s1_000151_01.jpg",  # distractor: kept
        "-1_c1s1_000401_03.jpg",  # junk: dropped
    ],
}


def expected_relabel(pids: list[int]) -> dict[int, int]:
    """Independent relabelling: rank of each pid among the sorted unique pids."""
    uniq = sorted(set(pids))
    return {p: uniq.index(p) for p in uniq}


def by_name(records) -> dict[str, tuple[int, int]]:
    return {os.path.basename(r.path): (r.pid, r.camid) for r in records}


# --------------------------------------------------------------------- market1501
@pytest.mark.parametrize(
    "sub",
    ["market1501/Market-1501-v15.09.15", "Market-1501-v15.09.15", "market1501", ""],
)
def test_market1501_roots_relabel_and_protocol(tmp_path, sub):
    make_tree(tmp_path / sub if sub else tmp_path, MARKET)
    ds = build_dataset("market1501", tmp_path)
    raw_train = [int(n.split("_")[0]) for n in MARKET["bounding_box_train"]]
    relabel = expected_relabel(raw_train)
    expected_train = {
        n: (relabel[int(n.split("_")[0])], int(n.split("_")[1][1]) - 1)
        for n in MARKET["bounding_box_train"]
    }
    assert by_name(ds.train) == expected_train
    assert sorted(r.pid for r in ds.train) == [0, 0, 1, 2]  # 2 -> 0 (x2), 7 -> 1, 15 -> 2
    assert by_name(ds.query) == {
        "0001_c1s1_001051_00.jpg": (1, 0),
        "0003_c4s1_000001_00.jpg": (3, 3),
    }
    gallery = by_name(ds.gallery)
    assert "-1_c1s1_000401_03.jpg" not in gallery
    assert gallery["0000_c1s1_000151_01.jpg"] == (0, 0)
    assert len(gallery) == 3
    assert all(os.path.isabs(r.path) and os.path.isfile(r.path) for r in ds.train)
    assert ds.num_train_pids == 3


def test_market_keypoints_attached(tmp_path):
    base = tmp_path / "market1501"
    make_tree(base, MARKET)
    kp = [[float(i), float(2 * i), 2] for i in range(17)]
    (base / "keypoints").mkdir()
    (base / "keypoints" / "bounding_box_train.json").write_text(
        json.dumps({"0002_c1s1_000451_03.jpg": kp})
    )
    ds = build_dataset("market", tmp_path)
    extras = {os.path.basename(r.path): r.extras for r in ds.train}
    assert extras["0002_c1s1_000451_03.jpg"]["keypoints"] == kp
    assert "keypoints" not in extras["0007_c3s3_070952_01.jpg"]
    assert all("keypoints" not in r.extras for r in ds.query)  # no query keypoint file

    (base / "keypoints" / "query.json").write_text(json.dumps({"0001_c1s1_001051_00.jpg": kp[:16]}))
    with pytest.raises(DatasetError, match=r"query\.json.*0001_c1s1_001051_00\.jpg.*17 rows"):
        build_dataset("market1501", tmp_path)


def test_format_stats_table(tmp_path):
    make_tree(tmp_path / "market1501", MARKET)
    ds = build_dataset("market1501", tmp_path)
    table = format_stats(ds)
    lines = {line.split("|")[0].strip(): line for line in table.splitlines() if "|" in line}
    assert set(lines) == {"subset", "train", "query", "gallery"}
    # independent counts from the name lists above
    assert [c.strip() for c in lines["train"].split("|")] == ["train", "3", "4", "4"]
    assert [c.strip() for c in lines["query"].split("|")] == ["query", "2", "2", "2"]
    assert [c.strip() for c in lines["gallery"].split("|")] == ["gallery", "3", "3", "3"]
    assert split_stats(ds)["gallery"] == {"ids": 3, "images": 3, "cameras": 3}


# ----------------------------------------------------------------- duke and veri
def test_dukemtmc(tmp_path):
    layout = {
        "bounding_box_train": [
            "0001_c2_f0046182.jpg",
            "0001_c8_f0000001.jpg",
            "0010_c1_f0000002.jpg",
        ],
        "query": ["0005_c3_f0000003.jpg"],
        "bounding_box_test": ["0005_c7_f0000004.jpg", "0009_c1_f0000005.jpg"],
    }
    make_tree(tmp_path / "dukemtmc-reid" / "DukeMTMC-reID", layout)
    ds = build_dataset("dukemtmc", tmp_path)
    assert by_name(ds.train) == {
        "0001_c2_f0046182.jpg": (0, 1),
        "0001_c8_f0000001.jpg": (0, 7),
        "0010_c1_f0000002.jpg": (1, 0),
    }
    assert by_name(ds.gallery)["0005_c7_f0000004.jpg"] == (5, 6)

    write_img(tmp_path / "dukemtmc-reid" / "DukeMTMC-reID" / "query" / "0005_c9_f0000009.jpg")
    with pytest.raises(DatasetError, match=r"camera id outside 1\.\.8.*0005_c9_f0000009\.jpg"):
        build_dataset("duke", tmp_path)


def test_veri(tmp_path):
    layout = {
        "image_train": [
            "0001_c001_00016450_0.jpg",
            "0001_c020_00016460_0.jpg",
            "0004_c003_00000010_1.jpg",
        ],
        "image_query": ["0002_c002_00030600_1.jpg"],
        "image_test": ["0002_c015_00030700_1.jpg", "0003_c004_00000001_0.jpg"],
    }
    make_tree(tmp_path / "VeRi", layout)
    ds = build_dataset("veri776", tmp_path)
    assert by_name(ds.train) == {
        "0001_c001_00016450_0.jpg": (0, 0),
        "0001_c020_00016460_0.jpg": (0, 19),
        "0004_c003_00000010_1.jpg": (1, 2),
    }
    assert by_name(ds.query) == {"0002_c002_00030600_1.jpg": (2, 1)}
    assert by_name(ds.gallery)["0002_c015_00030700_1.jpg"] == (2, 14)


# -------------------------------------------------------------------------- msmt17
MSMT_TRAIN = [
    "0000/0000_000_01_0303morning_0015_0.jpg",
    "0000/0000_001_15_0303noon_0020_1.jpg",
    "0003/0003_000_07_0303afternoon_0001_0.jpg",
]
MSMT_VAL = ["0001/0001_000_02_0303morning_0100_0.jpg"]
MSMT_QUERY = ["0000/0000_000_10_0113morning_0001_0.jpg"]
MSMT_GALLERY = ["0000/0000_001_11_0113noon_0002_0.jpg", "0002/0002_000_12_0113noon_0003_0.jpg"]


def make_msmt(base: Path, train_dir: str, test_dir: str) -> None:
    for rel in MSMT_TRAIN + MSMT_VAL:
        write_img(base / train_dir / rel)
    for rel in MSMT_QUERY + MSMT_GALLERY:
        write_img(base / test_dir / rel)

    def lines(rels):
        return "".join(f"{r} {int(r.split('/')[0])}\n" for r in rels)

    (base / "list_train.txt").write_text(lines(MSMT_TRAIN))
    (base / "list_val.txt").write_text(lines(MSMT_VAL))
    (base / "list_query.txt").write_text(lines(MSMT_QUERY))
    (base / "list_gallery.txt").write_text(lines(MSMT_GALLERY))


@pytest.mark.parametrize(
    ("main", "train_dir", "test_dir", "version"),
    [
        ("msmt17/MSMT17_V1", "train", "test", "auto"),
        ("MSMT17_V2", "mask_train_v2", "mask_test_v2", "auto"),
        ("msmt17/MSMT17_V2", "mask_train_V2", "mask_test_V2", "v2"),
    ],
)
def test_msmt17_versions(tmp_path, main, train_dir, test_dir, version):
    make_msmt(tmp_path / main, train_dir, test_dir)
    ds = build_dataset("msmt17", tmp_path, version=version)
    names = {os.path.basename(r) for r in MSMT_TRAIN + MSMT_VAL}
    assert {os.path.basename(r.path) for r in ds.train} == names
    # camera = third "_" field of the name, 1..15 -> 0..14; pids 0,1,3 -> 0,1,2
    assert by_name(ds.train) == {
        "0000_000_01_0303morning_0015_0.jpg": (0, 0),
        "0000_001_15_0303noon_0020_1.jpg": (0, 14),
        "0001_000_02_0303morning_0100_0.jpg": (1, 1),
        "0003_000_07_0303afternoon_0001_0.jpg": (2, 6),
    }
    assert by_name(ds.query) == {"0000_000_10_0113morning_0001_0.jpg": (0, 9)}
    assert by_name(ds.gallery)["0002_000_12_0113noon_0003_0.jpg"] == (2, 11)

    only_train = build_dataset("msmt17", tmp_path, version=version, merge_val=False)
    assert len(only_train.train) == len(MSMT_TRAIN)
    assert sorted({r.pid for r in only_train.train}) == [0, 1]  # 0, 3 relabelled


def test_msmt17_bad_list_line_and_missing_file(tmp_path):
    base = tmp_path / "MSMT17_V1"
    make_msmt(base, "train", "test")
    (base / "list_query.txt").write_text("0000/0000_000_10_0113morning_0001_0.jpg\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt.*expected format.*line 1"):
        build_dataset("msmt17", tmp_path)
    (base / "list_query.txt").write_text(
        "0000/0000_000_10_0113morning_0001_0.jpg 0\n0000/0000_000_03_nope_0001_0.jpg 0\n"
    )
    with pytest.raises(DatasetError, match=r"0000_000_03_nope_0001_0\.jpg: file not found"):
        build_dataset("msmt17", tmp_path)


# -------------------------------------------------------------------------- cuhk03
@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_np(tmp_path, variant):
    layout = {
        "bounding_box_train": ["0004_c1_1.png", "0004_c2_6.png", "0002_c1_2.png"],
        "query": ["0100_c1_1.png"],
        "bounding_box_test": ["0100_c2_7.png"],
    }
    make_tree(tmp_path / "cuhk03-np" / variant, layout)
    other = "detected" if variant == "labeled" else "labeled"
    make_tree(tmp_path / "cuhk03-np" / other, {k: v[:1] for k, v in layout.items()})
    ds = build_dataset("cuhk03", tmp_path, variant=variant)
    assert by_name(ds.train) == {
        "0004_c1_1.png": (1, 0),
        "0004_c2_6.png": (1, 1),
        "0002_c1_2.png": (0, 0),
    }
    assert by_name(ds.gallery) == {"0100_c2_7.png": (100, 1)}
    assert any(variant in n for n in ds.notes)


PAIR_PIDS = [3, 2]  # identities per camera pair in the fake .mat
PRESENT = {0, 1, 5, 6}  # filled slots: images 1, 2 (view 1) and 6, 7 (view 2)


def fake_image(pair: int, pid: int, slot: int) -> np.ndarray:
    """H x W x 3 uint8 with non-square size and content unique to the slot."""
    rng = np.random.default_rng(pair * 100 + pid * 10 + slot)
    return rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)


def write_fake_cuhk03_mat(path: Path) -> None:
    """MATLAB v7.3 layout: '<variant>' (1, pairs) refs -> (10, num_pids) refs -> images
    stored transposed (3, W, H); empty cells are uint64 [0, 0]; testsets (1, n) refs to
    (2, N) [pair; pid] arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        counter = [0]

        def put(arr):
            counter[0] += 1
            return refs.create_dataset(f"r{counter[0]}", data=arr).ref

        for variant in ("labeled", "detected"):
            pair_refs = []
            for pair, npids in enumerate(PAIR_PIDS):
                cells = np.empty((10, npids), dtype=object)
                for pid in range(npids):
                    for slot in range(10):
                        if slot in PRESENT:
                            cells[slot, pid] = put(fake_image(pair, pid, slot).transpose(2, 1, 0))
                        else:
                            cells[slot, pid] = put(np.zeros(2, dtype=np.uint64))
                pair_refs.append(put(np.asarray(cells, dtype=h5py.ref_dtype)))
            f.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype))
        tests = [np.array([[1, 2], [2, 1]]), np.array([[1, 1], [1, 2]])]  # (2, N): pairs; pids
        f.create_dataset("testsets", data=np.array([[put(t) for t in tests]], dtype=h5py.ref_dtype))


def all_names() -> list[tuple[str, int, int]]:
    """(file name, global pid, view) of every present image, independent of the parser."""
    out, offset = [], 0
    for pair, npids in enumerate(PAIR_PIDS):
        for pid in range(npids):
            for slot in sorted(PRESENT):
                view = 1 if slot < 5 else 2
                out.append(
                    (f"{pair + 1}_{pid + 1:03d}_{view}_{slot + 1:02d}.png", offset + pid + 1, view)
                )
        offset += npids
    return out


def write_split_file(path: Path) -> dict[str, list[str]]:
    names = all_names()
    train_pids = {1, 2, 4}
    train = [i + 1 for i, (_, p, _) in enumerate(names) if p in train_pids]
    test = [i for i, (_, p, _) in enumerate(names) if p not in train_pids]
    query = [
        i + 1 for i in test if names[i][0].endswith("_01.png") or names[i][0].endswith("_06.png")
    ]
    gallery = [i + 1 for i in test if i + 1 not in query]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, (n, _, _) in enumerate(names):
        filelist[i, 0] = np.array([n])
    scipy_io.savemat(
        path,
        {
            "filelist": filelist,
            "labels": np.array([[p] for _, p, _ in names], dtype=np.float64),
            "camId": np.array([[v] for _, _, v in names], dtype=np.float64),
            "train_idx": np.array(train, dtype=np.float64)[:, None],
            "query_idx": np.array(query, dtype=np.float64)[:, None],
            "gallery_idx": np.array(gallery, dtype=np.float64)[:, None],
        },
    )
    pick = lambda idx: [names[i - 1][0] for i in idx]  # noqa: E731
    return {"train": pick(train), "query": pick(query), "gallery": pick(gallery)}


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_mat_new_protocol(tmp_path, variant):
    base = tmp_path / "cuhk03"
    write_fake_cuhk03_mat(base / "cuhk03_release" / "cuhk-03.mat")
    expected = write_split_file(base / f"cuhk03_new_protocol_config_{variant}.mat")
    ds = build_dataset("cuhk03", tmp_path, variant=variant, source="auto", num_workers=2)

    img_dir = base / f"images_{variant}"
    written = sorted(p.name for p in img_dir.glob("*.png"))
    assert written == sorted(n for n, _, _ in all_names())
    # orientation and content: the PNG equals the MATLAB (H, W, 3) array
    got = np.asarray(Image.open(img_dir / "2_001_2_07.png"))
    np.testing.assert_array_equal(got, fake_image(1, 0, 6))

    info = {n: (p, v - 1) for n, p, v in all_names()}
    relabel = expected_relabel([info[n][0] for n in expected["train"]])
    assert by_name(ds.train) == {n: (relabel[info[n][0]], info[n][1]) for n in expected["train"]}
    assert by_name(ds.query) == {n: info[n] for n in expected["query"]}
    assert by_name(ds.gallery) == {n: info[n] for n in expected["gallery"]}

    # converted once: a second build reuses the PNGs (marker present, files untouched)
    mtime = (img_dir / "1_001_1_01.png").stat().st_mtime_ns
    build_dataset("cuhk03", tmp_path, variant=variant, source="mat")
    assert (img_dir / "1_001_1_01.png").stat().st_mtime_ns == mtime
    assert (img_dir / ".complete").is_file()


def test_cuhk03_mat_classic_split(tmp_path):
    write_fake_cuhk03_mat(tmp_path / "cuhk03" / "cuhk03_release" / "cuhk-03.mat")
    ds = build_dataset("cuhk03", tmp_path, classic_split=True, split_id=0)
    # testsets[0] = (pair 1, pid 2), (pair 2, pid 1) -> global pids 2 and 3 + 1 = 4
    names = all_names()
    test_names = {n: (p, v - 1) for n, p, v in names if p in {2, 4}}
    assert by_name(ds.query) == test_names == by_name(ds.gallery)
    train_pids = sorted({p for _, p, _ in names if p not in {2, 4}})
    assert sorted({r.pid for r in ds.train}) == list(range(len(train_pids)))
    assert len(ds.train) == len(names) - len(test_names)
    with pytest.raises(DatasetError, match="split_id 5 out of range"):
        build_dataset("cuhk03", tmp_path, classic_split=True, split_id=5)


def test_cuhk03_missing_everything_lists_both_layouts(tmp_path):
    with pytest.raises(DatasetError) as info:
        build_dataset("cuhk03", tmp_path, variant="detected")
    msg = str(info.value)
    assert "cuhk03-np/detected" in msg and "cuhk03_new_protocol_config_detected.mat" in msg


# -------------------------------------------------------------------------- custom
def test_custom_csv_manifest(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"):
        write_img(tmp_path / "data" / "imgs" / name)
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text(
        "path,pid,camid,split\n"
        "imgs/a.jpg,10,0,train\nimgs/b.jpg,4,1,train\nimgs/c.jpg,7,0,query\n"
        "imgs/d.jpg,7,2,gallery\n" + f"{tmp_path / 'data' / 'imgs' / 'e.jpg'},8,1,gallery\n"
    )
    ds = build_dataset("custom", tmp_path / "elsewhere", manifest=str(manifest))
    assert by_name(ds.train) == {"a.jpg": (1, 0), "b.jpg": (0, 1)}
    assert by_name(ds.query) == {"c.jpg": (7, 0)}
    assert by_name(ds.gallery) == {"d.jpg": (7, 2), "e.jpg": (8, 1)}
    assert all(Path(r.path).is_file() for r in ds.gallery)


def test_custom_json_manifest_names_and_no_cameras(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_img(tmp_path / name)
    rows = [
        {"path": "a.png", "pid": "alice", "split": "train"},
        {"path": "b.png", "pid": "bob", "split": "query"},
        {"path": "c.png", "pid": "bob", "split": "gallery"},
    ]
    (tmp_path / "m.json").write_text(json.dumps({"images": rows}))
    with pytest.warns(UserWarning, match="without camera filtering"):
        ds = build_dataset("custom", tmp_path, manifest="m.json")
    assert by_name(ds.query) == {"b.png": (1, -1)}  # names sorted: alice 0, bob 1
    assert by_name(ds.gallery) == {"c.png": (1, -1)}
    assert by_name(ds.train) == {"a.png": (0, -1)}
    assert any("without camera filtering" in n for n in ds.notes)
    train_row = [c.strip() for c in format_stats(ds).splitlines()[4].split("|")]
    assert train_row == ["train", "1", "1", "-"]  # unknown cameras shown as "-"


def test_custom_manifest_errors(tmp_path):
    write_img(tmp_path / "a.jpg")
    m = tmp_path / "m.csv"
    m.write_text("path,pid,split\na.jpg,1,training\n")
    with pytest.raises(DatasetError, match=r"row 1: split 'training'"):
        build_dataset("custom", tmp_path, manifest=str(m))
    m.write_text("file,pid,split\na.jpg,1,train\n")
    with pytest.raises(DatasetError, match=r"missing column.*'path'"):
        build_dataset("custom", tmp_path, manifest=str(m))
    m.write_text("path,pid,camid,split\na.jpg,1,0,train\na.jpg,1,,query\na.jpg,1,1,gallery\n")
    with pytest.raises(DatasetError, match=r"camid is given for some rows.*row 2"):
        build_dataset("custom", tmp_path, manifest=str(m))
    with pytest.raises(DatasetError, match="manifest not found"):
        build_dataset("custom", tmp_path, manifest="nope.csv")


def test_custom_folder_layout_with_and_without_cameras(tmp_path):
    root = tmp_path / "mine"
    for split, ident, name in [
        ("train", "0005", "0005_c1_a.jpg"),
        ("train", "0002", "0002_c3_b.jpg"),
        ("query", "0009", "0009_c1_c.jpg"),
        ("gallery", "0009", "0009_c2_d.jpg"),
        ("gallery", "0010", "0010_c3_e.jpg"),
    ]:
        write_img(root / split / ident / name)
    ds = build_dataset("custom", root)
    assert by_name(ds.train) == {"0005_c1_a.jpg": (1, 0), "0002_c3_b.jpg": (0, 2)}
    assert by_name(ds.gallery) == {"0009_c2_d.jpg": (9, 1), "0010_c3_e.jpg": (10, 2)}

    plain = tmp_path / "plain"
    for split, ident in [("train", "tom"), ("query", "ann"), ("gallery", "ann")]:
        write_img(plain / split / ident / "img1.jpg")
    with pytest.warns(UserWarning, match="without camera filtering"):
        ds2 = build_dataset("custom", plain)
    assert [r.camid for r in ds2.query + ds2.gallery + ds2.train] == [-1, -1, -1]
    assert ds2.query[0].pid == ds2.gallery[0].pid == 0  # ann < tom

    write_img(root / "gallery" / "0010" / "nocam.jpg")
    with pytest.raises(DatasetError, match=r"some file names but not others.*nocam\.jpg"):
        build_dataset("custom", root)
    with pytest.raises(DatasetError, match=r"missing .*query"):
        build_dataset("custom", tmp_path / "plain" / "train")


# --------------------------------------------------------------------- bad inputs
def test_missing_folder_names_layout_and_tried_paths(tmp_path):
    (tmp_path / "market1501").mkdir()
    with pytest.raises(DatasetError) as info:
        build_dataset("market1501", tmp_path)
    msg = str(info.value)
    assert "bounding_box_train" in msg and "Expected layout" in msg
    assert str(tmp_path / "market1501" / "Market-1501-v15.09.15") in msg
    assert str(tmp_path / "Market-1501-v15.09.15") in msg


def test_bad_file_names_list_offenders(tmp_path):
    layout = {k: list(v) for k, v in MARKET.items()}
    layout["query"] += [f"frame{i}.jpg" for i in range(7)]
    make_tree(tmp_path / "market1501", layout)
    with pytest.raises(DatasetError) as info:
        build_dataset("market1501", tmp_path)
    msg = str(info.value)
    assert "7 file name(s)" in msg and "'frame0.jpg'" in msg and "and 2 more" in msg
    assert "0002_c1s1_000451_03.jpg" in msg  # the expected pattern example


def test_empty_split(tmp_path):
    layout = dict(MARKET, query=[])
    make_tree(tmp_path / "market1501", layout)
    with pytest.raises(DatasetError, match=r"query split is empty"):
        build_dataset("market1501", tmp_path)


def test_query_ids_absent_from_gallery_warns_with_counts(tmp_path):
    layout = dict(
        MARKET, query=MARKET["query"] + ["0042_c1s1_000001_00.jpg", "0042_c2s1_000001_00.jpg"]
    )
    make_tree(tmp_path / "market1501", layout)
    with pytest.warns(UserWarning, match=r"1 query identities \(2 query images\) have no image"):
        build_dataset("market1501", tmp_path)


def test_corrupt_images_error_skip_and_verify(tmp_path):
    base = tmp_path / "market1501"
    make_tree(base, MARKET)
    empty = base / "bounding_box_train" / "0002_c2s1_000301_01.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"0002_c2s1_000301_01\.jpg: empty file"):
        build_dataset("market1501", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = build_dataset("market1501", tmp_path, skip_corrupt=True)
    assert len(ds.skipped) == 1 and ds.skipped[0].path == str(empty)
    assert len(ds.train) == 3 and "skipped 1" in format_stats(ds)

    write_img(empty)
    garbage = base / "bounding_box_test" / "0003_c5s2_000001_01.jpg"
    garbage.write_bytes(b"\xff\xd8not really a jpeg at all")
    # the start-up check sees a JPEG without its end marker and decodes it: refused
    with pytest.raises(
        DatasetError, match=r"0003_c5s2_000001_01\.jpg: (not a recognised|corrupt|truncated)"
    ):
        build_dataset("market1501", tmp_path)
    # damage inside a complete JPEG passes the start-up check; verify_images decodes it
    write_img(garbage)
    data = bytearray(garbage.read_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 2 : sos + 14] = b"\xff" * 12
    garbage.write_bytes(bytes(data))
    ds = build_dataset("market1501", tmp_path)
    assert len(ds.gallery) == 3
    with pytest.raises(DatasetError, match=r"0003_c5s2_000001_01\.jpg: (not a recognised|corrupt)"):
        build_dataset("market1501", tmp_path, verify_images=True, num_workers=2)


def test_find_bad_images_threaded_matches_serial(tmp_path):
    paths = []
    for i in range(80):
        p = tmp_path / f"{i}.png"
        if i % 9 == 0:
            p.write_bytes(b"junk")
        elif i % 13 == 0:
            pass  # missing
        else:
            write_img(p)
        paths.append(str(p))
    serial = find_bad_images(paths, verify=True, num_workers=1)
    threaded = find_bad_images(paths, verify=True, num_workers=4)
    assert serial == threaded
    expected = [str(tmp_path / f"{i}.png") for i in range(80) if i % 9 == 0 or i % 13 == 0]
    assert [b.path for b in threaded] == expected


def test_unknown_name_and_option(tmp_path):
    with pytest.raises(DatasetError, match=r"did you mean 'market1501'"):
        build_dataset("market1510", tmp_path)
    with pytest.raises(DatasetError, match=r"unknown option\(s\) \['variant'\]"):
        build_dataset("market1501", tmp_path, variant="labeled")
    assert {"market1501", "dukemtmc", "msmt17", "cuhk03", "veri", "custom", "synth"} <= set(
        available_datasets()
    )


# ------------------------------------------------------------- synth, config, CLI
def test_synth_and_dataset_from_config(tmp_path):
    make_tree(tmp_path / "synth-tiny", MARKET)
    cfg = load_config(
        None, [f"data.root={tmp_path}", "data.dataset=synth", "data.synth_preset=tiny"]
    )
    ds = dataset_from_config(cfg.data)
    assert ds.name == "synth" and len(ds.train) == 4
    cfg = load_config(
        None, [f"data.root={tmp_path}", "data.dataset=synth", "data.synth_preset=small"]
    )
    with pytest.raises(DatasetError, match=r"reidkit synth --preset small"):
        dataset_from_config(cfg.data)


def test_cli_stats(tmp_path, capsys):
    from reidkit.cli import main

    make_tree(tmp_path / "market1501", MARKET)
    assert main(["datasets", "stats", "--name", "market1501", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# cameras" in out and "gallery" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  dataset: market1501\n  root: {tmp_path}\n")
    assert main(["datasets", "stats", "-c", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines()[4:7] == out.splitlines()[4:7]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["datasets", "stats", "--name", "veri", "--root", str(tmp_path)]) == 1
    assert "Expected layout" in capsys.readouterr().err


def test_register_dataset_uses_shared_checks(tmp_path):
    from reidkit.data.datasets import _REGISTRY, register_dataset
    from reidkit.data.datasets.base import finalize_dataset
    from reidkit.data.records import ImageRecord

    for n in ("x.jpg", "y.jpg", "z.jpg"):
        write_img(tmp_path / n)

    @register_dataset("toy_registered")
    def load_toy(root, opts, offset: int = 0):
        rec = lambda n, pid, cam: ImageRecord(str(Path(root) / n), pid + offset, cam)  # noqa: E731
        splits = {
            "train": [rec("x.jpg", 5, 0)],
            "query": [rec("y.jpg", 1, 0)],
            "gallery": [rec("z.jpg", 1, 1)],
        }
        return finalize_dataset("toy_registered", root, root, splits, opts)

    try:
        ds = build_dataset("toy_registered", tmp_path, offset=10)
        assert ds.train[0].pid == 0 and ds.query[0].pid == 11
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("toy_registered", load_toy)
    finally:
        _REGISTRY.pop("toy_registered")
