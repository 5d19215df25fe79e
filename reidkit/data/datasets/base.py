"""Shared machinery for the dataset parsers: errors, folder discovery, file-name parsing,
image checks, train relabelling and protocol sanity checks."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reidkit.data.images import BadImage, find_bad_images, is_image_file
from reidkit.data.records import ImageRecord, ReIDDataset

__all__ = [
    "LoaderRegistry",
    "DatasetError",
    "LoadOptions",
    "ParsedDataset",
    "find_dataset_dir",
    "resolve_child",
    "scan_folder",
    "load_keypoints",
    "finalize_dataset",
    "SPLITS",
]

SPLITS = ("train", "query", "gallery")
_MAX_LISTED = 5  # offenders named in an error message


class DatasetError(ValueError):
    """A dataset folder, list file or manifest does not match the expected layout.

    The message names the dataset, the path(s) involved and what was expected.
    """


@dataclass(frozen=True)
class LoadOptions:
    """Options every parser understands.

    Attributes:
        check_files: ``stat`` every image (exists, non-empty). Cheap; on by default.
        verify_images: additionally open every image with Pillow and ``verify()`` it.
        skip_corrupt: drop images failing the checks (and count them) instead of raising.
        num_workers: threads used for the checks (and for CUHK03 ``.mat`` conversion).
        keypoints: a COCO-17 keypoint file (simple JSON or COCO; docs/keypoints.md) whose
            records become every image's ``extras["keypoints"]`` (replacing keypoints the
            parser found itself); images without a record get all-invisible keypoints.
        keypoint_images: COCO results only: a file with the ``images`` list mapping
            ``image_id`` to ``file_name``.
        keypoint_threshold: COCO results only: confidence at which a keypoint is visible.
    """

    check_files: bool = True
    verify_images: bool = False
    skip_corrupt: bool = False
    num_workers: int = 8
    keypoints: str | None = None
    keypoint_images: str | None = None
    keypoint_threshold: float = 0.2


@dataclass
class ParsedDataset(ReIDDataset):
    """A :class:`ReIDDataset` plus what the parser noticed while building it.

    Attributes:
        skipped: images dropped because they were missing/empty/corrupt (``skip_corrupt``).
        notes: human-readable remarks (e.g. "no camera ids: no camera filtering").
        dataset_dir: the folder the splits were read from (after layout discovery).
    """

    skipped: list[BadImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dataset_dir: str = ""


# ----------------------------------------------------------------------- registry


class LoaderRegistry:
    """Dataset loaders by name, with aliases: the image and the video registries.

    A loader is ``fn(root, opts: LoadOptions, **options)``; its keyword parameters after
    ``opts`` are the dataset-specific options it accepts.
    """

    def __init__(
        self,
        kind: str,
        loaders: dict[str, Callable[..., Any]],
        aliases: dict[str, str],
        redirect: Callable[[str, str], str | None] | None = None,
    ) -> None:
        """``kind`` names the datasets in messages ("dataset", "video dataset");
        ``redirect(name, key)`` may return a better message for an unknown name (e.g. "that is a
        video dataset")."""
        self.kind = kind
        self.loaders = loaders
        self.aliases = aliases
        self.redirect = redirect

    def register(self, name: str, loader: Callable[..., Any] | None = None) -> Any:
        """Register ``loader`` under ``name``; usable as a decorator."""

        def _register(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name.strip().lower()
            if key in self.loaders or key in self.aliases:
                raise ValueError(f"{self.kind} name {name!r} is already registered")
            self.loaders[key] = fn
            return fn

        return _register(loader) if loader is not None else _register

    def __contains__(self, name: str) -> bool:
        key = name.strip().lower()
        return self.aliases.get(key, key) in self.loaders

    @staticmethod
    def specific_options(fn: Callable[..., Any]) -> list[str]:
        """The dataset-specific keyword options of a loader (after ``root, opts``)."""
        params = list(inspect.signature(fn).parameters.values())[2:]
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def available(self) -> dict[str, list[str]]:
        """Registered names mapped to the dataset-specific options they accept."""
        return {name: self.specific_options(fn) for name, fn in sorted(self.loaders.items())}

    def resolve(self, name: str) -> tuple[str, Callable[..., Any]]:
        """``(registry key, loader)`` of a name or alias (any case).

        Raises:
            DatasetError: an unknown name, with the closest known one and the list.
        """
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        if key not in self.loaders:
            import difflib

            better = self.redirect(name, key) if self.redirect is not None else None
            if better:
                raise DatasetError(better)
            close = difflib.get_close_matches(key, [*self.loaders, *self.aliases], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DatasetError(
                f"unknown {self.kind} {name!r}{hint} (available: {', '.join(sorted(self.loaders))})"
            )
        return key, self.loaders[key]


# ----------------------------------------------------------------------- discovery
def resolve_child(parent: Path, name: str) -> Path | None:
    """``parent / name`` if it exists, else a case-insensitive match of each path part
    (``mask_train_v2`` finds ``mask_train_V2``), else ``None``."""
    direct = parent / name
    if direct.exists():
        return direct
    current = parent
    for part in Path(name).parts:
        candidate = current / part
        if candidate.exists():
            current = candidate
            continue
        try:
            matches = [e for e in os.listdir(current) if e.lower() == part.lower()]
        except OSError:
            return None
        if not matches:
            return None
        current = current / sorted(matches)[0]
    return current


def find_dataset_dir(
    root: str | os.PathLike,
    candidates: Sequence[str],
    required: Sequence[str],
    dataset: str,
    layout: str,
) -> Path:
    """Return the first ``root/candidate`` holding every path in ``required``.

    Args:
        root: the user's data root (``data.root``).
        candidates: sub-folders of ``root`` to try, in order (``""`` is ``root`` itself).
        required: files/folders that must exist inside the dataset folder.
        dataset: dataset name for the error message.
        layout: a short description of the expected layout for the error message.

    Raises:
        DatasetError: naming the expected layout and every path tried.
    """
    root_path = Path(root).expanduser()
    tried: list[str] = []
    for cand in candidates:
        base = resolve_child(root_path, cand) if cand else root_path
        shown = root_path / cand if cand else root_path
        tried.append(str(shown))
        if base is None or not base.is_dir():
            continue
        if all(resolve_child(base, req) is not None for req in required):
            return Path(os.path.abspath(base))
    if not root_path.exists():
        where = f"data root {str(root_path)!r} does not exist"
    else:
        where = f"no folder under data root {str(root_path)!r} has that layout"
    raise DatasetError(
        f"{dataset}: dataset not found ({where}). Expected layout: {layout} (the dataset "
        f"folder must hold {', '.join(required)}); tried: {', '.join(tried)}. Set data.root "
        "(--root) to the folder that holds it; docs/datasets.md says how to prepare it."
    )


def _list_offenders(items: Sequence[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return shown + more


def scan_folder(
    folder: Path,
    pattern: re.Pattern[str],
    expected: str,
    dataset: str,
    num_cams: int | None = None,
) -> list[tuple[str, int, int]]:
    """Parse every image file name in ``folder`` (not recursive) with ``pattern``.

    ``pattern`` must capture the pid as group 1 and the 1-based camera as group 2.

    Returns:
        Sorted list of ``(absolute_path, pid, camid_1_based)``.

    Raises:
        DatasetError: when names do not match (lists the first offenders and the expected
            pattern) or a camera id is outside ``1..num_cams``.
    """
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot list {folder}: {exc}") from exc
    out: list[tuple[str, int, int]] = []
    bad: list[str] = []
    bad_cam: list[str] = []
    base = str(folder)
    for name in names:
        m = pattern.match(name)
        if m is None:
            bad.append(name)
            continue
        pid, cam = int(m.group(1)), int(m.group(2))
        if num_cams is not None and not 1 <= cam <= num_cams:
            bad_cam.append(name)
            continue
        out.append((os.path.join(base, name), pid, cam))
    if bad:
        raise DatasetError(
            f"{dataset}: {len(bad)} file name(s) in {folder} do not match the expected "
            f"pattern {expected}: {_list_offenders(bad)}"
        )
    if bad_cam:
        raise DatasetError(
            f"{dataset}: {len(bad_cam)} file name(s) in {folder} have a camera id outside "
            f"1..{num_cams}: {_list_offenders(bad_cam)}"
        )
    return out


def load_keypoints(path: Path, dataset: str) -> dict[str, list[list[float]]]:
    """Read a COCO-17 keypoint file ``{"file.jpg": [[x, y, v], ... 17 rows]}``.

    Raises:
        DatasetError: if the JSON is invalid or an entry is not 17 rows of 3 numbers.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{dataset}: cannot read keypoint file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(
            f"{dataset}: keypoint file {path}: expected an object mapping file names to "
            f"17 [x, y, v] rows, got {type(data).__name__}"
        )
    for key, rows in data.items():
        ok = (
            isinstance(rows, list)
            and len(rows) == 17
            and all(
                isinstance(r, list)
                and len(r) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
                for r in rows
            )
        )
        if not ok:
            raise DatasetError(
                f"{dataset}: keypoint file {path}: entry {key!r} must be 17 rows of "
                "[x, y, visibility] numbers (COCO-17 order)"
            )
    return data


# ------------------------------------------------------------------------ finalize
def _relabel(records: list[ImageRecord]) -> list[ImageRecord]:
    """Map train pids to 0..N-1 in sorted order of the original pids."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [dataclasses.replace(r, pid=mapping[r.pid]) for r in records]


def finalize_dataset(
    name: str,
    root: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    splits: dict[str, list[ImageRecord]],
    opts: LoadOptions,
    sources: dict[str, str] | None = None,
    notes: Iterable[str] = (),
) -> ParsedDataset:
    """Check images, drop/raise on bad ones, relabel train, and sanity-check the protocol.

    Args:
        name: dataset name.
        root: the user's data root.
        dataset_dir: folder the records came from.
        splits: ``{"train": [...], "query": [...], "gallery": [...]}`` with the dataset's
            own pids (train not yet relabelled) and 0-based camids (-1 = unknown).
        opts: common load options.
        sources: per split, where the records came from (folder / list file) for errors.
        notes: remarks to store on the result.

    Raises:
        DatasetError: bad images (unless ``skip_corrupt``), or an empty split.
    """
    sources = sources or {}
    notes = list(notes)
    skipped: list[BadImage] = []
    if opts.check_files or opts.verify_images:
        paths = list(dict.fromkeys(r.path for s in SPLITS for r in splits[s]))
        bad = find_bad_images(paths, verify=opts.verify_images, num_workers=opts.num_workers)
        if bad and not opts.skip_corrupt:
            listed = "; ".join(f"{b.path}: {b.reason}" for b in bad[:_MAX_LISTED])
            more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
            raise DatasetError(
                f"{name}: {len(bad)} unreadable image(s): {listed}{more}. Fix or remove "
                "them, or set data.skip_corrupt=true (--skip-corrupt, skip_corrupt=True) to "
                "skip and count them"
            )
        if bad:
            bad_paths = {b.path for b in bad}
            splits = {s: [r for r in splits[s] if r.path not in bad_paths] for s in SPLITS}
            skipped = bad
            warnings.warn(
                f"{name}: skipped {len(bad)} unreadable image(s) (first: {bad[0].path}: "
                f"{bad[0].reason})",
                stacklevel=3,
            )
    if opts.keypoints:
        from reidkit.data.keypoints import attach_keypoints

        splits, kp_notes = attach_keypoints(
            splits,
            opts.keypoints,
            dataset=name,
            dataset_dir=dataset_dir,
            images=opts.keypoint_images,
            score_threshold=opts.keypoint_threshold,
            num_workers=opts.num_workers,
        )
        notes.extend(kp_notes)
    for s in SPLITS:
        if not splits[s]:
            src = f" (read from {sources[s]})" if s in sources else ""
            raise DatasetError(f"{name}: the {s} split is empty{src}; expected at least one image")
    train = _relabel(splits["train"])
    query, gallery = splits["query"], splits["gallery"]

    gallery_pids = {r.pid for r in gallery}
    missing = {r.pid for r in query} - gallery_pids
    if missing:
        n_img = sum(r.pid in missing for r in query)
        warnings.warn(
            f"{name}: {len(missing)} query identities ({n_img} query images) have no image in "
            f"the gallery; they are skipped by CMC/mAP evaluation (e.g. pids "
            f"{sorted(missing)[:_MAX_LISTED]})",
            stacklevel=3,
        )
    if all(r.camid < 0 for r in (*query, *gallery)):
        note = (
            "no camera ids (camid=-1): evaluation will run without camera filtering "
            "(same-camera gallery matches are not removed)"
        )
        notes.append(note)
        warnings.warn(f"{name}: {note}", stacklevel=3)
    return ParsedDataset(
        name=name,
        root=str(root),
        train=train,
        query=query,
        gallery=gallery,
        skipped=skipped,
        notes=notes,
        dataset_dir=str(dataset_dir),
    )
