"""DukeMTMC-VideoReID: 702 train ids / 2,196 tracklets, 702 query tracklets, 2,636
gallery tracklets (incl. 408 distractor ids), 8 cameras.

Layout (torchreid ``<root>/dukemtmc-vidreid/DukeMTMC-VideoReID``)::

    {train,query,gallery}/<pid>/<tracklet>/0001_C6_F0001_X30823.jpg

The camera and frame number come from the name (``<pid>_C<cam>_F<frame>_X<...>.jpg``, or
the old ``0001C6F0099X30823.jpg``). Frames are sorted by frame number; all of them are
kept (torchreid looks for F0001..F<count> and so loses the last frames of tracklets that
start at F0002).
"""

from __future__ import annotations

import os
import re

from reidkit.data.datasets.base import DatasetError, LoadOptions, find_dataset_dir, resolve_child
from reidkit.data.datasets.video.base import (
    ParsedVideoDataset,
    finalize_video_dataset,
    folder_tracklet,
    window_tracklets,
)
from reidkit.data.records import TrackletRecord

__all__ = ["load_dukemtmc_video"]

_FOLDERS = ("train", "query", "gallery")
_FRAME = re.compile(r"^(?P<pid>\d+)_?C(?P<cam>\d+)_?F(?P<frame>\d+)", re.IGNORECASE)
_EXPECTED = "'<pid>_C<cam>_F<frame>_X<n>.jpg, e.g. 0001_C6_F0001_X30823.jpg'"
_LAYOUT = "<dir>/{train,query,gallery}/<pid>/<tracklet>/0001_C6_F0001_X30823.jpg"


def load_dukemtmc_video(
    root: str | os.PathLike, opts: LoadOptions, min_seq_len: int = 0, dense_train: int = 0
) -> ParsedVideoDataset:
    """DukeMTMC-VideoReID (8 cameras).

    ``dense_train=L`` (> 0): cut every training tracklet into consecutive ``L``-frame
    tracklets, the last one running to the end (the TKP authors' ``train_dense`` with
    ``L = 32``; :func:`~reidkit.data.datasets.video.base.sliding_windows`).
    """
    if dense_train < 0:
        raise DatasetError(f"dukemtmc_video: dense_train must be >= 0, got {dense_train}")
    name = "dukemtmc_video"
    ddir = find_dataset_dir(
        root,
        [
            "dukemtmc-vidreid/DukeMTMC-VideoReID",
            "dukemtmc-vidreid",
            "DukeMTMC-VideoReID",
            "dukemtmc-videoreid",
            "",
        ],
        list(_FOLDERS),
        name,
        _LAYOUT,
    )
    splits: dict[str, list[TrackletRecord]] = {}
    sources: dict[str, str] = {}
    empty: dict[str, list[str]] = {s: [] for s in _FOLDERS}
    for split in _FOLDERS:
        folder = resolve_child(ddir, split)
        assert folder is not None  # find_dataset_dir checked it
        sources[split] = str(folder)
        records = []
        for pid_dir in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
            if not pid_dir.isdigit():
                raise DatasetError(
                    f"{name}: identity folder {folder / pid_dir} must be named by its pid "
                    f"(digits, e.g. 0001); expected layout {_LAYOUT}"
                )
            pid = int(pid_dir)
            tdirs = sorted(e.name for e in os.scandir(folder / pid_dir) if e.is_dir())
            for tdir in tdirs:
                path = folder / pid_dir / tdir
                rec = folder_tracklet(path, pid, -1, _FRAME, _EXPECTED, name, empty[split])
                if rec is None:
                    continue
                parsed = [_FRAME.match(os.path.basename(p)) for p in rec.paths]
                cams = {int(m.group("cam")) for m in parsed}  # type: ignore[union-attr]
                pids = {int(m.group("pid")) for m in parsed}  # type: ignore[union-attr]
                if len(cams) != 1 or pids != {pid}:
                    raise DatasetError(
                        f"{name}: tracklet {path} mixes cameras {sorted(cams)} or pids "
                        f"{sorted(pids)} (its folder says pid {pid}); one tracklet is one "
                        "person in one camera"
                    )
                cam = cams.pop()
                if not 1 <= cam <= 8:
                    raise DatasetError(f"{name}: tracklet {path}: camera C{cam} not in 1..8")
                records.append(TrackletRecord(rec.paths, pid, cam - 1, rec.extras))
        splits[split] = records
    notes = []
    if dense_train:
        dense = [w for r in splits["train"] for w in window_tracklets(r, dense_train, dense_train)]
        notes.append(
            f"dense_train={dense_train}: {len(dense)} training tracklets from "
            f"{len(splits['train'])}"
        )
        splits["train"] = dense
    return finalize_video_dataset(
        name, root, ddir, splits, opts, sources, notes=notes, empty=empty, min_seq_len=min_seq_len
    )
