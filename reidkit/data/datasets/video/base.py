"""Shared machinery of the tracklet (video) parsers: the parsed dataset, frame-number
parsing and ordering, frame checks with skip-and-count, train relabelling, statistics."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from reidkit.data.datasets.base import DatasetError, LoadOptions
from reidkit.data.images import BadImage, find_bad_images, is_image_file
from reidkit.data.records import TrackletRecord, VideoReIDDataset

__all__ = [
    "ParsedVideoDataset",
    "SkippedTracklet",
    "VIDEO_SPLITS",
    "order_frames",
    "list_frames",
    "finalize_video_dataset",
    "sliding_windows",
    "window_tracklets",
    "video_split_stats",
    "format_video_stats",
]

VIDEO_SPLITS = ("train", "query", "gallery")
_MAX_LISTED = 5


@dataclass(frozen=True)
class SkippedTracklet:
    """A tracklet dropped while parsing (``skip_corrupt``): where it was and why."""

    split: str
    where: str
    reason: str


@dataclass
class ParsedVideoDataset(VideoReIDDataset):
    """A :class:`VideoReIDDataset` plus what the parser noticed while building it.

    Attributes:
        skipped_frames: frames dropped because they were missing / empty / corrupt
            (``skip_corrupt``); their tracklets keep the remaining frames.
        skipped_tracklets: tracklets dropped (no frame left, or no frame at all).
        notes: human-readable remarks (e.g. queries without a cross-camera match).
        dataset_dir: the folder the splits were read from.
        split_id: the train/test split used (10-split datasets), else ``None``.
        num_splits: how many splits the dataset defines (1 for fixed-split datasets).
    """

    skipped_frames: list[BadImage] = field(default_factory=list)
    skipped_tracklets: list[SkippedTracklet] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dataset_dir: str = ""
    split_id: int | None = None
    num_splits: int = 1


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return shown + more


def order_frames(
    names: Sequence[str], pattern: re.Pattern[str], expected: str, dataset: str, where: str
) -> tuple[list[int], list[int]]:
    """Temporal order of frame file names: sorted by the frame number that ``pattern``
    captures in its group ``frame`` (ties by name), never by directory order.

    Returns:
        ``(order, numbers)``: indices into ``names`` in temporal order and the frame number
        of each name in that order.

    Raises:
        DatasetError: naming ``where`` and the first names that do not match ``pattern``.
    """
    numbers: list[int] = []
    bad: list[str] = []
    for name in names:
        m = pattern.match(name)
        if m is None:
            bad.append(name)
            numbers.append(-1)
        else:
            numbers.append(int(m.group("frame")))
    if bad:
        raise DatasetError(
            f"{dataset}: {len(bad)} frame name(s) in {where} do not match the expected "
            f"pattern {expected}: {_listed(bad)}"
        )
    order = sorted(range(len(names)), key=lambda i: (numbers[i], names[i]))
    return order, [numbers[i] for i in order]


def list_frames(folder: Path, dataset: str) -> list[str]:
    """Image file names directly inside ``folder`` (any order; see :func:`order_frames`)."""
    try:
        return [e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name)]
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot list {folder}: {exc}") from exc


def _describe(record: TrackletRecord, split: str, index: int) -> str:
    first = record.paths[0] if record.paths else "(no frames)"
    return f"{split} tracklet {index} (pid {record.pid}, camera {record.camid + 1}, {first})"


def _relabel(records: list[TrackletRecord]) -> list[TrackletRecord]:
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [replace(r, pid=mapping[r.pid]) for r in records]


def finalize_video_dataset(
    name: str,
    root: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    splits: dict[str, list[TrackletRecord]],
    opts: LoadOptions,
    sources: dict[str, str] | None = None,
    notes: Iterable[str] = (),
    empty: dict[str, list[str]] | None = None,
    min_seq_len: int = 0,
    split_id: int | None = None,
    num_splits: int = 1,
) -> ParsedVideoDataset:
    """Check frames, handle empty / broken tracklets, relabel train, note protocol facts.

    Args:
        name: dataset name; root: the user's data root; dataset_dir: the dataset folder.
        splits: ``{"train", "query", "gallery"}`` tracklets with the dataset's own pids and
            0-based camids, frames already in temporal order.
        opts: common load options. ``check_files`` / ``verify_images`` check every frame;
            ``skip_corrupt`` drops missing / corrupt frames (and tracklets left without
            frames, and empty tracklets) and counts them, instead of raising.
        sources: per split, where its tracklets came from (for errors).
        notes: remarks to keep.
        empty: per split, descriptions of tracklets that have no frame at all (a folder
            without images, a MARS row with ``start > end``).
        min_seq_len: drop tracklets shorter than this (torchreid's option; counted in
            the notes, not an error).
        split_id, num_splits: stored on the result (10-split datasets).

    Raises:
        DatasetError: empty tracklets or bad frames (unless ``skip_corrupt``), empty split.
    """
    sources = sources or {}
    notes = list(notes)
    skipped_tracklets: list[SkippedTracklet] = []
    empty = empty or {}
    empty_all = [(s, w) for s in VIDEO_SPLITS for w in empty.get(s, [])]
    if empty_all:
        if not opts.skip_corrupt:
            listed = "\n  ".join(f"{s}: {w}" for s, w in empty_all[:_MAX_LISTED])
            more = f"\n  (and {len(empty_all) - _MAX_LISTED} more)" if len(empty_all) > 5 else ""
            raise DatasetError(
                f"{name}: {len(empty_all)} empty tracklet(s) (no frames):\n  {listed}{more}\n"
                "Remove them, or pass skip_corrupt=True (data.skip_corrupt=true) to skip and "
                "count them."
            )
        skipped_tracklets += [SkippedTracklet(s, w, "no frames") for s, w in empty_all]

    skipped_frames: list[BadImage] = []
    if opts.check_files or opts.verify_images:
        paths = list(dict.fromkeys(p for s in VIDEO_SPLITS for r in splits[s] for p in r.paths))
        bad = find_bad_images(paths, verify=opts.verify_images, num_workers=opts.num_workers)
        if bad:
            reasons = {b.path: b.reason for b in bad}
            if not opts.skip_corrupt:
                lines = []
                for s in VIDEO_SPLITS:
                    for i, r in enumerate(splits[s]):
                        missing = [p for p in r.paths if p in reasons]
                        if missing:
                            lines.append(
                                f"{_describe(r, s, i)}: {len(missing)} of {len(r)} frames bad, "
                                f"e.g. {missing[0]}: {reasons[missing[0]]}"
                            )
                listed = "\n  ".join(lines[:_MAX_LISTED])
                more = f"\n  (and {len(lines) - _MAX_LISTED} more)" if len(lines) > 5 else ""
                raise DatasetError(
                    f"{name}: {len(bad)} frame(s) missing or unreadable in {len(lines)} "
                    f"tracklet(s):\n  {listed}{more}\n"
                    "Fix them, or pass skip_corrupt=True (data.skip_corrupt=true) to drop the "
                    "bad frames (and tracklets left without frames) and count them."
                )
            skipped_frames = bad
            for s in VIDEO_SPLITS:
                kept: list[TrackletRecord] = []
                for i, r in enumerate(splits[s]):
                    keep = [j for j, p in enumerate(r.paths) if p not in reasons]
                    if not keep:
                        skipped_tracklets.append(
                            SkippedTracklet(s, _describe(r, s, i), "every frame missing or bad")
                        )
                    else:
                        kept.append(r if len(keep) == len(r) else r.select(keep))
                splits = {**splits, s: kept}
            warnings.warn(
                f"{name}: skipped {len(bad)} missing or unreadable frame(s) (first: "
                f"{bad[0].path}: {bad[0].reason}) and {len(skipped_tracklets)} tracklet(s)",
                stacklevel=3,
            )
    if min_seq_len > 0:
        short = {s: sum(len(r) < min_seq_len for r in splits[s]) for s in VIDEO_SPLITS}
        if any(short.values()):
            splits = {s: [r for r in splits[s] if len(r) >= min_seq_len] for s in VIDEO_SPLITS}
            notes.append(
                f"min_seq_len={min_seq_len}: dropped "
                + ", ".join(f"{n} {s}" for s, n in short.items() if n)
                + " tracklet(s)"
            )
    for s in VIDEO_SPLITS:
        if not splits[s]:
            src = f" (read from {sources[s]})" if s in sources else ""
            raise DatasetError(
                f"{name}: the {s} split is empty{src}; expected at least one tracklet"
            )
    train = _relabel(splits["train"])
    query, gallery = splits["query"], splits["gallery"]

    gallery_pid_cams: dict[int, set[int]] = {}
    for r in gallery:
        gallery_pid_cams.setdefault(r.pid, set()).add(r.camid)
    no_gallery = [r for r in query if r.pid not in gallery_pid_cams]
    if no_gallery:
        warnings.warn(
            f"{name}: {len(no_gallery)} query tracklet(s) have no gallery tracklet of their "
            "identity; evaluation skips them",
            stacklevel=3,
        )
    lonely = sum(
        1 for r in query if r.pid in gallery_pid_cams and not gallery_pid_cams[r.pid] - {r.camid}
    )
    if lonely:
        notes.append(
            f"{lonely} query tracklet(s) have gallery tracklets of their identity only in "
            "their own camera: no cross-camera match (the standard protocol skips and counts "
            "them; MARS has 140)"
        )
    return ParsedVideoDataset(
        name=name,
        root=str(root),
        train=train,
        query=query,
        gallery=gallery,
        skipped_frames=skipped_frames,
        skipped_tracklets=skipped_tracklets,
        notes=notes,
        dataset_dir=str(dataset_dir),
        split_id=split_id,
        num_splits=num_splits,
    )


def sliding_windows(num_frames: int, length: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` windows cutting one tracklet into several training tracklets, the
    TKP authors' dense sampling: ``k = num_frames // step`` windows starting at
    ``0, step, ..., (k - 1) * step``, each ``length`` frames long except the last, which runs
    to the end of the tracklet; a tracklet shorter than ``step`` stays whole.

    (iLIDS-VID camera 2: ``length=8, step=4``; DukeMTMC-VideoReID: ``length=step=32``.)
    """
    if length < 1 or step < 1:
        raise ValueError(f"sliding_windows: length and step must be >= 1, got {length}, {step}")
    if num_frames < 1:
        raise ValueError("sliding_windows: a tracklet needs at least one frame")
    k = num_frames // step
    if k == 0:
        return [(0, num_frames)]
    out = [(i * step, min(i * step + length, num_frames)) for i in range(k - 1)]
    out.append(((k - 1) * step, num_frames))
    return out


