"""Your own data: a CSV/JSON manifest, or one folder per identity.

Manifest (``data.custom_manifest``), CSV with a header row or JSON::

    path,pid,camid,split                 [{"path": "a/1.jpg", "pid": 3, "camid": 0,
    imgs/0001_a.jpg,1,0,train              "split": "train"}, ...]
    imgs/0001_b.jpg,1,1,query            (or {"images": [...]})

``camid`` is optional (omit the column/key, or leave every value empty). Relative paths
are resolved against the manifest's folder. ``pid``/``camid`` may be integers (used as
given; camids must be >= 0) or names (mapped to integers in sorted order).

Folder layout (no manifest)::

    <root>/train/<identity>/*.jpg   <root>/query/<identity>/*.jpg   <root>/gallery/<identity>/*.jpg

Identity folder names that are all integers are used as pids, otherwise names are mapped
to integers in sorted order. Camera ids come from ``cam_pattern`` (default: ``c<digits>``
after ``_`` or at the start of the file name, e.g. ``0001_c2_003.jpg``); when no file has
one, camid is -1 and evaluation runs without camera filtering.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from reidkit.data.datasets.base import (
    SPLITS,
    DatasetError,
    LoadOptions,
    ParsedDataset,
    finalize_dataset,
)
from reidkit.data.images import is_image_file
from reidkit.data.records import ImageRecord

__all__ = ["load_custom", "DEFAULT_CAM_PATTERN"]

DEFAULT_CAM_PATTERN = r"(?:^|_)c(\d+)"


def _shown(items: list[str]) -> str:
    return "; ".join(items[:5]) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _as_ids(values: list[Any]) -> tuple[list[int], bool]:
    """Integers if every value is one, else names mapped to 0..K-1 in sorted order.

    Returns the ids and whether names were mapped."""
    if all(_is_int(v) for v in values):
        return [int(float(v)) if isinstance(v, float) else int(v) for v in values], False
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for v in values], True


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"custom: cannot read manifest {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"custom: manifest {path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and "images" in data:
            data = data["images"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DatasetError(
                f"custom: manifest {path}: expected a list of objects with keys path, pid, "
                "split (and optional camid), or {'images': [...]}"
            )
        return data
    if path.suffix.lower() in (".csv", ".txt", ".tsv"):
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        reader = csv.DictReader(text.splitlines(), dialect=dialect)
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
        return rows
    raise DatasetError(f"custom: manifest {path}: unsupported extension (use .csv or .json)")


def _from_manifest(
    manifest: Path,
) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    rows = _read_manifest(manifest)
    if not rows:
        raise DatasetError(f"custom: manifest {manifest} has no rows")
    missing_cols = [c for c in ("path", "pid", "split") if c not in rows[0]]
    if missing_cols:
        raise DatasetError(
            f"custom: manifest {manifest}: missing column(s)/key(s) {missing_cols}; expected "
            f"path, pid, split (and optional camid), found {sorted(rows[0])}"
        )
    bad: list[str] = []
    for i, r in enumerate(rows):
        split = str(r.get("split", "")).strip().lower()
        if split not in SPLITS:
            bad.append(f"row {i + 1}: split {r.get('split')!r}")
        if r.get("path") in (None, "") or r.get("pid") in (None, ""):
            bad.append(f"row {i + 1}: empty path or pid")
    if bad:
        raise DatasetError(
            f"custom: manifest {manifest}: {len(bad)} bad row(s), expected split in "
            f"{{train, query, gallery}} and non-empty path/pid: {_shown(bad)}"
        )
    pids, pid_named = _as_ids([r["pid"] for r in rows])
    cam_raw = [r.get("camid") for r in rows]
    has_cam = [c not in (None, "") for c in cam_raw]
    notes: list[str] = []
    if all(has_cam):
        camids, cam_named = _as_ids(cam_raw)
        if not cam_named and min(camids) < 0:
            neg = [f"row {i + 1}" for i, c in enumerate(camids) if c < 0]
            raise DatasetError(
                f"custom: manifest {manifest}: camid must be >= 0 (0-based) or left empty "
                f"for every row: {_shown(neg)}"
            )
        if cam_named:
            notes.append("camera names mapped to integers in sorted order")
    elif not any(has_cam):
        camids = [-1] * len(rows)
    else:
        partial = [f"row {i + 1}" for i, h in enumerate(has_cam) if not h]
        raise DatasetError(
            f"custom: manifest {manifest}: camid is given for some rows but not others "
            f"(give it for every row or none): missing in {_shown(partial)}"
        )
    if pid_named:
        notes.append("identity names mapped to integers in sorted order")
    base = manifest.parent
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for r, pid, cam in zip(rows, pids, camids):
        p = Path(str(r["path"])).expanduser()
        path = p if p.is_absolute() else base / p
        splits[str(r["split"]).strip().lower()].append(ImageRecord(os.path.abspath(path), pid, cam))
    return splits, notes


def _from_folders(root: Path, cam_pattern: str) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DatasetError(
            f"custom: no manifest given and the folder layout is incomplete under {root}: "
            f"missing {[str(root / s) for s in missing]}. Expected layout: "
            "<root>/{train,query,gallery}/<identity>/*.jpg, or set data.custom_manifest "
            "to a CSV/JSON manifest (columns path, pid, split[, camid])."
        )
    regex = re.compile(cam_pattern)
    entries: list[tuple[str, str, str, str | None]] = []  # split, identity, path, cam
    for split in SPLITS:
        split_dir = root / split
        loose = [e.name for e in os.scandir(split_dir) if e.is_file() and is_image_file(e.name)]
        if loose:
            raise DatasetError(
                f"custom: {split_dir} holds images directly ({_shown(loose)}); expected one "
                f"sub-folder per identity: {split_dir}/<identity>/*.jpg"
            )
        for ident in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
            ident_dir = split_dir / ident
            for name in sorted(os.listdir(ident_dir)):
                if not is_image_file(name):
                    continue
                m = regex.search(Path(name).stem)
                entries.append((split, ident, str(ident_dir / name), m.group(1) if m else None))
    if not entries:
        raise DatasetError(f"custom: no images found under {root}/{{train,query,gallery}}/*/")
    pids, pid_named = _as_ids([e[1] for e in entries])
    has_cam = [e[3] is not None for e in entries]
    notes: list[str] = []
    if all(has_cam):
        cam_names = sorted({e[3] for e in entries}, key=lambda c: (int(c) if _is_int(c) else 0, c))
        index = {c: i for i, c in enumerate(cam_names)}
        camids = [index[e[3]] for e in entries]
    elif not any(has_cam):
        camids = [-1] * len(entries)
    else:
        partial = [e[2] for e, h in zip(entries, has_cam) if not h]
        raise DatasetError(
            f"custom: camera ids (pattern {cam_pattern!r}) found in some file names but not "
            f"others; name every file with a camera or none: {_shown(partial)}"
        )
    if pid_named:
        notes.append("identity folder names mapped to integers in sorted order")
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for (split, _, path, _), pid, cam in zip(entries, pids, camids):
        splits[split].append(ImageRecord(os.path.abspath(path), pid, cam))
    return splits, notes


def load_custom(
    root: str | os.PathLike,
    opts: LoadOptions,
    manifest: str | os.PathLike | None = None,
    cam_pattern: str = DEFAULT_CAM_PATTERN,
) -> ParsedDataset:
    """A custom dataset from a manifest (when given) or the folder-per-identity layout.

    Args:
        root: data root; the folder layout is read from it, and a relative ``manifest``
            that does not exist relative to the working directory is looked up in it.
        manifest: CSV/JSON manifest path (``data.custom_manifest``).
        cam_pattern: regex whose group 1 is the camera label, searched in file stems
            (folder layout only).
    """
    root_path = Path(root).expanduser()
    if manifest is not None:
        m = Path(manifest).expanduser()
        tried = [m]
        if not m.is_absolute() and not m.is_file():
            tried.append(root_path / m)
            m = root_path / m
        if not m.is_file():
            raise DatasetError(
                f"custom: manifest not found; tried {[str(t) for t in tried]} (expected a "
                "CSV/JSON file with path, pid, split[, camid])"
            )
        splits, notes = _from_manifest(m)
        sources = {s: str(m) for s in SPLITS}
        ddir = m.parent
    else:
        if not root_path.is_dir():
            raise DatasetError(
                f"custom: data root {str(root_path)!r} does not exist; expected "
                "<root>/{train,query,gallery}/<identity>/*.jpg or data.custom_manifest"
            )
        splits, notes = _from_folders(root_path, cam_pattern)
        sources = {s: str(root_path / s) for s in SPLITS}
        ddir = root_path
    return finalize_dataset("custom", root, os.path.abspath(ddir), splits, opts, sources, notes)
