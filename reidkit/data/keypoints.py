"""COCO-17 keypoint files for re-ID datasets: read, check, attach to records, normalise.

Two file formats are read (docs/keypoints.md):

* **Simple JSON** (what ``reidkit synth`` and ``reidkit keypoints`` write): an object
  mapping an image to 17 rows ``[x, y, visibility]`` in pixels of the stored image,
  visibility a COCO flag (0 not visible, 1 labelled but hidden, 2 visible)::

      {"bounding_box_train/0002_c1s1_000451_03.jpg": [[x, y, v], ... 17 rows], ...}

* **COCO keypoints**: records ``{"image_id", "keypoints": [51 numbers], "score",
  "category_id"}`` as pose estimators write them (a JSON list), or a COCO object
  ``{"images": [{"id", "file_name"}, ...], "annotations": [records]}``. A record with a
  ``score`` is a *result*: the third number of each keypoint is a confidence and the point
  is visible when it reaches ``score_threshold``. A record without one is a ground-truth
  annotation whose third number is the visibility flag. ``image_id`` is mapped to a file
  name through the ``images`` list (in the same object, or a separate file passed as
  ``images``); a bare list whose ``image_id`` values are strings uses them as file names.
  Several records for one image (several people found in a crop): the highest ``score``
  wins (for annotations, the one with the most visible points).

Image keys are matched to dataset records by path suffix: a file name, a path relative to
the dataset folder (``query/0001_c1s1_001051_00.jpg``) or an absolute path; a key with
extra leading folders (a path from another machine) matches through its longest trailing
part that names an image. A key that names two different images is an error (use
relative paths).

Coordinates stay in pixels of the stored image in the records (``extras["keypoints"]``,
17 x [x, y, v]); the data transforms move them with the pixels, and a method that wants
normalised coordinates calls :func:`normalize_keypoints` with the batch's image size.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from reidkit.data.datasets.base import DatasetError
from reidkit.data.records import ImageRecord

if TYPE_CHECKING:  # torch is imported where it is used: dataset parsing does not need it
    from torch import Tensor

__all__ = [
    "COCO_KEYPOINT_NAMES",
    "NUM_KEYPOINTS",
    "KeypointFileError",
    "KeypointTable",
    "read_keypoint_file",
    "attach_keypoints",
    "normalize_keypoints",
    "write_json_atomic",
]

NUM_KEYPOINTS = 17
COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
#: A visible keypoint may lie outside the image by up to this fraction of its size (pose
#: models predict into the padding); beyond it the file is for other images/coordinates.
OUTSIDE_SLACK = 0.5
_LISTED = 5


class KeypointFileError(DatasetError):
    """A keypoint file is unreadable, malformed or does not fit the dataset; the message
    names the file and the record."""


@dataclass
class KeypointTable:
    """The parsed content of a keypoint file.

    Attributes:
        path: the file.
        format: ``"json"`` (simple) or ``"coco"``.
        entries: image key -> (17, 3) float64 ``(x, y, visibility)`` in pixels.
        notes: remarks (records dropped for duplicates or other categories).
    """

    path: str
    format: str
    entries: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------- reading
class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeypointFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise KeypointFileError(
            f"{what} {path}: key {exc.args[0]!r} appears twice in one object (two records "
            "for one image?)"
        ) from None
    except json.JSONDecodeError as exc:
        raise KeypointFileError(f"{what} {path}: invalid JSON: {exc}") from exc


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_rows(value: Any, path: Path, record: str) -> np.ndarray:
    """17 x [x, y, v] numbers -> (17, 3) float64, or an error naming the record."""
    expected = "17 rows of [x, y, visibility] numbers (COCO-17 order)"
    if isinstance(value, list):  # fast path: a well-formed record is an int/float array
        try:
            arr = np.array(value)
        except ValueError:  # ragged
            arr = None
        if arr is not None and arr.shape == (NUM_KEYPOINTS, 3) and arr.dtype.kind in "iuf":
            return arr.astype(np.float64)
    if not isinstance(value, list) or any(not isinstance(r, list) for r in value):
        raise KeypointFileError(
            f"keypoint file {path}: record {record}: expected {expected}, got "
            f"{type(value).__name__ if not isinstance(value, list) else 'a non-list row'}"
        )
    if len(value) != NUM_KEYPOINTS:
        raise KeypointFileError(
            f"keypoint file {path}: record {record}: expected {expected}, got {len(value)} rows"
        )
    for k, row in enumerate(value):
        if len(row) != 3:
            raise KeypointFileError(
                f"keypoint file {path}: record {record}: expected {expected}; row {k} "
                f"({COCO_KEYPOINT_NAMES[k]}) has {len(row)} values"
            )
        if not all(_is_number(v) for v in row):
            raise KeypointFileError(
                f"keypoint file {path}: record {record}: expected {expected}; row {k} "
                f"({COCO_KEYPOINT_NAMES[k]}) holds a non-number: {row}"
            )
    return np.asarray(value, dtype=np.float64)


def _check_values(arr: np.ndarray, path: Path, record: str, flags: bool) -> None:
    if not np.isfinite(arr).all():
        k = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise KeypointFileError(
            f"keypoint file {path}: record {record}: keypoint {k} "
            f"({COCO_KEYPOINT_NAMES[k]}) is not finite: {arr[k].tolist()}"
        )
    third = arr[:, 2]
    if flags and ((third < 0) | (third > 2)).any():
        k = int(np.argwhere((third < 0) | (third > 2))[0][0])
        raise KeypointFileError(
            f"keypoint file {path}: record {record}: keypoint {k} "
            f"({COCO_KEYPOINT_NAMES[k]}) has visibility {third[k]:g}; expected a COCO flag "
            "0, 1 or 2 (threshold confidences before writing this format)"
        )


def _read_simple(data: dict, path: Path) -> KeypointTable:
    entries = {key: _as_rows(rows, path, repr(key)) for key, rows in data.items()}
    if entries:  # value checks on all records at once; per record only to name the culprit
        stacked = np.stack(list(entries.values()))
        third = stacked[..., 2]
        bad = ~np.isfinite(stacked).all(axis=(1, 2)) | ((third < 0) | (third > 2)).any(axis=1)
        if bad.any():
            key = list(entries)[int(np.argmax(bad))]
            _check_values(entries[key], path, repr(key), flags=True)
    return KeypointTable(str(path), "json", entries)


def _image_names(images: Any, source: str) -> dict[Any, str]:
    if isinstance(images, dict) and "images" in images:
        images = images["images"]
    if not isinstance(images, list):
        raise KeypointFileError(
            f"{source}: expected a COCO 'images' list of {{'id', 'file_name'}} objects"
        )
    out: dict[Any, str] = {}
    for i, item in enumerate(images):
        if not isinstance(item, dict) or "id" not in item or "file_name" not in item:
            raise KeypointFileError(
                f"{source}: images[{i}] must be an object with 'id' and 'file_name', got "
                f"{str(item)[:80]}"
            )
        if item["id"] in out:
            raise KeypointFileError(f"{source}: images[{i}]: id {item['id']!r} appears twice")
        out[item["id"]] = str(item["file_name"])
    return out


def _read_coco(
    records: list,
    path: Path,
    names: dict[Any, str] | None,
    names_source: str,
    score_threshold: float,
) -> KeypointTable:
    best: dict[str, tuple[tuple[float, int], np.ndarray]] = {}
    duplicates = other_category = 0
    for i, rec in enumerate(records):
        where = f"{i}"
        if not isinstance(rec, dict):
            raise KeypointFileError(
                f"keypoint file {path}: record {where}: expected an object with 'image_id' "
                f"and 'keypoints', got {type(rec).__name__}"
            )
        if "image_id" in rec:
            where = f"{i} (image_id {rec['image_id']!r})"
        if rec.get("category_id", 1) != 1:
            other_category += 1
            continue
        if "image_id" not in rec or "keypoints" not in rec:
            missing = [k for k in ("image_id", "keypoints") if k not in rec]
            raise KeypointFileError(
                f"keypoint file {path}: record {where}: missing {', '.join(missing)}"
            )
        image_id = rec["image_id"]
        if names is not None:
            if image_id not in names:
                raise KeypointFileError(
                    f"keypoint file {path}: record {where}: image_id not in the images list "
                    f"of {names_source}"
                )
            key = names[image_id]
        elif isinstance(image_id, str):
            key = image_id
        else:
            raise KeypointFileError(
                f"keypoint file {path}: record {where}: COCO results refer to images by id; "
                "give the images list ({'id', 'file_name'}) in the same file as "
                '{"images": [...], "annotations": [...]}, or pass it with '
                "keypoint_images=FILE, or use file names as image_id"
            )
        flat = rec["keypoints"]
        if not isinstance(flat, list) or len(flat) != 3 * NUM_KEYPOINTS:
            got = f"{len(flat)} values" if isinstance(flat, list) else type(flat).__name__
            raise KeypointFileError(
                f"keypoint file {path}: record {where}: 'keypoints' must be 51 numbers "
                f"(17 x [x, y, score/visibility]), got {got}"
            )
        arr = _as_rows([flat[k : k + 3] for k in range(0, len(flat), 3)], path, where)
        is_result = "score" in rec
        _check_values(arr, path, where, flags=not is_result)
        if is_result:
            score = rec["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise KeypointFileError(
                    f"keypoint file {path}: record {where}: 'score' must be a number"
                )
            arr[:, 2] = np.where(arr[:, 2] >= score_threshold, 2.0, 0.0)
            rank = (float(score), int((arr[:, 2] > 0).sum()))
        else:
            rank = (math.inf, int((arr[:, 2] > 0).sum()))
        if key in best:
            duplicates += 1
            if rank <= best[key][0]:
                continue
        best[key] = (rank, arr)
    notes = []
    if duplicates:
        notes.append(
            f"{duplicates} extra record(s) for images already seen (several people per "
            "crop): kept the highest score"
        )
    if other_category:
        notes.append(f"ignored {other_category} record(s) with category_id != 1 (not person)")
    return KeypointTable(str(path), "coco", {k: v for k, (_, v) in best.items()}, notes)


def read_keypoint_file(
    path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    score_threshold: float = 0.2,
) -> KeypointTable:
    """Read a simple JSON or COCO keypoint file (format detected from its content).

    Args:
        path: the keypoint file.
        images: COCO only: a file with the ``images`` list (a COCO annotations file or a
            bare list of ``{"id", "file_name"}``) when ``path`` holds bare results.
        score_threshold: COCO results only: a keypoint whose confidence reaches it is
            visible (visibility 2), otherwise not (0).

    Raises:
        KeypointFileError: unreadable or invalid JSON, wrong shapes, non-numbers,
            visibility flags outside 0-2, duplicate records, unknown image ids; the
            message names the file and the record.
    """
    path = Path(path)
    data = _load_json(path, "keypoint file")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        if images is not None:
            names = _image_names(_load_json(Path(images), "images file"), str(images))
            source = str(images)
        elif "images" in data:
            names, source = _image_names(data["images"], str(path)), str(path)
        else:
            names, source = None, str(path)
        return _read_coco(data["annotations"], path, names, source, score_threshold)
    if isinstance(data, list):
        names = None
        if images is not None:
            names = _image_names(_load_json(Path(images), "images file"), str(images))
        return _read_coco(data, path, names, str(images), score_threshold)
    if isinstance(data, dict):
        return _read_simple(data, path)
    raise KeypointFileError(
        f"keypoint file {path}: expected an object mapping image names to 17 [x, y, v] "
        f"rows, or COCO keypoint records, got {type(data).__name__}"
    )


# ------------------------------------------------------------------------ attaching
def _suffixes(path: str, dataset_dir: str) -> list[str]:
    """Every key that names ``path``: each trailing part of its path relative to the
    dataset folder (``a/b/c.jpg``, ``b/c.jpg``, ``c.jpg``)."""
    prefix = dataset_dir + os.sep if dataset_dir else ""
    if prefix and path.startswith(prefix):  # the parsers' absolute paths: no relpath needed
        rel = path[len(prefix) :]
    else:
        absolute = os.path.abspath(path)
        rel = os.path.relpath(absolute, dataset_dir) if dataset_dir else absolute
        if rel.split(os.sep)[0] == "..":  # outside the dataset folder: use all its parts
            rel = absolute
    parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _normalise_key(key: str) -> str:
    key = key.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _image_sizes(paths: Sequence[str], num_workers: int) -> dict[str, tuple[int, int]]:
    def size(p: str) -> tuple[int, int]:
        try:
            with Image.open(p) as im:
                return im.size
        except OSError as exc:
            raise KeypointFileError(f"cannot read image {p} to check its keypoints: {exc}") from exc

    def sizes(chunk: Sequence[str]) -> list[tuple[int, int]]:
        return [size(p) for p in chunk]

    if num_workers <= 1 or len(paths) < 256:
        return dict(zip(paths, sizes(paths)))
    step = 256  # one task per chunk: a future per image costs more than reading its header
    chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return dict(zip(paths, (s for part in pool.map(sizes, chunks) for s in part)))


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:_LISTED])
    return shown + (f" (and {len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def attach_keypoints(
    splits: Mapping[str, list[ImageRecord]],
    path: str | os.PathLike,
    *,
    dataset: str,
    dataset_dir: str | os.PathLike = "",
    images: str | os.PathLike | None = None,
    score_threshold: float = 0.2,
    num_workers: int = 8,
) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    """Give every record ``extras["keypoints"]`` (17 x [x, y, v], pixels) from a file.

    Checks, per matched image (its size read from the image header): a visible keypoint
    more than :data:`OUTSIDE_SLACK` of the image size outside it is an error (the file is
    for other images or another resolution); one outside by less is kept but made
    invisible (as the transforms do with points that leave the image); a file whose visible
    coordinates are all within [0, 1] is an error (normalised, not pixels).

    An image without an entry gets all-invisible keypoints (zeros) and is counted in one
    warning; entries matching no image are counted in another (entries for image files
    the parser leaves out on purpose, such as junk boxes, only in the notes). Entries
    matching none of the dataset's images, two entries for one image, or one key naming
    two images are errors.

    Args:
        splits: ``{"train": [...], "query": [...], "gallery": [...]}``.
        path: the keypoint file (:func:`read_keypoint_file`).
        dataset: dataset name for messages.
        dataset_dir: the dataset folder, for keys relative to it.
        images: COCO images list file (see :func:`read_keypoint_file`).
        score_threshold: COCO results: confidence at which a keypoint is visible.
        num_workers: threads reading image headers.

    Returns:
        ``(splits, notes)``: new records (the input is not modified) and remarks for
        the dataset's notes.
    """
    table = read_keypoint_file(path, images=images, score_threshold=score_threshold)
    dataset_dir = os.path.abspath(dataset_dir) if dataset_dir else ""
    index: dict[str, set[str]] = {}
    for records in splits.values():
        for r in records:
            for s in _suffixes(r.path, dataset_dir):
                index.setdefault(s, set()).add(r.path)

    assigned: dict[str, str] = {}  # image path -> key
    unmatched: list[str] = []
    for key in table.entries:
        parts = [p for p in _normalise_key(key).split("/") if p]
        # the longest trailing part of the key that names an image: keys written on another
        # machine (/data/market1501/query/x.jpg) still match query/x.jpg here
        hits = next(
            (index[k] for k in ("/".join(parts[i:]) for i in range(len(parts))) if k in index),
            None,
        )
        if not hits:
            unmatched.append(key)
            continue
        if len(hits) > 1:
            shown = sorted(hits)[:2]
            raise KeypointFileError(
                f"{dataset}: keypoint file {path}: record {key!r} names {len(hits)} different "
                f"images ({shown[0]}, {shown[1]}); key the file by the path relative to the "
                f"dataset folder {dataset_dir or '(unknown)'}"
            )
        (image,) = hits
        if image in assigned:
            raise KeypointFileError(
                f"{dataset}: keypoint file {path}: records {assigned[image]!r} and {key!r} are "
                f"both for image {image}; keep one record per image"
            )
        assigned[image] = key
    total_images = len({r.path for recs in splits.values() for r in recs})
    if table.entries and not assigned:
        example = next((r.path for recs in splits.values() for r in recs), "")
        raise KeypointFileError(
            f"{dataset}: keypoint file {path}: none of its {len(table.entries)} records "
            f"matches one of the dataset's {total_images} images (records like "
            f"{_listed(unmatched[:2])}; images like {example!r}); is it for another "
            "dataset? Keys must be file names or paths relative to the dataset folder"
        )

    images = sorted(assigned)
    sizes = _image_sizes(images, num_workers)
    rows: dict[str, np.ndarray] = {}
    hidden = 0
    if images:
        kp = np.stack([table.entries[assigned[im]] for im in images])  # (N, 17, 3), a copy
        wh = np.asarray([sizes[im] for im in images], dtype=np.float64)[:, None, :]  # (N, 1, 2)
        xy, vis = kp[..., :2], kp[..., 2] > 0
        far = vis & ((xy < -OUTSIDE_SLACK * wh) | (xy > (1 + OUTSIDE_SLACK) * wh)).any(-1)
        if far.any():
            i, k = (int(v) for v in np.argwhere(far)[0])
            (x, y), (w, h) = xy[i, k], sizes[images[i]]
            raise KeypointFileError(
                f"{dataset}: keypoint file {path}: record {assigned[images[i]]!r}: visible "
                f"keypoint {k} ({COCO_KEYPOINT_NAMES[k]}) at ({x:g}, {y:g}) is far outside "
                f"the {w}x{h} image {images[i]}; coordinates must be pixels of the stored image"
            )
        max_visible = float(np.abs(xy[vis]).max()) if vis.any() else math.inf
        outside = vis & ((xy < 0) | (xy > wh)).any(-1)
        hidden = int(outside.sum())
        kp[..., 2][outside] = 0
        if (
            int((kp[..., 2] > 0).sum()) >= NUM_KEYPOINTS
            and max_visible <= 1.0
            and float(np.median(wh.max(-1))) > 4
        ):
            raise KeypointFileError(
                f"{dataset}: keypoint file {path}: every visible coordinate is within [0, 1] "
                "but the images are larger: the file looks normalised; write pixel "
                "coordinates of the stored image"
            )
        rows = dict(zip(images, kp))

    out: dict[str, list[ImageRecord]] = {}
    missing: dict[str, int] = {}
    first_missing = ""
    for split, records in splits.items():
        new = []
        for r in records:
            arr = rows.get(r.path)
            if arr is None:
                missing[split] = missing.get(split, 0) + 1
                first_missing = first_missing or r.path
                kp = [[0.0, 0.0, 0.0] for _ in range(NUM_KEYPOINTS)]
            else:
                kp = arr.tolist()
            new.append(replace(r, extras={**r.extras, "keypoints": kp}))
        out[split] = new

    notes = [
        f"keypoints from {path} ({table.format}): "
        + ", ".join(
            f"{split} {len(recs) - missing.get(split, 0)}/{len(recs)}"
            for split, recs in splits.items()
        )
    ]
    notes += [f"keypoint file {path}: {n}" for n in table.notes]
    if hidden:
        notes.append(
            f"keypoint file {path}: {hidden} visible keypoint(s) slightly outside their "
            "image made invisible"
        )
    n_missing = sum(missing.values())
    if n_missing:
        per_split = ", ".join(f"{s} {n}" for s, n in missing.items())
        msg = (
            f"{dataset}: keypoint file {path} has no record for {n_missing} image(s) "
            f"({per_split}; first: {first_missing}); they get all-invisible keypoints"
        )
        notes.append(msg)
        warnings.warn(msg, stacklevel=3)
    left_out = _left_out(unmatched, splits, dataset_dir)
    if left_out:
        notes.append(
            f"keypoint file {path}: {len(left_out)} record(s) for image files the dataset "
            f"leaves out (junk boxes, skipped images), e.g. {left_out[0]!r}"
        )
    left_set = set(left_out)
    unmatched = [k for k in unmatched if k not in left_set]
    if unmatched:
        msg = (
            f"{dataset}: keypoint file {path}: {len(unmatched)} record(s) match no image of "
            f"the dataset: {_listed(unmatched)}"
        )
        notes.append(msg)
        warnings.warn(msg, stacklevel=3)
    return out, notes


def _left_out(
    keys: Sequence[str], splits: Mapping[str, list[ImageRecord]], dataset_dir: str
) -> list[str]:
    """The unmatched keys that name an existing file in the dataset folder or next to its
    images: images the parser dropped on purpose (junk pid -1, ``skip_corrupt``), not a
    sign of a wrong file."""
    if not keys:
        return []
    folders = sorted({os.path.dirname(r.path) for recs in splits.values() for r in recs})
    if len(folders) > 16:  # per-identity folders (MSMT17): only keys relative to the dataset
        folders = []
    out = []
    for key in keys:
        norm = _normalise_key(key)
        candidates = [os.path.join(dataset_dir, norm)] if dataset_dir else []
        candidates += [os.path.join(f, os.path.basename(norm)) for f in folders]
        if any(os.path.isfile(c) for c in candidates):
            out.append(key)
    return out


# ------------------------------------------------------------------------ consuming
def normalize_keypoints(keypoints: Tensor, height: int, width: int) -> Tensor:
    """Pixel keypoints of an ``height x width`` image -> normalised ``[0, 1]`` coordinates.

    Args:
        keypoints: (..., 17, 3) ``(x, y, visibility)`` in pixels (continuous convention:
            the image spans ``[0, width] x [0, height]``), e.g. ``batch["keypoints"]``.
        height, width: the image size, e.g. ``batch["image"].shape[-2:]``.

    Returns:
        A new tensor with ``x / width``, ``y / height``; visibility unchanged.
    """
    import torch

    if keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be (..., K, 3), got {tuple(keypoints.shape)}")
    scale = torch.tensor([1.0 / width, 1.0 / height, 1.0], dtype=keypoints.dtype)
    return keypoints * scale.to(keypoints.device)


# -------------------------------------------------------------------------- writing
def write_json_atomic(path: str | os.PathLike, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON through a temporary file in the same folder, then rename.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
