"""iLIDS-VID: 300 people, one sequence per camera (2 cameras), 10 train/test splits.

Layout (torchreid ``<root>/ilids-vid``, TKP ``<root>/iLIDS-VID``)::

    i-LIDS-VID/sequences/cam1/person001/cam1_person001_00317.png
    i-LIDS-VID/sequences/cam2/person001/cam2_person001_00433.png
    train-test people splits/train_test_splits_ilidsvid.mat     ls_set: 10 x 300

Row ``s`` of ``ls_set`` is split ``s``: 1-based indices into the person folders sorted by
name; its first half are the test people, the second half the train people (Wang et al.,
ECCV 2014). Train: both cameras' sequences; query: camera 1 sequences of the test people;
gallery: camera 2 sequences. Frames are sorted by the number at the end of the name (peers
use directory order, which differs between machines).
"""

from __future__ import annotations

import os
import re

from reidkit.data.datasets.base import DatasetError, LoadOptions, find_dataset_dir, resolve_child
from reidkit.data.datasets.video.base import (
    ParsedVideoDataset,
    check_split_id,
    finalize_video_dataset,
    folder_tracklet,
    window_tracklets,
)
from reidkit.data.datasets.video.mars import _read_mat
from reidkit.data.records import TrackletRecord

__all__ = ["load_ilidsvid", "ILIDS_SPLIT_FILE"]

ILIDS_SPLIT_FILE = "train-test people splits/train_test_splits_ilidsvid.mat"
_SEQ = "i-LIDS-VID/sequences"
_PERSON = re.compile(r"^person(\d+)$")
_FRAME = re.compile(r"^.*?(?P<frame>\d+)\.(png|jpg|jpeg|bmp)$", re.IGNORECASE)
_EXPECTED = "'cam<c>_person<NNN>_<frame number>.png, e.g. cam1_person001_00317.png'"
_LAYOUT = f"<dir>/{_SEQ}/cam{{1,2}}/personNNN/cam1_personNNN_NNNNN.png and <dir>/{ILIDS_SPLIT_FILE}"


#: the TKP authors' image-to-video training split: camera-2 windows of 8 frames, step 4
TKP_WINDOW, TKP_STEP = 8, 4


def load_ilidsvid(
    root: str | os.PathLike,
    opts: LoadOptions,
    split: int = 0,
    min_seq_len: int = 0,
    tkp_train: bool = False,
) -> ParsedVideoDataset:
    """iLIDS-VID, split ``split`` of 10 (150 train / 150 test people; 300 train
    tracklets, 150 query (camera 1) and 150 gallery (camera 2) tracklets).

    ``tkp_train``: the TKP authors' image-to-video training split: each camera-1 sequence
    gives a one-image training tracklet (its first frame), each camera-2 sequence
    overlapping 8-frame windows with step 4 (the last window runs to the end; see
    :func:`~reidkit.data.datasets.video.base.sliding_windows`). Query and gallery are
    unchanged (the image query of I2V is the first frame of the camera-1 sequence).
    """
    name = "ilidsvid"
    ddir = find_dataset_dir(
        root,
        ["ilids-vid", "iLIDS-VID", "i-LIDS-VID", ""],
        [f"{_SEQ}/cam1", f"{_SEQ}/cam2"],
        name,
        _LAYOUT,
    )
    split_path = resolve_child(ddir, ILIDS_SPLIT_FILE)
    if split_path is None or not split_path.is_file():
        raise DatasetError(
            f"{name}: missing split file {ddir / ILIDS_SPLIT_FILE}.\nExpected layout: {_LAYOUT}"
        )
    ls_set = _read_mat(split_path, "ls_set", name)
    cam_dirs = [resolve_child(ddir, f"{_SEQ}/cam{c}") for c in (1, 2)]
    people: list[list[str]] = []
    for cam_dir in cam_dirs:
        assert cam_dir is not None  # find_dataset_dir checked it
        people.append(sorted(e.name for e in os.scandir(cam_dir) if e.is_dir()))
    bad = [p for p in people[0] + people[1] if not _PERSON.match(p)]
    if bad:
        raise DatasetError(
            f"{name}: person folders must be named person<NNN>; found {sorted(set(bad))[:5]} "
            f"in {cam_dirs[0]} / {cam_dirs[1]}"
        )
    if people[0] != people[1]:
        only = sorted(set(people[0]) ^ set(people[1]))
        raise DatasetError(
            f"{name}: cam1 and cam2 must hold the same person folders; these are in one "
            f"camera only: {only[:5]}"
        )
    persons = people[0]
    if ls_set.ndim != 2 or ls_set.shape[1] != len(persons) or len(persons) % 2:
        raise DatasetError(
            f"{name}: {split_path}: ls_set must be (splits x {len(persons)}) for the "
            f"{len(persons)} person folders (an even number); got shape {ls_set.shape}"
        )
    split_id = check_split_id(name, split, ls_set.shape[0], str(split_path))
    row = ls_set[split_id]
    if sorted(row.tolist()) != list(range(1, len(persons) + 1)):
        raise DatasetError(
            f"{name}: {split_path}: row {split_id} of ls_set must be a permutation of "
            f"1..{len(persons)} (1-based indices of the sorted person folders)"
        )
    half = len(persons) // 2
    test = sorted(persons[int(i) - 1] for i in row[:half])
    train = sorted(persons[int(i) - 1] for i in row[half:])

    empty: dict[str, list[str]] = {"train": [], "query": [], "gallery": []}

    def tracklets(dirs: list[str], cams: tuple[int, ...], split_name: str) -> list[TrackletRecord]:
        out = []
        for d in dirs:
            pid = int(_PERSON.match(d).group(1))  # type: ignore[union-attr]
            for c in cams:
                folder = cam_dirs[c] / d  # type: ignore[operator]
                rec = folder_tracklet(folder, pid, c, _FRAME, _EXPECTED, name, empty[split_name])
                if rec is not None:
                    out.append(rec)
        return out

    train_records = tracklets(train, (0, 1), "train")
    notes = []
    if tkp_train:
        cut: list[TrackletRecord] = []
        for r in train_records:
            if r.camid == 0:
                cut.append(r.select([0]))
            else:
                cut.extend(window_tracklets(r, TKP_WINDOW, TKP_STEP))
        notes.append(
            f"tkp_train: {len(cut)} training tracklets (camera 1: first frame only; camera 2: "
            f"{TKP_WINDOW}-frame windows with step {TKP_STEP}), from {len(train_records)} "
            "sequences"
        )
        train_records = cut
    splits = {
        "train": train_records,
        "query": tracklets(test, (0,), "query"),
        "gallery": tracklets(test, (1,), "gallery"),
    }
    sources = {s: f"{split_path} (split {split_id})" for s in splits}
    return finalize_video_dataset(
        name,
        root,
        ddir,
        splits,
        opts,
        sources,
        notes=notes,
        empty=empty,
        min_seq_len=min_seq_len,
        split_id=split_id,
        num_splits=int(ls_set.shape[0]),
    )
