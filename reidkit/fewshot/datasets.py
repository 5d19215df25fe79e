"""Few-shot classification datasets: miniImageNet, tieredImageNet and any re-ID dataset.

Every loader returns a :class:`FewShotDataset` whose splits (``train``, ``val``, ``test``)
are :class:`FewShotSplit`\\ s: integer class labels ``0..C-1`` per image plus the images as
file paths, an in-memory ``(N, H, W, 3)`` uint8 array (pickle / npz caches) or encoded
bytes (tieredImageNet's PNG pickle). Classes of different splits are disjoint.

Layouts (``data.format``; ``auto`` takes the first one found, in this order):

- ``csv``: ``<dir>/images/*.jpg`` and ``<dir>/{train,val,test}.csv`` with the header
  ``filename,label`` (Ravi & Larochelle's split files for miniImageNet);
- ``folders``: ``<dir>/{train,val,test}/<class>/*.{jpg,jpeg,png}`` (the layout the CAN code
  reads; tieredImageNet's usual image release);
- ``pickle``: miniImageNet ``mini-imagenet-cache-{train,val,test}.pkl`` (``image_data``,
  ``class_dict``) or ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``
  (``data``, ``labels``; the CAN code's); tieredImageNet ``{split}_images.npz`` (``images``)
  or ``{split}_images_png.pkl`` with ``{split}_labels.pkl`` (``label_specific``, optional
  ``label_specific_str``). Pickles are read with :func:`~reidkit.fewshot.safe_pickle.
  safe_load_pickle` (no code is ever executed) and ``.npz`` with ``allow_pickle=False``.

``dataset=reid`` turns a reidkit re-ID dataset into a few-shot set: identities are
classes; the train identities form the ``train`` split, the test identities (query and
gallery images together) the ``test`` split. Junk (pid -1) and distractors are left out.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reidkit.data.datasets.base import DatasetError
from reidkit.fewshot.safe_pickle import safe_load_pickle

__all__ = [
    "FewShotDataset",
    "FewShotSplit",
    "load_fewshot_dataset",
    "load_mini_imagenet",
    "load_tiered_imagenet",
    "load_reid_as_fewshot",
]

SPLITS = ("train", "val", "test")
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: re-ID datasets whose pid 0 marks distractors (Market-1501 layout)
_DISTRACTOR_ZERO = {"market1501", "synth"}


@dataclass
class FewShotSplit:
    """The images of one split and their class labels.

    Exactly one of ``paths`` (files), ``array`` (``(N, H, W, 3)`` uint8) and ``encoded``
    (PNG/JPEG data as bytes or 1-D uint8 arrays) holds the images. ``labels``: ``(N,)`` int64 in ``0..C-1``;
    ``class_names[c]`` names class ``c``; ``source`` says where it was read from.
    """

    name: str
    labels: np.ndarray
    class_names: list[str]
    source: str
    paths: list[str] | None = None
    array: np.ndarray | None = None
    encoded: Sequence[Any] | None = None  # bytes or 1-D uint8 arrays of PNG/JPEG data

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        held = [x is not None for x in (self.paths, self.array, self.encoded)]
        if sum(held) != 1:
            raise ValueError("FewShotSplit: give exactly one of paths, array, encoded")
        n = len(self.paths or self.encoded or []) if self.array is None else len(self.array)
        if n != len(self.labels):
            raise DatasetError(
                f"{self.source}: {n} images but {len(self.labels)} labels in split {self.name}"
            )
        if n == 0:
            raise DatasetError(f"{self.source}: the {self.name} split is empty")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DatasetError(
                f"{self.source}: labels of split {self.name} must lie in 0.."
                f"{len(self.class_names) - 1}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """``(C,)`` number of images of each class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def load(self, index: int) -> Image.Image | torch.Tensor:
        """Image ``index`` as a PIL RGB image (files, encoded) or a ``(3, H, W)`` uint8
        tensor (arrays); both feed :mod:`reidkit.data.transforms` directly."""
        if self.array is not None:
            return torch.from_numpy(np.ascontiguousarray(self.array[index])).permute(2, 0, 1)
        try:
            if self.paths is not None:
                with Image.open(self.paths[index]) as img:
                    return img.convert("RGB")
            data = self.encoded[index]  # type: ignore[index]
            if isinstance(data, np.ndarray):
                data = data.tobytes()
            with Image.open(io.BytesIO(bytes(data))) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            where = self.paths[index] if self.paths is not None else f"image {index}"
            raise DatasetError(f"{self.source}: cannot read {where}: {exc}") from exc


