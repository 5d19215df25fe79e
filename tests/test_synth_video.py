"""Tests of the synthetic video set (``reidkit synth --video``, reidkit.data.synth.video)
and of reading it back with the MARS / synth_video parsers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from reidkit.cli import main
from reidkit.data.datasets.video import build_video_dataset, video_split_stats
from reidkit.data.synth import VIDEO_PRESETS, VideoPreset, generate_video, mars_frame_name

TINY = VIDEO_PRESETS["tiny-video"]
NAME_RE = re.compile(r"^(\d{4}|00-1)C([1-6])T(\d{4})F(\d{3})\.jpg$")
H, W = 128, 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    """tiny-video through the CLI with 2 worker processes; returns (root, printed output)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("video") / "synth-tiny-video"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "synth",
                "--video",
                "--preset",
                "tiny-video",
                "--out",
                str(out),
                "--workers",
                "2",
                "--no-progress",
                "--preview",
            ]
        )
    assert rc == 0
    return out, buf.getvalue()


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "preview.png"
    }


def _printed_counts(text: str) -> dict[str, tuple[int, int, int]]:
    counts = {}
    for split in ("train", "query", "gallery"):
        m = re.search(rf"^\s+{split}\s+(\d+)\s+(\d+)\s+(\d+)", text, re.M)
        assert m, text
        counts[split] = tuple(int(g) for g in m.groups())
    return counts


def test_mars_parser_reads_back_the_printed_counts(tiny) -> None:
    root, printed = tiny
    counts = _printed_counts(printed)
    for ds in (
        build_video_dataset("mars", root),
        build_video_dataset("synth_video", root.parent, preset="tiny-video"),
    ):
        stats = video_split_stats(ds)
        for split, (tracklets, ids, frames) in counts.items():
            assert (stats[split]["tracklets"], stats[split]["ids"], stats[split]["frames"]) == (
                tracklets,
                ids,
                frames,
            ), split
        assert ds.num_train_pids == TINY.num_train_ids
        assert sorted({r.pid for r in ds.train}) == list(range(TINY.num_train_ids))
        assert sum(r.pid == 0 for r in ds.gallery) == TINY.num_distractor_tracklets
        assert all(r.pid != -1 for r in ds.query + ds.gallery)  # junk dropped
        for r in ds.train + ds.query + ds.gallery:
            assert TINY.min_frames <= len(r) <= TINY.max_frames
            numbers = r.extras["frame_numbers"]
            assert list(numbers) == list(range(1, len(r) + 1))
            assert r.extras["keypoints"].shape == (len(r), 17, 3)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"]["train"]["tracklets"] == counts["train"][0]
    # one query tracklet for the test id seen by one camera only: no cross-camera match
    lonely = meta["counts"]["queries_without_cross_camera_match"]
    assert lonely == TINY.num_single_camera_test_ids
    assert any("no cross-camera match" in n for n in ds.notes)


def test_mars_layout_and_info_files(tiny) -> None:
    root, _ = tiny
    info = root / "info"
    train_names = (info / "train_name.txt").read_text().split()
    test_names = (info / "test_name.txt").read_text().split()
    train = loadmat(str(info / "tracks_train_info.mat"))["track_train_info"]
    test = loadmat(str(info / "tracks_test_info.mat"))["track_test_info"]
    query = loadmat(str(info / "query_IDX.mat"))["query_IDX"].ravel()
    assert train.shape[1] == 4 and test.shape[1] == 4
    for names, table, folder in (
        (train_names, train, "bbox_train"),
        (test_names, test, "bbox_test"),
    ):
        assert table[0, 0] == 1 and table[-1, 1] == len(names)
        assert np.all(table[1:, 0] == table[:-1, 1] + 1)  # contiguous, 1-based, inclusive
        for start, end, pid, cam in table:
            frames = names[start - 1 : end]
            assert 1 <= cam <= 6
            for f in frames:
                m = NAME_RE.match(f)
                assert m, f
                assert (-1 if m.group(1) == "00-1" else int(m.group(1))) == pid
                assert int(m.group(2)) == cam
                assert (root / folder / f[:4] / f).is_file()
    assert query.min() >= 1 and query.max() <= len(test) and len(set(query)) == len(query)
    assert (test[:, 2] == -1).sum() == TINY.num_junk_tracklets
    assert not np.any(test[query - 1, 2] <= 0)  # queries are real identities
    with Image.open(root / "bbox_train" / train_names[0][:4] / train_names[0]) as im:
        assert im.format == "JPEG" and im.size == (W, H)
    assert mars_frame_name(-1, 2, 7, 12) == "00-1C2T0007F012.jpg"


