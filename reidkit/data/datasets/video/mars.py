"""MARS and the synthetic video set (written in the MARS layout by ``reidkit synth --video``).

Layout (inside the dataset folder)::

    bbox_train/0001/0001C1T0001F001.jpg     frames, in a folder named by their first 4 chars
    bbox_test/00-1/00-1C1T0001F001.jpg      (00-1: junk; 0000: distractors)
    info/train_name.txt, info/test_name.txt one frame name per line
    info/tracks_train_info.mat              track_train_info (N x 4): [start, end, pid, cam]
    info/tracks_test_info.mat               track_test_info: rows 1-based into the name list
    info/query_IDX.mat                      query_IDX: 1-based rows of track_test_info
    keypoints/bbox_{train,test}.json        optional COCO-17 keypoints per frame name

Query = the ``query_IDX`` rows of the test tracks, gallery = the other test rows. Junk
tracklets (pid -1) are dropped everywhere, distractors (pid 0) stay in the gallery. Frames
of a tracklet are ordered by their frame number ``F###`` (the name list is already in that
order in MARS; it is checked, not trusted).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from reidkit.data.datasets.base import (
    DatasetError,
    LoadOptions,
    find_dataset_dir,
    load_keypoints,
    resolve_child,
)
from reidkit.data.datasets.video.base import (
    ParsedVideoDataset,
    finalize_video_dataset,
    frame_numbers_array,
    order_frames,
)
from reidkit.data.records import TrackletRecord

__all__ = ["MARS_INFO_FILES", "parse_mars_layout", "load_mars", "load_synth_video"]

#: file name -> the variable inside it
MARS_INFO_FILES: dict[str, str] = {
    "tracks_train_info.mat": "track_train_info",
    "tracks_test_info.mat": "track_test_info",
    "query_IDX.mat": "query_IDX",
}
_MARS_NAME = re.compile(r"^(?P<pid>\d{4}|00-1)C(?P<cam>\d)T(?P<track>\d{4})F(?P<frame>\d{3,})\.")
_MARS_EXPECTED = (
    "'<pid 4 digits or 00-1>C<cam>T<tracklet 4 digits>F<frame>.jpg, e.g. 0001C1T0001F001.jpg'"
)
_MARS_LAYOUT = (
    "<dir>/{bbox_train,bbox_test}/<first 4 chars of the name>/0001C1T0001F001.jpg and "
    "<dir>/info/{train_name.txt,test_name.txt,tracks_train_info.mat,tracks_test_info.mat,"
    "query_IDX.mat}"
)


def _read_names(path: Path, dataset: str) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot read {path}: {exc}") from exc


def _read_mat(path: Path, key: str, dataset: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        data = loadmat(str(path))
    except Exception as exc:  # scipy raises several types on bad files
        raise DatasetError(f"{dataset}: cannot read {path} as a MATLAB file: {exc}") from exc
    if key not in data:
        found = sorted(k for k in data if not k.startswith("__"))
        raise DatasetError(f"{dataset}: {path} has no variable {key!r} (found {found})")
    arr = np.asarray(data[key])
    if arr.size and not np.all(np.isfinite(arr.astype(np.float64))):
        raise DatasetError(f"{dataset}: {path}: {key} holds non-finite values")
    if arr.size and not np.all(arr.astype(np.float64) == np.round(arr.astype(np.float64))):
        raise DatasetError(f"{dataset}: {path}: {key} must hold integers")
    return arr.astype(np.int64)


def _tracklets_from_rows(
    name: str,
    rows: np.ndarray,
    row_ids: list[int],
    names: list[str],
    frame_dir: Path,
    table_path: Path,
    names_path: Path,
    num_cams: int | None,
    keypoints: dict[str, Any] | None,
    empty: list[str],
) -> list[TrackletRecord]:
    """Tracklets of the given rows (0-based) of a MARS track table; junk rows dropped."""
    records: list[TrackletRecord] = []
    base = str(frame_dir)
    for r in row_ids:
        start, end, pid, cam = (int(v) for v in rows[r])
        where = f"row {r + 1} of {table_path.name} [start={start}, end={end}, pid={pid}, cam={cam}]"
        if pid == -1:  # junk tracklets are not part of the protocol
            continue
        if num_cams is not None and not 1 <= cam <= num_cams:
            raise DatasetError(f"{name}: {where}: camera must be in 1..{num_cams}")
        if cam < 1:
            raise DatasetError(f"{name}: {where}: camera must be >= 1")
        if start > end:
            empty.append(where)
            continue
        if start < 1 or end > len(names):
            raise DatasetError(
                f"{name}: {where}: start/end must index 1..{len(names)} (the lines of {names_path})"
            )
        frames = names[start - 1 : end]
        order, numbers = order_frames(frames, _MARS_NAME, _MARS_EXPECTED, name, where)
        frames = [frames[i] for i in order]
        prefix = "00-1" if pid < 0 else f"{pid:04d}"
        wrong = [f for f in frames if not (f[:4] == prefix and f[5:6] == str(cam))]
        if wrong:
            raise DatasetError(
                f"{name}: {where}: frame names must start with pid {prefix} and camera "
                f"C{cam}; found {wrong[:3]}"
            )
        extras: dict[str, Any] = {"frame_numbers": frame_numbers_array(numbers)}
        if keypoints:
            rows_kp = [keypoints.get(f) for f in frames]
            if all(k is not None for k in rows_kp):
                extras["keypoints"] = np.asarray(rows_kp, dtype=np.float32)
        paths = tuple(os.path.join(base, f[:4], f) for f in frames)
        records.append(TrackletRecord(paths=paths, pid=pid, camid=cam - 1, extras=extras))
    return records


def parse_mars_layout(
    name: str, ddir: Path, num_cams: int | None = 6, keypoints: bool = True
) -> tuple[dict[str, list[TrackletRecord]], dict[str, list[str]], dict[str, str]]:
    """Read the MARS tracks of ``ddir``: ``(splits, empty tracklets, sources)``, frames in
    temporal order, pids as in the info files, junk dropped; the caller finalises with
    :func:`finalize_video_dataset` (see :func:`load_mars`).

    Args:
        name: dataset name for errors.
        ddir: the dataset folder (holding ``info``, ``bbox_train``, ``bbox_test``).
        num_cams: valid cameras are ``1..num_cams`` (None: any >= 1).
        keypoints: attach ``extras["keypoints"]`` from ``keypoints/bbox_*.json`` when every
            frame of a tracklet has an entry.
    """
    info = ddir / "info"
    missing = [
        str(info / f)
        for f in ("train_name.txt", "test_name.txt", *MARS_INFO_FILES)
        if not (info / f).is_file()
    ]
    if missing:
        raise DatasetError(
            f"{name}: missing info file(s) {', '.join(missing)}.\nExpected layout: {_MARS_LAYOUT}"
        )
    kp_tables: dict[str, dict[str, Any]] = {}
    if keypoints:
        for folder in ("bbox_train", "bbox_test"):
            kp_file = ddir / "keypoints" / f"{folder}.json"
            kp_tables[folder] = load_keypoints(kp_file, name) if kp_file.is_file() else {}
    splits: dict[str, list[TrackletRecord]] = {}
    empty: dict[str, list[str]] = {"train": [], "query": [], "gallery": []}
    sources: dict[str, str] = {}
    for part, folder in (("train", "bbox_train"), ("test", "bbox_test")):
        names_path = info / f"{part}_name.txt"
        table_path = info / f"tracks_{part}_info.mat"
        names = _read_names(names_path, name)
        rows = _read_mat(table_path, f"track_{part}_info", name)
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise DatasetError(
                f"{name}: {table_path}: track_{part}_info must be N x 4 rows "
                f"[start, end, pid, cam]; got shape {rows.shape}"
            )
        frame_dir = resolve_child(ddir, folder)
        if frame_dir is None or not frame_dir.is_dir():
            raise DatasetError(
                f"{name}: missing folder {ddir / folder}.\nExpected layout: {_MARS_LAYOUT}"
            )
        kp = kp_tables.get(folder) or None
        if part == "train":
            splits["train"] = _tracklets_from_rows(
                name,
                rows,
                list(range(len(rows))),
                names,
                frame_dir,
                table_path,
                names_path,
                num_cams,
                kp,
                empty["train"],
            )
            sources["train"] = str(table_path)
            continue
        q_path = info / "query_IDX.mat"
        query_idx = _read_mat(q_path, "query_IDX", name).ravel()
        bad = [int(i) for i in query_idx if not 1 <= i <= len(rows)]
        if bad:
            raise DatasetError(
                f"{name}: {q_path}: query_IDX must hold 1-based rows of track_test_info "
                f"(1..{len(rows)}); found {bad[:5]}"
            )
        if len(set(query_idx.tolist())) != len(query_idx):
            raise DatasetError(f"{name}: {q_path}: query_IDX lists a row more than once")
        query_rows = sorted(int(i) - 1 for i in query_idx)
        qset = set(query_rows)
        gallery_rows = [i for i in range(len(rows)) if i not in qset]
        for split, row_ids in (("query", query_rows), ("gallery", gallery_rows)):
            splits[split] = _tracklets_from_rows(
                name,
                rows,
                row_ids,
                names,
                frame_dir,
                table_path,
                names_path,
                num_cams,
                kp,
                empty[split],
            )
            sources[split] = f"{table_path} + {q_path}"
    return splits, empty, sources


def load_mars(
    root: str | os.PathLike, opts: LoadOptions, min_seq_len: int = 0
) -> ParsedVideoDataset:
    """MARS (625 train ids / 8,298 tracklets; 1,980 query tracklets; 9,330 gallery
    tracklets after junk removal; 6 cameras). Accepts torchreid (``<root>/mars``) and TKP
    (``<root>/MARS``) roots. ``min_seq_len`` drops shorter tracklets (torchreid's option)."""
    ddir = find_dataset_dir(
        root,
        ["mars", "MARS", "Mars", ""],
        ["info", "bbox_train", "bbox_test"],
        "mars",
        _MARS_LAYOUT,
    )
    splits, empty, sources = parse_mars_layout("mars", ddir, 6)
    return finalize_video_dataset(
        "mars", root, ddir, splits, opts, sources, empty=empty, min_seq_len=min_seq_len
    )


def load_synth_video(
    root: str | os.PathLike, opts: LoadOptions, preset: str = "small-video", min_seq_len: int = 0
) -> ParsedVideoDataset:
    """The synthetic video set written by ``reidkit synth --video --preset PRESET --out
    <root>/synth-PRESET`` (MARS layout). Besides ``keypoints`` (T, 17, 3) per tracklet, its
    records carry ``occluded`` (T,) bool and ``truth`` / ``masks`` (per frame: the path of
    the frame without the occluder and of the occluder mask, ``None`` when not occluded)."""
    folder = f"synth-{preset}"
    candidates = [folder]
    if Path(root).name == folder or (Path(root) / "occlusion.json").is_file():
        candidates.append("")
    try:
        ddir = find_dataset_dir(
            root,
            candidates,
            ["info", "bbox_train", "bbox_test"],
            "synth_video",
            f"<root>/{folder}/" + _MARS_LAYOUT.removeprefix("<dir>/"),
        )
    except DatasetError as exc:
        raise DatasetError(
            f"{exc}\nGenerate it with: reidkit synth --video --preset {preset} "
            f"--out {Path(root) / folder}"
        ) from None
    splits, empty, sources = parse_mars_layout("synth_video", ddir, None)
    occ_path = ddir / "occlusion.json"
    occluded_frames: dict[str, Any] = {}
    if occ_path.is_file():
        try:
            occluded_frames = json.loads(occ_path.read_text())["frames"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"synth_video: cannot read {occ_path} (expected {{'frames': {{name: ...}}}}): {exc}"
            ) from exc
    truth_dir, mask_dir = str(ddir / "truth"), str(ddir / "masks")
    for split in ("train", "query", "gallery"):
        out = []
        for r in splits[split]:
            stems = [os.path.basename(p).rsplit(".", 1)[0] for p in r.paths]
            occ = np.asarray([s + ".jpg" in occluded_frames for s in stems], dtype=bool)
            extras = dict(r.extras)
            extras["occluded"] = occ
            extras["truth"] = tuple(
                os.path.join(truth_dir, s + ".png") if o else None for s, o in zip(stems, occ)
            )
            extras["masks"] = tuple(
                os.path.join(mask_dir, s + ".png") if o else None for s, o in zip(stems, occ)
            )
            out.append(TrackletRecord(r.paths, r.pid, r.camid, extras))
        splits[split] = out
    notes = []
    n_occ = sum(bool(r.extras["occluded"].any()) for s in splits.values() for r in s)
    if occluded_frames:
        notes.append(
            f"{n_occ} tracklet(s) with occluded frames ({len(occluded_frames)} frames; ground "
            "truth in truth/ and masks/)"
        )
    return finalize_video_dataset(
        "synth_video",
        root,
        ddir,
        splits,
        opts,
        sources,
        notes,
        empty=empty,
        min_seq_len=min_seq_len,
    )