@dataclass
class FewShotDataset:
    """The splits of one few-shot dataset (``val`` may be missing, e.g. for re-ID sets)."""

    name: str
    root: str
    splits: dict[str, FewShotSplit]
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> FewShotSplit:
        if name not in self.splits:
            raise DatasetError(
                f"{self.name} ({self.root}) has no '{name}' split (it has: "
                f"{', '.join(self.splits)})"
            )
        return self.splits[name]

    def summary(self) -> str:
        """A table of classes and images per split."""
        lines = [f"=> {self.name} ({self.root})", "  split | # classes | # images"]
        for name, s in self.splits.items():
            lines.append(f"  {name:5s} | {s.num_classes:9d} | {len(s):8d}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
def _relabel(names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-image class names -> labels 0..C-1 in sorted name order, and the names."""
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names)), classes


def _find_dir(root: Path, candidates: Sequence[str], probe: Any) -> Path | None:
    for cand in candidates:
        base = root / cand if cand else root
        if base.is_dir() and probe(base):
            return base
    return None


def _check_disjoint(dataset: str, splits: dict[str, FewShotSplit]) -> None:
    seen: dict[str, str] = {}
    for name, s in splits.items():
        for c in s.class_names:
            if c in seen:
                raise DatasetError(
                    f"{dataset}: class {c!r} is in both the {seen[c]} and the {name} split "
                    "(few-shot splits must have disjoint classes)"
                )
            seen[c] = name


# ---------------------------------------------------------------------------- layouts
def _read_csv_split(csv_path: Path, image_dir: Path, name: str, dataset: str) -> FewShotSplit:
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise DatasetError(
            f"{dataset}: {csv_path}: expected the header 'filename,label' (Ravi & Larochelle "
            f"split file), got {rows[0] if rows else 'an empty file'}"
        )
    paths, names, bad = [], [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            bad.append(f"line {lineno}: {row}")
            continue
        paths.append(str(image_dir / row[0].strip()))
        names.append(row[1].strip())
    if bad:
        raise DatasetError(
            f"{dataset}: {csv_path}: {len(bad)} malformed row(s), expected 'filename,label': "
            + "; ".join(bad[:5])
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing)} image(s) listed in {csv_path} are missing from "
            f"{image_dir} (e.g. {', '.join(missing[:3])})"
        )
    labels, classes = _relabel(names)
    return FewShotSplit(name, labels, classes, str(csv_path), paths=paths)


def _csv_layout(ddir: Path, dataset: str, splits: Sequence[str]) -> dict[str, FewShotSplit]:
    image_dir = ddir / "images"
    return {s: _read_csv_split(ddir / f"{s}.csv", image_dir, s, dataset) for s in splits}


def _read_folder_split(folder: Path, name: str, dataset: str) -> FewShotSplit:
    paths, names = [], []
    for cls in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        files = sorted(
            e.name
            for e in os.scandir(folder / cls)
            if e.is_file() and e.name.lower().endswith(_IMAGE_EXT)
        )
        paths += [str(folder / cls / f) for f in files]
        names += [cls] * len(files)
    if not paths:
        raise DatasetError(
            f"{dataset}: {folder} holds no images in class sub-folders (expected "
            f"{folder}/<class>/*.jpg)"
        )
    labels, classes = _relabel(names)
    return FewShotSplit(name, labels, classes, str(folder), paths=paths)


def _folder_layout(ddir: Path, dataset: str, splits: Sequence[str]) -> dict[str, FewShotSplit]:
    return {s: _read_folder_split(ddir / s, s, dataset) for s in splits}


def _as_image_array(arr: Any, source: str, key: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4:
        shape = getattr(arr, "shape", None)
        raise DatasetError(
            f"{source}: '{key}' must be a uint8 array (N, H, W, 3), got "
            f"{type(arr).__name__} {getattr(arr, 'dtype', '')} {shape}"
        )
    if arr.shape[-1] != 3:
        raise DatasetError(f"{source}: '{key}' must end with 3 colour channels, got {arr.shape}")
    return arr


def _mini_cache_split(path: Path, name: str) -> FewShotSplit:
    """``mini-imagenet-cache-<split>.pkl``: {"image_data": (N, 84, 84, 3), "class_dict":
    {class: [indices]}}."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
        raise DatasetError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    images = _as_image_array(obj["image_data"], str(path), "image_data")
    class_dict = obj["class_dict"]
    names = np.full(len(images), "", dtype=object)
    for cls, idx in class_dict.items():
        names[np.asarray(idx, dtype=np.int64)] = str(cls)
    if (names == "").any():
        raise DatasetError(f"{path}: {int((names == '').sum())} images have no class in class_dict")
    labels, classes = _relabel(list(names))
    return FewShotSplit(name, labels, classes, str(path), array=images)


def _mini_category_split(path: Path, name: str) -> FewShotSplit:
    """``miniImageNet_category_split_*.pickle``: {"data": (N, 84, 84, 3), "labels": [...]}
    (labels are global ImageNet-subset ids; ``catname2label`` maps names when present)."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
        raise DatasetError(f"{path}: expected a dict with 'data' and 'labels'")
    images = _as_image_array(obj["data"], str(path), "data")
    raw = [int(x) for x in np.asarray(obj["labels"]).reshape(-1)]
    to_name = {int(v): str(k) for k, v in (obj.get("catname2label") or {}).items()}
    names = [to_name.get(x, f"class_{x:04d}") for x in raw]
    labels, classes = _relabel(names)
    return FewShotSplit(name, labels, classes, str(path), array=images)


_MINI_CATEGORY = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}


def _mini_pickle_layout(ddir: Path, dataset: str, splits: Sequence[str]) -> dict:
    if all((ddir / f"mini-imagenet-cache-{s}.pkl").is_file() for s in splits):
        return {s: _mini_cache_split(ddir / f"mini-imagenet-cache-{s}.pkl", s) for s in splits}
    return {s: _mini_category_split(ddir / _MINI_CATEGORY[s], s) for s in splits}


def _tiered_labels(path: Path) -> list[str]:
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict) or "label_specific" not in obj:
        raise DatasetError(f"{path}: expected a dict with 'label_specific' (per-image labels)")
    raw = np.asarray(obj["label_specific"]).reshape(-1).astype(np.int64)
    names_str = obj.get("label_specific_str")
    if names_str is not None and len(names_str) > int(raw.max()):
        return [str(names_str[i]) for i in raw]
    return [f"class_{i:04d}" for i in raw]


def _tiered_pickle_split(ddir: Path, name: str) -> FewShotSplit:
    labels_path = ddir / f"{name}_labels.pkl"
    names = _tiered_labels(labels_path)
    labels, classes = _relabel(names)
    npz = ddir / f"{name}_images.npz"
    if npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as z:
                key = "images" if "images" in z.files else z.files[0]
                images = _as_image_array(z[key], str(npz), key)
        except ValueError as exc:  # object arrays need pickle: refused
            raise DatasetError(f"{npz}: cannot read without unpickling: {exc}") from exc
        return FewShotSplit(name, labels, classes, str(npz), array=images)
    png = ddir / f"{name}_images_png.pkl"
    encoded = safe_load_pickle(png)
    if not isinstance(encoded, list | tuple):
        raise DatasetError(f"{png}: expected a list of encoded images")
    return FewShotSplit(name, labels, classes, str(png), encoded=encoded)


def _tiered_pickle_layout(ddir: Path, dataset: str, splits: Sequence[str]) -> dict:
    return {s: _tiered_pickle_split(ddir, s) for s in splits}


def _probe_csv(d: Path) -> bool:
    return (d / "images").is_dir() and all((d / f"{s}.csv").is_file() for s in SPLITS)


def _probe_folders(d: Path) -> bool:
    return all((d / s).is_dir() for s in SPLITS)


def _probe_mini_pickle(d: Path) -> bool:
    return all((d / f"mini-imagenet-cache-{s}.pkl").is_file() for s in SPLITS) or all(
        (d / f).is_file() for f in _MINI_CATEGORY.values()
    )


def _probe_tiered_pickle(d: Path) -> bool:
    return all(
        (d / f"{s}_labels.pkl").is_file()
        and ((d / f"{s}_images.npz").is_file() or (d / f"{s}_images_png.pkl").is_file())
        for s in SPLITS
    )


def _load_imagenet_subset(
    dataset: str,
    root: str | os.PathLike,
    fmt: str,
    candidates: Sequence[str],
    pickle_probe: Any,
    pickle_layout: Any,
    pickle_desc: str,
) -> FewShotDataset:
    layouts = {
        "csv": (_probe_csv, _csv_layout, "<dir>/images/*.jpg + <dir>/{train,val,test}.csv"),
        "folders": (_probe_folders, _folder_layout, "<dir>/{train,val,test}/<class>/*.jpg"),
        "pickle": (pickle_probe, pickle_layout, pickle_desc),
    }
    order = list(layouts) if fmt == "auto" else [fmt]
    root_path = Path(root).expanduser()
    for name in order:
        probe, read, _ = layouts[name]
        ddir = _find_dir(root_path, candidates, probe)
        if ddir is not None:
            splits = read(ddir, dataset, SPLITS)
            _check_disjoint(dataset, splits)
            return FewShotDataset(dataset, str(ddir), splits, [f"layout: {name}"])
    tried = [str(root_path / c) if c else str(root_path) for c in candidates]
    expected = "\n  ".join(f"{n}: {layouts[n][2]}" for n in order)
    raise DatasetError(
        f"{dataset}: dataset not found under data root {str(root_path)!r} "
        f"(data.format={fmt}).\nExpected one of:\n  {expected}\nTried:\n  "
        + "\n  ".join(tried)
        + "\nSee docs/fewshot.md for how to prepare it."
    )


def load_mini_imagenet(root: str | os.PathLike, fmt: str = "auto") -> FewShotDataset:
    """miniImageNet (64 / 16 / 20 classes of 600 images) from ``root`` or a folder
    ``mini-imagenet``, ``miniImageNet``, ``mini_imagenet``, ``miniimagenet`` under it."""
    return _load_imagenet_subset(
        "mini_imagenet",
        root,
        fmt,
        ["", "mini-imagenet", "miniImageNet", "mini_imagenet", "miniimagenet", "MiniImagenet"],
        _probe_mini_pickle,
        _mini_pickle_layout,
        "<dir>/mini-imagenet-cache-{train,val,test}.pkl or "
        "<dir>/miniImageNet_category_split_{train_phase_train,val,test}.pickle",
    )


def load_tiered_imagenet(root: str | os.PathLike, fmt: str = "auto") -> FewShotDataset:
    """tieredImageNet (351 / 97 / 160 classes) from ``root`` or a folder
    ``tiered-imagenet``, ``tieredImageNet``, ``tiered_imagenet``, ``tieredimagenet`` under it."""
    return _load_imagenet_subset(
        "tiered_imagenet",
        root,
        fmt,
        [
            "",
            "tiered-imagenet",
            "tieredImageNet",
            "tiered_imagenet",
            "tieredimagenet",
            "tieredImagenet",
        ],
        _probe_tiered_pickle,
        _tiered_pickle_layout,
        "<dir>/{train,val,test}_images.npz (or _images_png.pkl) + <dir>/{split}_labels.pkl",
    )


def load_reid_as_fewshot(
    name: str,
    root: str | os.PathLike,
    options: dict[str, Any] | None = None,
    exclude_pids: Sequence[int] | None = None,
) -> FewShotDataset:
    """A reidkit re-ID dataset as a few-shot set: identities are classes.

    ``train``: the train identities (their images); ``test``: the test identities (query and
    gallery images together). ``exclude_pids`` drops identities (default: pid 0, the
    distractor label, for Market-layout sets such as ``market1501`` and ``synth``); junk
    boxes (pid -1) are never included. There is no ``val`` split.
    """
    from reidkit.data.datasets import build_dataset

    ds = build_dataset(name, root, **(options or {}))
    key = ds.name  # the registry name (aliases resolved)
    if exclude_pids is None:
        exclude_pids = [0] if key in _DISTRACTOR_ZERO else []
    excluded = set(int(p) for p in exclude_pids)
    train = [r for r in ds.train if r.pid >= 0]
    test = [r for r in (*ds.query, *ds.gallery) if r.pid >= 0 and r.pid not in excluded]
    splits: dict[str, FewShotSplit] = {}
    for split, records in (("train", train), ("test", test)):
        names = [f"{split}_{r.pid:05d}" for r in records]
        labels, classes = _relabel(names)
        splits[split] = FewShotSplit(
            split, labels, classes, f"{key} ({ds.root}) {split}", paths=[r.path for r in records]
        )
    notes = [
        f"re-ID set {key}: identities are classes; test = query + gallery images"
        + (f"; excluded pids {sorted(excluded)}" if excluded else "")
    ]
    return FewShotDataset(f"{key} (few-shot)", str(ds.root), splits, notes)


def load_fewshot_dataset(data_cfg: Any) -> FewShotDataset:
    """The dataset of a ``FewShotDataConfig`` (``cfg.data``)."""
    if data_cfg.dataset == "mini_imagenet":
        return load_mini_imagenet(data_cfg.root, data_cfg.format)
    if data_cfg.dataset == "tiered_imagenet":
        return load_tiered_imagenet(data_cfg.root, data_cfg.format)
    if data_cfg.dataset == "reid":
        return load_reid_as_fewshot(
            data_cfg.reid_name, data_cfg.root, data_cfg.reid_options, data_cfg.reid_exclude_pids
        )
    raise ValueError(f"data.dataset: unknown few-shot dataset {data_cfg.dataset!r}")