def test_ground_truth_for_every_occluded_frame(tiny) -> None:
    root, printed = tiny
    occ = json.loads((root / "occlusion.json").read_text())
    frames = occ["frames"]
    assert frames, "no occluded frame"
    truth = {p.stem for p in (root / "truth").glob("*.png")}
    masks = {p.stem for p in (root / "masks").glob("*.png")}
    stems = {name[:-4] for name in frames}
    assert truth == stems and masks == stems
    kinds = {r["kind"] for r in occ["tracklets"]}
    assert kinds <= {"pole", "pedestrian", "car", "bag"} and len(kinds) >= 3
    assert f"{len(frames)} frames with truth/" in printed
    kp_all = {}
    for folder in ("bbox_train", "bbox_test"):
        kp_all.update(json.loads((root / "keypoints" / f"{folder}.json").read_text()))
    inside_diff, outside_diff = [], []
    for name, entry in sorted(frames.items())[:40]:
        folder = (
            "bbox_train"
            if any(
                r["first_frame"] == entry["tracklet"] and r["split"] == "train"
                for r in occ["tracklets"]
            )
            else "bbox_test"
        )
        with Image.open(root / folder / name[:4] / name) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.float64)
        with Image.open(root / "truth" / f"{name[:-4]}.png") as im:
            assert im.mode == "RGB" and im.size == (W, H)
            clean = np.asarray(im, dtype=np.float64)
        with Image.open(root / "masks" / f"{name[:-4]}.png") as im:
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).any()
        assert abs(entry["area"] - (mask > 0).mean()) < 1e-3
        m = mask > 0
        # away from the mask border (blur), the two renders differ only by JPEG coding
        grown = m.copy()
        for axis in (0, 1):
            for shift in (-2, -1, 1, 2):
                grown |= np.roll(m, shift, axis=axis)
        diff = np.abs(img - clean).mean(axis=2)
        outside_diff.append(diff[~grown].mean())
        inside_diff.append(diff[m].mean())
        # a keypoint under the occluder is marked hidden (v=1), never visible (v=2)
        for x, y, v in kp_all[name]:
            if v > 0 and m[min(int(y), H - 1), min(int(x), W - 1)] and _solid(m, x, y):
                assert v == 1, (name, x, y, v)
    assert np.mean(outside_diff) < 6.0  # JPEG noise only
    assert np.mean(inside_diff) > 4 * np.mean(outside_diff)


def _solid(mask: np.ndarray, x: float, y: float) -> bool:
    """The 3x3 neighbourhood of (x, y) is all occluder (the keypoint is well inside it)."""
    xi, yi = int(x), int(y)
    patch = mask[max(0, yi - 1) : yi + 2, max(0, xi - 1) : xi + 2]
    return patch.size == 9 and bool(patch.all())


def test_motion_is_continuous(tiny) -> None:
    """Consecutive frames of a tracklet have nearby keypoints (continuous pose and
    position); frames of different tracklets do not."""
    root, _ = tiny
    ds = build_video_dataset("synth_video", root)
    steps, jumps = [], []
    others = [r.extras["keypoints"][0] for r in ds.train]
    for r in ds.train:
        kp = r.extras["keypoints"]
        vis = kp[:, :, 2] > 0
        for t in range(len(r) - 1):
            both = vis[t] & vis[t + 1]
            if both.sum() >= 8:
                steps.append(
                    np.median(np.linalg.norm(kp[t + 1, both, :2] - kp[t, both, :2], axis=1))
                )
    for a, b in zip(others, others[1:]):
        both = (a[:, 2] > 0) & (b[:, 2] > 0)
        if both.sum() >= 8:
            jumps.append(np.median(np.linalg.norm(a[both, :2] - b[both, :2], axis=1)))
    assert np.median(steps) < 3.0  # pixels at 128 x 64
    assert np.median(jumps) > 2 * np.median(steps)


def test_synth_video_records_carry_occlusion_truth(tiny) -> None:
    root, _ = tiny
    ds = build_video_dataset("synth_video", root)
    occ = json.loads((root / "occlusion.json").read_text())["frames"]
    seen = 0
    for r in ds.train + ds.query + ds.gallery:
        flags = r.extras["occluded"]
        assert flags.dtype == bool and len(flags) == len(r)
        for path, o, t, m in zip(r.paths, flags, r.extras["truth"], r.extras["masks"]):
            assert o == (Path(path).name in occ)
            assert (t is None) == (not o) and (m is None) == (not o)
            if o:
                assert Path(t).is_file() and Path(m).is_file()
                seen += 1
    junk = sum(1 for k in occ.values() if k["tracklet"].startswith("00-1"))
    assert junk == 0  # junk tracklets are never occluded
    assert seen == len(occ)
    # the frame of a tracklet as an image record (I2V query), with its keypoints
    first = ds.query[0].frame(0)
    assert first.path == ds.query[0].paths[0] and len(first.extras["keypoints"]) == 17


def test_deterministic_across_workers_and_seeds(tiny, tmp_path: Path) -> None:
    root, _ = tiny
    again = tmp_path / "again"
    generate_video(again, "tiny-video", seed=0, workers=1, progress=False)
    a, b = _tree_bytes(root), _tree_bytes(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    micro = VideoPreset("micro", 2, 2, min_frames=4, max_frames=5, occluded_share=0.5)
    other = generate_video(tmp_path / "o", micro, seed=1, workers=1, progress=False)
    assert other["counts"]["train"]["tracklets"] >= 4
    c = _tree_bytes(tmp_path / "o")
    assert not {v for k, v in a.items() if k.endswith(".jpg")} & {
        v for k, v in c.items() if k.endswith(".jpg")
    }


def test_preview_refusals_and_preset_checks(tiny, tmp_path: Path, capsys) -> None:
    root, _ = tiny
    with Image.open(root / "preview.png") as im:
        assert im.width > 4 * W and im.height > 2 * H
    (root / "preview.png").unlink()
    assert main(["synth", "--preview-only", str(root)]) == 0
    assert (root / "preview.png").is_file()
    # refuses to overwrite; an image preset with --video is an error
    assert main(["synth", "--video", "--preset", "tiny-video", "--out", str(root)]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert main(["synth", "--video", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "video preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cams_per_id"):
        VideoPreset("bad", 2, 2, cams_per_id=(1, 2)).validate()
    with pytest.raises(ValueError, match="test_tracklets_per_cam"):
        VideoPreset("bad", 2, 2, test_tracklets_per_cam=(1, 2)).validate()
    with pytest.raises(ValueError, match="unknown synth video preset"):
        generate_video(tmp_path / "y", "huge-video")
    for p in VIDEO_PRESETS.values():
        p.validate()
