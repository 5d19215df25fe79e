"""PRID2011 (multi-shot): 2 cameras, the 178 people of the splits file, 10 splits.

Layout (torchreid ``<root>/prid2011``)::

    prid_2011/multi_shot/cam_a/person_0001/0001.png
    prid_2011/multi_shot/cam_b/person_0001/0001.png
    splits_prid2011.json      [{"train": ["person_0001", ...], "test": [...]}, ... 10 splits]

Train: both cameras' sequences of the train people; query: camera A sequences of the test
people; gallery: camera B sequences. Frames are sorted by their number (peers use directory
order).
"""

from __future__ import annotations

import json
import os
import re

from reidkit.data.datasets.base import DatasetError, LoadOptions, find_dataset_dir, resolve_child
from reidkit.data.datasets.video.base import (
    ParsedVideoDataset,
    check_split_id,
    finalize_video_dataset,
    folder_tracklet,
)
from reidkit.data.records import TrackletRecord

__all__ = ["load_prid2011", "PRID_SPLIT_FILE"]

PRID_SPLIT_FILE = "splits_prid2011.json"
_SEQ = "prid_2011/multi_shot"
_PERSON = re.compile(r"^person_(\d+)$")
_FRAME = re.compile(r"^(?P<frame>\d+)\.(png|jpg|jpeg|bmp)$", re.IGNORECASE)
_EXPECTED = "'<frame number>.png, e.g. 0001.png'"
_LAYOUT = (
    f"<dir>/{_SEQ}/cam_{{a,b}}/person_NNNN/NNNN.png and <dir>/{PRID_SPLIT_FILE} "
    '(a list of {"train": [person dirs], "test": [person dirs]})'
)


def _read_splits(path, name: str) -> list[dict[str, list[str]]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{name}: cannot read {path}: {exc}") from exc
    ok = isinstance(data, list) and all(
        isinstance(s, dict)
        and all(
            isinstance(s.get(k), list) and all(isinstance(d, str) for d in s[k])
            for k in ("train", "test")
        )
        for s in data
    )
    if not ok or not data:
        raise DatasetError(
            f"{name}: {path} must be a non-empty list of splits "
            '{"train": ["person_0001", ...], "test": [...]}'
        )
    return data


def load_prid2011(
    root: str | os.PathLike, opts: LoadOptions, split: int = 0, min_seq_len: int = 0
) -> ParsedVideoDataset:
    """PRID2011, split ``split`` of 10 (89 train / 89 test people: 178 train tracklets,
    89 query (camera A) and 89 gallery (camera B) tracklets)."""
    name = "prid2011"
    ddir = find_dataset_dir(
        root,
        ["prid2011", "prid_2011", "PRID2011", ""],
        [f"{_SEQ}/cam_a", f"{_SEQ}/cam_b"],
        name,
        _LAYOUT,
    )
    split_path = resolve_child(ddir, PRID_SPLIT_FILE)
    if split_path is None or not split_path.is_file():
        raise DatasetError(
            f"{name}: missing split file {ddir / PRID_SPLIT_FILE}.\nExpected layout: {_LAYOUT}"
        )
    splits_def = _read_splits(split_path, name)
    split_id = check_split_id(name, split, len(splits_def), str(split_path))
    chosen = splits_def[split_id]
    cam_dirs = [resolve_child(ddir, f"{_SEQ}/cam_{c}") for c in "ab"]
    overlap = set(chosen["train"]) & set(chosen["test"])
    if overlap:
        raise DatasetError(
            f"{name}: {split_path}: split {split_id} has people in both train and test: "
            f"{sorted(overlap)[:5]}"
        )
    for d in chosen["train"] + chosen["test"]:
        if not _PERSON.match(d):
            raise DatasetError(
                f"{name}: {split_path}: split {split_id} names {d!r}; expected person_NNNN"
            )
        for cam_dir in cam_dirs:
            assert cam_dir is not None  # find_dataset_dir checked it
            if not (cam_dir / d).is_dir():
                raise DatasetError(
                    f"{name}: {split_path} lists {d} but {cam_dir / d} is not a folder"
                )
    empty: dict[str, list[str]] = {"train": [], "query": [], "gallery": []}

    def tracklets(dirs: list[str], cams: tuple[int, ...], split_name: str) -> list[TrackletRecord]:
        out = []
        for d in sorted(dirs):
            pid = int(_PERSON.match(d).group(1))  # type: ignore[union-attr]
            for c in cams:
                folder = cam_dirs[c] / d  # type: ignore[operator]
                rec = folder_tracklet(folder, pid, c, _FRAME, _EXPECTED, name, empty[split_name])
                if rec is not None:
                    out.append(rec)
        return out

    splits = {
        "train": tracklets(chosen["train"], (0, 1), "train"),
        "query": tracklets(chosen["test"], (0,), "query"),
        "gallery": tracklets(chosen["test"], (1,), "gallery"),
    }
    sources = {s: f"{split_path} (split {split_id})" for s in splits}
    return finalize_video_dataset(
        name,
        root,
        ddir,
        splits,
        opts,
        sources,
        empty=empty,
        min_seq_len=min_seq_len,
        split_id=split_id,
        num_splits=len(splits_def),
    )