def window_tracklets(record: TrackletRecord, length: int, step: int) -> list[TrackletRecord]:
    """``record`` cut into the :func:`sliding_windows` (per-frame extras follow)."""
    return [record.select(range(a, b)) for a, b in sliding_windows(len(record), length, step)]


def frame_numbers_array(numbers: Sequence[int]) -> np.ndarray:
    """Frame numbers as the int64 array stored in ``extras["frame_numbers"]``."""
    return np.asarray(numbers, dtype=np.int64)


def video_split_stats(ds: VideoReIDDataset) -> dict[str, dict[str, int]]:
    """Per split: ``ids`` (distinct pids > 0: pid 0 distractors are not an identity),
    ``tracklets``, ``frames``, ``cameras`` (ignoring -1), ``min_len``, ``max_len``."""
    out = {}
    for split in VIDEO_SPLITS:
        records = getattr(ds, split)
        lengths = [len(r) for r in records] or [0]
        out[split] = {
            "ids": len({r.pid for r in records if r.pid > 0 or split == "train"}),
            "tracklets": len(records),
            "frames": int(sum(lengths)),
            "cameras": len({r.camid for r in records if r.camid >= 0}),
            "min_len": int(min(lengths)),
            "max_len": int(max(lengths)),
        }
    return out


def format_video_stats(ds: VideoReIDDataset) -> str:
    """A torchreid-style table: rows train / query / gallery, columns # ids, # tracklets,
    # frames, # cameras, frames per tracklet; then skipped frames / tracklets and notes."""
    stats = video_split_stats(ds)
    header = ("subset", "# ids", "# tracklets", "# frames", "# cameras", "frames/tracklet")
    rows = []
    for split in VIDEO_SPLITS:
        s = stats[split]
        rows.append(
            (
                split,
                str(s["ids"]),
                str(s["tracklets"]),
                str(s["frames"]),
                str(s["cameras"]) if s["cameras"] else "-",
                f"{s['min_len']}-{s['max_len']}",
            )
        )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def fmt(r: tuple[str, ...]) -> str:
        return "  " + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    rule = "  " + "-" * (sum(widths) + 3 * (len(header) - 1))
    split_note = ""
    if getattr(ds, "split_id", None) is not None:
        split_note = f", split {ds.split_id} of {ds.num_splits}"  # type: ignore[attr-defined]
    lines = [f"=> {ds.name} ({ds.root}{split_note})", rule, fmt(header), rule, *map(fmt, rows)]
    lines.append(rule)
    frames = getattr(ds, "skipped_frames", None)
    tracks = getattr(ds, "skipped_tracklets", None)
    if frames or tracks:
        lines.append(
            f"  skipped {len(frames or [])} bad frame(s) and {len(tracks or [])} tracklet(s)"
        )
    for note in getattr(ds, "notes", None) or []:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def folder_tracklet(
    folder: Path,
    pid: int,
    camid: int,
    pattern: re.Pattern[str],
    expected: str,
    dataset: str,
    empty: list[str],
) -> TrackletRecord | None:
    """The tracklet of one folder of frames (iLIDS-VID, PRID2011, DukeMTMC-VideoReID),
    frames sorted by the number ``pattern`` captures as ``frame``. A folder without frames
    is appended to ``empty`` (see :func:`finalize_video_dataset`) and gives ``None``."""
    names = list_frames(folder, dataset)
    if not names:
        empty.append(f"{folder} (pid {pid}, camera {camid + 1})")
        return None
    order, numbers = order_frames(names, pattern, expected, dataset, str(folder))
    base = str(folder)
    return TrackletRecord(
        paths=tuple(os.path.join(base, names[i]) for i in order),
        pid=pid,
        camid=camid,
        extras={"frame_numbers": frame_numbers_array(numbers)},
    )


def check_split_id(dataset: str, split_id: int, num_splits: int, source: str) -> int:
    """``split_id`` as an int in ``[0, num_splits)``, or a :class:`DatasetError`."""
    if isinstance(split_id, bool) or int(split_id) != split_id or not 0 <= split_id < num_splits:
        raise DatasetError(
            f"{dataset}: split {split_id!r} out of range: {source} defines {num_splits} "
            f"splits, choose 0..{num_splits - 1}"
        )
    return int(split_id)
