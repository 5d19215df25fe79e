"""Tracklet parsers on fake trees: MARS (with its real counts), iLIDS-VID, PRID2011,
DukeMTMC-VideoReID, the registry, and every bad-input case."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from reidkit.data.datasets import DatasetError
from reidkit.data.datasets.video import (
    available_video_datasets,
    build_video_dataset,
    format_video_stats,
    num_splits,
    video_dataset_from_config,
    video_split_stats,
)
from reidkit.data.records import TrackletRecord


def _tiny_png() -> bytes:
    """A valid 1x1 PNG: the parsers check each frame's signature and end marker."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


FRAME_BYTES = _tiny_png()

# ----------------------------------------------------------------------------- MARS


def _mars_name(pid: int, cam: int, track: int, frame: int) -> str:
    p = "00-1" if pid < 0 else f"{pid:04d}"
    return f"{p}C{cam}T{track:04d}F{frame:03d}.jpg"


def write_mars(
    root: Path,
    train: list[tuple[int, int, int]],
    test: list[tuple[int, int, int]],
    query_rows: list[int],
    shuffle_within: bool = False,
    write_frames: bool = True,
) -> Path:
    """A MARS tree under ``root/mars``: tracks are (pid, cam, num_frames); ``query_rows``
    are 1-based rows of the test tracks. Frames are hard links to one tiny PNG file (the
    parser only stats them; links are much faster to make than files).
    ``shuffle_within`` lists each tracklet's frames in a random order."""
    ddir = root / "mars"
    (ddir / "info").mkdir(parents=True)
    blob = root / "frame.jpg"
    blob.write_bytes(FRAME_BYTES)
    rng = random.Random(0)
    for split, tracks, folder in (("train", train, "bbox_train"), ("test", test, "bbox_test")):
        names: list[str] = []
        rows = []
        counter: dict[int, int] = {}
        made: set[str] = set()
        for pid, cam, n in tracks:
            counter[pid] = counter.get(pid, 0) + 1
            frames = [_mars_name(pid, cam, counter[pid], f + 1) for f in range(n)]
            if shuffle_within:
                rng.shuffle(frames)
            start = len(names) + 1
            names += frames
            rows.append([start, len(names), pid, cam])
            if write_frames:
                d = os.path.join(ddir, folder, frames[0][:4])
                if d not in made:
                    os.makedirs(d, exist_ok=True)
                    made.add(d)
                for f in frames:
                    os.link(blob, os.path.join(d, f))
        (ddir / "info" / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        savemat(
            str(ddir / "info" / f"tracks_{split}_info.mat"),
            {f"track_{split}_info": np.asarray(rows, dtype=np.float64).reshape(-1, 4)},
        )
    savemat(str(ddir / "info" / "query_IDX.mat"), {"query_IDX": np.asarray(query_rows, float)})
    (ddir / "bbox_train").mkdir(exist_ok=True)
    (ddir / "bbox_test").mkdir(exist_ok=True)
    return ddir


def test_mars_counts_on_a_tree_of_the_real_shape(tmp_path: Path) -> None:
    """625 train ids / 8,298 tracklets; 12,180 test tracks of which 1,980 queries;
    9,330 gallery tracklets after removing the 870 junk ones (torchreid's numbers)."""
    rng = np.random.default_rng(0)
    train_pids = np.sort(rng.choice(np.arange(1, 1502, 2), 625, replace=False))
    per_id = np.full(625, 13)
    per_id[rng.choice(625, 8298 - 13 * 625, replace=False)] += 1
    train = [
        (int(p), int(1 + (p + k) % 6), 2 if k == 0 and p == train_pids[0] else 1)
        for p, n in zip(train_pids, per_id)
        for k in range(n)
    ]
    test_pids = np.sort(rng.choice(np.arange(2, 1502, 2), 626, replace=False))
    test: list[tuple[int, int, int]] = []
    query_rows: list[int] = []
    # 1,980 queries over the 626 test ids (3 or 4 cameras each), each with gallery
    # tracklets in other cameras; 9,330 gallery rows incl. 300 distractors (pid 0)
    q_per_id = np.full(626, 3)
    q_per_id[rng.choice(626, 1980 - 3 * 626, replace=False)] += 1
    for pid, nq in zip(test_pids, q_per_id):
        for c in range(nq):
            test.append((int(pid), c + 1, 1))
            query_rows.append(len(test))
    gallery_valid = 9330 - 300
    for i in range(gallery_valid):
        pid = int(test_pids[i % 626])
        test.append((pid, 1 + (i // 626) % 6, 1))
    test += [(0, 1 + i % 6, 1) for i in range(300)]
    test += [(-1, 1 + i % 6, 1) for i in range(870)]
    assert len(test) == 12180 and len(query_rows) == 1980
    write_mars(tmp_path, train, test, query_rows)

    ds = build_video_dataset("mars", tmp_path)
    stats = video_split_stats(ds)
    assert stats["train"]["ids"] == 625 and stats["train"]["tracklets"] == 8298
    assert stats["query"]["tracklets"] == 1980 and stats["query"]["ids"] == 626
    assert stats["gallery"]["tracklets"] == 9330
    assert sum(r.pid == 0 for r in ds.gallery) == 300  # distractors kept
    assert all(r.pid != -1 for r in ds.gallery)  # junk dropped
    assert sorted({r.pid for r in ds.train}) == list(range(625))
    assert {r.camid for r in ds.train} == set(range(6))
    two = next(r for r in ds.train if len(r) == 2)
    assert two.paths[0].endswith("F001.jpg") and two.paths[1].endswith("F002.jpg")
    assert (
        "/bbox_train/" in two.paths[0] and Path(two.paths[0]).parent.name == two.paths[0][-19:-15]
    )
    table = format_video_stats(ds)
    assert "8298" in table and "9330" in table and "1980" in table


def _small_mars(tmp_path: Path, **kw) -> Path:
    train = [(1, 1, 3), (1, 2, 2), (3, 1, 4), (3, 3, 1)]
    test = [(2, 1, 3), (2, 2, 2), (4, 3, 3), (4, 1, 2), (0, 2, 1), (-1, 1, 2)]
    return write_mars(tmp_path, train, test, [1, 3], **kw)


def test_mars_frames_sorted_by_frame_number(tmp_path: Path) -> None:
    _small_mars(tmp_path, shuffle_within=True)
    ds = build_video_dataset("mars", tmp_path)
    for r in ds.train + ds.query + ds.gallery:
        nums = [int(p[-7:-4]) for p in r.paths]
        assert nums == sorted(nums) == list(r.extras["frame_numbers"])
    assert [len(r) for r in ds.query] == [3, 3]
    assert [(r.pid, r.camid) for r in ds.query] == [(2, 0), (4, 2)]
    assert len(ds.gallery) == 3  # junk row dropped, distractor kept


def test_mars_missing_info_file_names_the_layout(tmp_path: Path) -> None:
    ddir = _small_mars(tmp_path)
    (ddir / "info" / "query_IDX.mat").unlink()
    with pytest.raises(
        DatasetError, match=r"(?s)query_IDX\.mat.*Expected layout.*tracks_test_info"
    ):
        build_video_dataset("mars", tmp_path)
    with pytest.raises(DatasetError, match="Expected layout"):
        build_video_dataset("mars", tmp_path / "nowhere")


def test_mars_bad_names_rows_and_query_idx(tmp_path: Path) -> None:
    ddir = _small_mars(tmp_path)
    names = (ddir / "info" / "train_name.txt").read_text().split("\n")
    names[1] = "0001C1T0001X002.jpg"
    (ddir / "info" / "train_name.txt").write_text("\n".join(names))
    with pytest.raises(DatasetError, match=r"do not match the expected pattern.*0001C1T0001X002"):
        build_video_dataset("mars", tmp_path)
    names[1] = "0003C1T0001F002.jpg"  # another person's frame inside pid 1's tracklet
    (ddir / "info" / "train_name.txt").write_text("\n".join(names))
    with pytest.raises(DatasetError, match="must start with pid 0001 and camera C1"):
        build_video_dataset("mars", tmp_path)

    ddir2 = _small_mars(tmp_path / "b")
    savemat(str(ddir2 / "info" / "query_IDX.mat"), {"query_IDX": np.asarray([1, 99.0])})
    with pytest.raises(DatasetError, match=r"query_IDX must hold 1-based rows.*\[99\]"):
        build_video_dataset("mars", tmp_path / "b")
    savemat(str(ddir2 / "info" / "tracks_test_info.mat"), {"wrong_key": np.ones((2, 4))})
    with pytest.raises(DatasetError, match="no variable 'track_test_info'"):
        build_video_dataset("mars", tmp_path / "b")


def test_mars_empty_tracklet_error_and_skip(tmp_path: Path) -> None:
    ddir = _small_mars(tmp_path)
    rows = np.asarray(
        [[1, 3, 1, 1], [4, 5, 1, 2], [6, 9, 3, 1], [11, 10, 3, 3]], dtype=float
    )  # last row: start > end
    savemat(str(ddir / "info" / "tracks_train_info.mat"), {"track_train_info": rows})
    with pytest.raises(
        DatasetError, match=r"(?s)1 empty tracklet.*row 4 of tracks_train_info\.mat"
    ):
        build_video_dataset("mars", tmp_path)
    ds = build_video_dataset("mars", tmp_path, skip_corrupt=True)
    assert len(ds.train) == 3 and len(ds.skipped_tracklets) == 1
    assert ds.skipped_tracklets[0].reason == "no frames"


def test_mars_missing_frames_named_or_skipped_and_counted(tmp_path: Path) -> None:
    ddir = _small_mars(tmp_path)
    (ddir / "bbox_train" / "0003" / "0003C1T0001F002.jpg").unlink()
    (ddir / "bbox_train" / "0003" / "0003C3T0002F001.jpg").unlink()  # its only frame
    with pytest.raises(
        DatasetError,
        match=r"(?s)2 frame\(s\) missing.*train tracklet 2 \(pid 3.*0003C1T0001F002\.jpg: file not found",
    ):
        build_video_dataset("mars", tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 missing"):
        ds = build_video_dataset("mars", tmp_path, skip_corrupt=True)
    assert len(ds.skipped_frames) == 2 and len(ds.skipped_tracklets) == 1
    kept = next(r for r in ds.train if r.paths[0].endswith("0003C1T0001F001.jpg"))
    assert len(kept) == 3 and list(kept.extras["frame_numbers"]) == [1, 3, 4]
    assert "skipped 2 bad frame(s) and 1 tracklet(s)" in format_video_stats(ds)
    # min_seq_len drops short tracklets and says so
    with pytest.warns(UserWarning, match="skipped 2 missing"):
        ds = build_video_dataset("mars", tmp_path, skip_corrupt=True, min_seq_len=2)
    assert all(len(r) >= 2 for r in ds.train + ds.query + ds.gallery)
    assert "min_seq_len=2: dropped 1 gallery tracklet(s)" in ds.notes


# ----------------------------------------------------------------------------- iLIDS-VID
def write_ilids(root: Path, people: int = 6, frames: int = 4, splits: int = 10) -> Path:
    ddir = root / "ilids-vid"
    rng = np.random.default_rng(1)
    for cam in (1, 2):
        for p in range(1, people + 1):
            d = ddir / "i-LIDS-VID" / "sequences" / f"cam{cam}" / f"person{p:03d}"
            d.mkdir(parents=True)
            # written in a shuffled order: directory order is not temporal order
            nums = [1000, 99, 5, 317, 100][:frames]
            for n in rng.permutation(nums):
                (d / f"cam{cam}_person{p:03d}_{n:05d}.png"[:None]).write_bytes(FRAME_BYTES)
    split_dir = ddir / "train-test people splits"
    split_dir.mkdir(parents=True)
    ls_set = np.stack([rng.permutation(people) + 1 for _ in range(splits)])
    savemat(str(split_dir / "train_test_splits_ilidsvid.mat"), {"ls_set": ls_set.astype(float)})
    return ddir


def test_ilidsvid_splits_protocol_and_frame_order(tmp_path: Path) -> None:
    ddir = write_ilids(tmp_path)
    from scipy.io import loadmat

    ls_set = loadmat(str(ddir / "train-test people splits" / "train_test_splits_ilidsvid.mat"))[
        "ls_set"
    ]
    for split in (0, 7):
        ds = build_video_dataset("ilidsvid", tmp_path, split=split)
        test_people = sorted(int(i) for i in ls_set[split, :3])  # 1-based sorted-folder index
        assert sorted(r.pid for r in ds.query) == test_people
        assert sorted(r.pid for r in ds.gallery) == test_people
        assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
        assert len(ds.train) == 6 and ds.num_train_pids == 3
        assert ds.split_id == split and ds.num_splits == 10
        for r in ds.train + ds.query + ds.gallery:
            assert list(r.extras["frame_numbers"]) == [5, 99, 317, 1000]
            assert r.paths[0].endswith("_00005.png")
    assert num_splits("ilids-vid") == 10 and num_splits("mars") == 1
    assert "split 7 of 10" in format_video_stats(ds)
    with pytest.raises(DatasetError, match=r"split 10 out of range.*choose 0\.\.9"):
        build_video_dataset("ilidsvid", tmp_path, split=10)


def test_ilidsvid_bad_input(tmp_path: Path) -> None:
    ddir = write_ilids(tmp_path)
    split_file = ddir / "train-test people splits" / "train_test_splits_ilidsvid.mat"
    split_file.unlink()
    with pytest.raises(
        DatasetError,
        match=r"(?s)missing split file.*train_test_splits_ilidsvid\.mat.*Expected layout",
    ):
        build_video_dataset("ilidsvid", tmp_path)
    ddir = write_ilids(tmp_path / "b")
    person = ddir / "i-LIDS-VID" / "sequences" / "cam2" / "person002"
    for f in person.iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"(?s)1 empty tracklet.*person002"):
        build_video_dataset("ilidsvid", tmp_path / "b")
    ds = build_video_dataset("ilidsvid", tmp_path / "b", skip_corrupt=True)
    assert len(ds.skipped_tracklets) == 1
    (person / "cam2_person002_frame.png").write_bytes(FRAME_BYTES)
    with pytest.raises(
        DatasetError, match="do not match the expected pattern.*cam2_person002_frame"
    ):
        build_video_dataset("ilidsvid", tmp_path / "b")
    ddir = write_ilids(tmp_path / "c")
    (ddir / "i-LIDS-VID" / "sequences" / "cam2" / "person007").mkdir()
    with pytest.raises(DatasetError, match="same person folders.*person007"):
        build_video_dataset("ilidsvid", tmp_path / "c")


# ----------------------------------------------------------------------------- PRID2011
def write_prid(root: Path, people: int = 8) -> Path:
    ddir = root / "prid2011"
    for cam in "ab":
        for p in range(1, people + 1):
            d = ddir / "prid_2011" / "multi_shot" / f"cam_{cam}" / f"person_{p:04d}"
            d.mkdir(parents=True)
            for n in (12, 3, 7):
                (d / f"{n:04d}.png").write_bytes(FRAME_BYTES)
    dirs = [f"person_{p:04d}" for p in range(1, people + 1)]
    splits = []
    for s in range(10):
        r = random.Random(s).sample(dirs, len(dirs))
        splits.append({"train": r[: people // 2], "test": r[people // 2 :]})
    (ddir / "splits_prid2011.json").write_text(json.dumps(splits))
    return ddir


def test_prid2011_split_protocol_and_errors(tmp_path: Path) -> None:
    ddir = write_prid(tmp_path)
    splits = json.loads((ddir / "splits_prid2011.json").read_text())
    ds = build_video_dataset("prid", tmp_path, split=3)
    test_ids = sorted(int(d[-4:]) for d in splits[3]["test"])
    assert sorted(r.pid for r in ds.query) == test_ids == sorted(r.pid for r in ds.gallery)
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
    assert len(ds.train) == 8 and ds.num_splits == 10
    assert all(list(r.extras["frame_numbers"]) == [3, 7, 12] for r in ds.train)
    with pytest.raises(DatasetError, match="out of range"):
        build_video_dataset("prid2011", tmp_path, split=-1)
    (ddir / "splits_prid2011.json").write_text('{"train": []}')
    with pytest.raises(DatasetError, match="must be a non-empty list of splits"):
        build_video_dataset("prid2011", tmp_path)
    (ddir / "splits_prid2011.json").unlink()
    with pytest.raises(DatasetError, match=r"missing split file .*splits_prid2011\.json"):
        build_video_dataset("prid2011", tmp_path)
    ddir = write_prid(tmp_path / "b")
    s = json.loads((ddir / "splits_prid2011.json").read_text())
    s[0]["test"].append("person_0099")
    (ddir / "splits_prid2011.json").write_text(json.dumps(s))
    with pytest.raises(DatasetError, match="person_0099.*is not a folder"):
        build_video_dataset("prid2011", tmp_path / "b")


# ----------------------------------------------------------------------------- Duke video
def write_duke(root: Path) -> Path:
    ddir = root / "dukemtmc-vidreid" / "DukeMTMC-VideoReID"
    spec = {
        "train": [(1, "0001", 6, [2, 3, 10]), (1, "0002", 2, [1, 2]), (5, "0003", 1, [1, 2, 3])],
        "query": [(2, "0001", 3, [1, 2]), (7, "0001", 4, [5, 6])],
        "gallery": [(2, "0002", 5, [1, 2, 3]), (7, "0002", 8, [1]), (9, "0001", 1, [4, 5])],
    }
    for split, tracks in spec.items():
        for pid, tname, cam, frames in tracks:
            d = ddir / split / f"{pid:04d}" / tname
            d.mkdir(parents=True)
            for f in frames:
                old = pid == 5  # the old naming format 0005C1F0001X1234.jpg
                name = (
                    f"{pid:04d}C{cam}F{f:04d}X{1000 + f}.jpg"
                    if old
                    else f"{pid:04d}_C{cam}_F{f:04d}_X{1000 + f}.jpg"
                )
                (d / name).write_bytes(FRAME_BYTES)
    return ddir


def test_dukemtmc_video_tree(tmp_path: Path) -> None:
    ddir = write_duke(tmp_path)
    ds = build_video_dataset("dukemtmc-videoreid", tmp_path)
    stats = video_split_stats(ds)
    assert (stats["train"]["tracklets"], stats["train"]["ids"]) == (3, 2)
    assert (stats["query"]["tracklets"], stats["gallery"]["tracklets"]) == (2, 3)
    first = next(r for r in ds.train if r.paths[0].endswith("F0002_X1002.jpg"))
    # a tracklet starting at F0002 keeps all its frames, sorted numerically
    assert list(first.extras["frame_numbers"]) == [2, 3, 10] and first.camid == 5
    old = next(r for r in ds.train if "C1F" in r.paths[0])
    assert old.camid == 0 and len(old) == 3
    assert {(r.pid, r.camid) for r in ds.query} == {(2, 2), (7, 3)}
    # bad input: mixed cameras, non-numeric identity folder, empty tracklet
    (ddir / "gallery" / "0009" / "0001" / "0009_C2_F0009_X1.jpg").write_bytes(FRAME_BYTES)
    with pytest.raises(DatasetError, match="mixes cameras"):
        build_video_dataset("dukemtmc_video", tmp_path)
    (ddir / "gallery" / "0009" / "0001" / "0009_C2_F0009_X1.jpg").unlink()
    (ddir / "query" / "0002" / "0009").mkdir()
    with pytest.raises(DatasetError, match=r"(?s)1 empty tracklet.*query.*0002/0009"):
        build_video_dataset("dukemtmc_video", tmp_path)
    assert len(build_video_dataset("dukemtmc_video", tmp_path, skip_corrupt=True).query) == 2
    (ddir / "train" / "abc").mkdir()
    with pytest.raises(DatasetError, match="must be named by its pid"):
        build_video_dataset("dukemtmc_video", tmp_path)


# ----------------------------------------------------------------------------- registry
def test_registry_options_and_config(tmp_path: Path) -> None:
    opts = available_video_datasets()
    assert set(opts) == {"mars", "ilidsvid", "prid2011", "dukemtmc_video", "synth_video"}
    assert "split" in opts["ilidsvid"] and "preset" in opts["synth_video"]
    with pytest.raises(DatasetError, match="did you mean 'mars'"):
        build_video_dataset("marz", tmp_path)
    with pytest.raises(DatasetError, match=r"unknown option\(s\) \['split'\]"):
        build_video_dataset("mars", tmp_path, split=1)
    write_prid(tmp_path)

    class Cfg:
        dataset = "prid2011"
        root = str(tmp_path)
        video_split = 2
        skip_corrupt = False

    ds = video_dataset_from_config(Cfg())
    assert ds.split_id == 2
    with pytest.raises(DatasetError, match="Generate it with: reidkit synth --video"):
        build_video_dataset("synth_video", tmp_path, preset="tiny-video")


def test_tracklet_record_select_and_frame() -> None:
    r = TrackletRecord(
        ("a", "b", "c"),
        pid=3,
        camid=1,
        extras={
            "keypoints": np.arange(3 * 17 * 3, dtype=np.float32).reshape(3, 17, 3),
            "frame_numbers": np.array([4, 5, 9]),
            "truth": (None, "t_b", None),
            "note": "kept",
        },
    )
    s = r.select([2, 0])
    assert s.paths == ("c", "a") and s.pid == 3 and s.camid == 1
    assert list(s.extras["frame_numbers"]) == [9, 4] and s.extras["truth"] == (None, None)
    assert np.array_equal(s.extras["keypoints"][0], r.extras["keypoints"][2])
    assert s.extras["note"] == "kept" and len(s) == 2
    img = r.frame(1)
    assert img.path == "b" and img.pid == 3 and len(img.extras["keypoints"]) == 17


def test_datasets_cli_prints_the_tracklet_table(tmp_path: Path, capsys) -> None:
    from reidkit.cli import main

    write_prid(tmp_path)
    assert (
        main(
            [
                "datasets",
                "stats",
                "--name",
                "prid2011",
                "--root",
                str(tmp_path),
                "--option",
                "split=1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "# tracklets" in out and "split 1 of 10" in out
    assert main(["datasets", "list"]) == 0
    assert "mars" in capsys.readouterr().out


def test_image_registry_points_to_the_video_parsers(tmp_path: Path) -> None:
    from reidkit.data.datasets import build_dataset

    with pytest.raises(DatasetError, match="video .*dataset.*build_video_dataset"):
        build_dataset("mars", tmp_path)


def test_registry_names_and_the_image_video_redirect():
    from reidkit.data.datasets import build_dataset
    from reidkit.data.datasets.video import register_video_dataset

    with pytest.raises(DatasetError, match=r"'MARS' is a video \(tracklet\) dataset"):
        build_dataset("MARS", "/nowhere")
    with pytest.raises(DatasetError, match=r"unknown video dataset 'marz'; did you mean 'mars'"):
        build_video_dataset("marz", "/nowhere")
    with pytest.raises(ValueError, match="already registered"):
        register_video_dataset(" Mars ", lambda root, opts: None)
