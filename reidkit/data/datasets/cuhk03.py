"""CUHK03, labeled or detected boxes, new (767/700) or classic (1,367/100) protocol.

Two sources are accepted:

* ``np``: the widely shared CUHK03-NP folders (new protocol already applied)::

      <root>/cuhk03-np/{labeled,detected}/{bounding_box_train,query,bounding_box_test}/

  with Market-style names (``0001_c1_1.png``).
* ``mat``: the original release plus the new-protocol split files (torchreid layout)::

      <root>/cuhk03/cuhk03_release/cuhk-03.mat                   (MATLAB v7.3 = HDF5)
      <root>/cuhk03/cuhk03_new_protocol_config_labeled.mat       (scipy.io.loadmat)
      <root>/cuhk03/cuhk03_new_protocol_config_detected.mat

  The boxes of the requested variant are converted once to PNGs in
  ``<root>/cuhk03/images_<variant>/`` named ``<pair>_<pid:03d>_<view>_<img:02d>.png``
  (pair 1..5, pid 1-based within the pair, view 1/2, image 1..10), which are the names
  used in the split files' ``filelist``. Reading ``cuhk-03.mat`` needs ``h5py``
  (``pip install reidkit[cuhk03]``).

camid is the view within the camera pair (0 or 1), as in the usual protocol code.
"""

from __future__ import annotations

import importlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from reidkit.data.datasets.base import (
    DatasetError,
    LoadOptions,
    ParsedDataset,
    finalize_dataset,
    find_dataset_dir,
    resolve_child,
)
from reidkit.data.datasets.market import MARKET_FOLDERS, parse_market_layout
from reidkit.data.records import ImageRecord

__all__ = ["load_cuhk03", "convert_cuhk03_mat"]

_VARIANTS = ("labeled", "detected")
_MAT = "cuhk03_release/cuhk-03.mat"
_CONVERTED_NAME = re.compile(r"^(\d)_(\d{3})_([12])_(\d{2})\.png$")
_MARKER = ".complete"


def _import_optional(module: str, purpose: str, package: str, alternative: str = "") -> Any:
    """Import ``module`` of the ``cuhk03`` extra, or a :class:`DatasetError` that says what
    needs ``package`` (``purpose``) and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DatasetError(
            f"cuhk03: {purpose} needs {package}: pip install 'reidkit[cuhk03]'{alternative}"
        ) from exc


def _import_h5py() -> Any:
    return _import_optional(
        "h5py",
        "reading the original cuhk-03.mat (MATLAB v7.3)",
        "h5py",
        " (or use the cuhk03-np folders)",
    )


def _refs(ds: Any) -> np.ndarray:
    """An HDF5 dataset of object references as a flat numpy array of references."""
    return np.asarray(ds[()]).ravel()


def _image_name(pair: int, pid: int, view: int, img: int) -> str:
    """All arguments 1-based; e.g. ``1_001_1_01.png``."""
    return f"{pair}_{pid:03d}_{view}_{img:02d}.png"


def convert_cuhk03_mat(
    mat_path: str | os.PathLike,
    variant: Literal["labeled", "detected"],
    out_dir: str | os.PathLike,
    num_workers: int = 8,
) -> list[int]:
    """Write every ``variant`` box of ``cuhk-03.mat`` as a PNG in ``out_dir`` (once).

    MATLAB stores the ``variant`` cell as 5 camera pairs, each a (num_pids, 10) cell of
    H x W x 3 uint8 images (columns 0-4: view 1, 5-9: view 2; empty cells are missing
    boxes). HDF5 keeps MATLAB arrays transposed, so each image is read as (3, W, H).

    Returns:
        The number of identities of each camera pair (used to number pids globally).
        A ``.complete`` marker makes later calls only re-read these counts.
    """
    h5py = _import_h5py()
    out = Path(out_dir)
    marker = out / _MARKER
    try:
        f = h5py.File(mat_path, "r")
    except OSError as exc:
        raise DatasetError(f"cuhk03: cannot open {mat_path} as MATLAB v7.3/HDF5: {exc}") from exc
    with f:
        if variant not in f:
            raise DatasetError(
                f"cuhk03: {mat_path} has no '{variant}' cell (found: {sorted(f.keys())})"
            )
        pairs = [f[r] for r in _refs(f[variant])]
        counts = [int(p.shape[1]) if p.ndim == 2 else 0 for p in pairs]
        if marker.is_file():
            return counts
        out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            futures = []
            for pair_idx, pair in enumerate(pairs):
                if pair.ndim != 2:
                    raise DatasetError(
                        f"cuhk03: {mat_path}: '{variant}' pair {pair_idx + 1} is not a 2-D cell "
                        f"array (shape {pair.shape})"
                    )
                cells = np.asarray(pair[()]).T  # (num_pids, 10) references
                for pid_idx in range(cells.shape[0]):
                    for img_idx in range(cells.shape[1]):
                        arr = np.asarray(f[cells[pid_idx, img_idx]][()])
                        if arr.ndim != 3 or arr.size == 0:
                            continue  # empty cell: no box for this slot
                        img = np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.uint8)
                        view = 1 if img_idx < 5 else 2
                        name = _image_name(pair_idx + 1, pid_idx + 1, view, img_idx + 1)
                        futures.append(pool.submit(_save_png, img, out / name))
            for fut in futures:
                fut.result()
    marker.write_text(f"{len(futures)} images converted from {mat_path}\n")
    return counts


def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path)


def _flat(value: Any) -> list[Any]:
    """Unwrap scipy.io.loadmat cells/arrays into a flat Python list of scalars/strings."""
    out: list[Any] = []
    for item in np.asarray(value).ravel():
        if isinstance(item, np.ndarray):
            out.extend(_flat(item))
        elif isinstance(item, bytes):
            out.append(item.decode())
        elif isinstance(item, np.generic):
            out.append(item.item())
        else:
            out.append(item)
    return out


def _new_protocol(
    split_file: Path, image_dir: Path
) -> tuple[dict[str, list[ImageRecord]], dict[str, str]]:
    sio = _import_optional("scipy.io", "reading the new-protocol split files", "scipy")
    try:
        mat = sio.loadmat(str(split_file))
    except Exception as exc:  # scipy raises several types for bad files
        raise DatasetError(f"cuhk03: cannot read split file {split_file}: {exc}") from exc
    required = ("train_idx", "query_idx", "gallery_idx", "labels", "filelist")
    missing = [k for k in required if k not in mat]
    if missing:
        raise DatasetError(
            f"cuhk03: split file {split_file} lacks field(s) {missing}; expected "
            f"{list(required)} (+ camId)"
        )
    files = [str(x) for x in _flat(mat["filelist"])]
    labels = [int(x) for x in _flat(mat["labels"])]
    cams = [int(x) for x in _flat(mat["camId"])] if "camId" in mat else None
    if len(labels) != len(files) or (cams is not None and len(cams) != len(files)):
        raise DatasetError(
            f"cuhk03: split file {split_file}: filelist ({len(files)}), labels "
            f"({len(labels)}) and camId ({len(cams) if cams else '-'}) lengths differ"
        )
    splits: dict[str, list[ImageRecord]] = {}
    for split in ("train", "query", "gallery"):
        idx = [int(x) for x in _flat(mat[f"{split}_idx"])]
        bad = [i for i in idx if not 1 <= i <= len(files)]
        if bad:
            raise DatasetError(
                f"cuhk03: split file {split_file}: {split}_idx has {len(bad)} index(es) outside "
                f"1..{len(files)} (1-based), e.g. {bad[:5]}"
            )
        records = []
        for i in idx:
            name = files[i - 1]
            if cams is not None:
                cam = cams[i - 1] - 1
            else:
                m = _CONVERTED_NAME.match(name)
                cam = int(m.group(3)) - 1 if m else -1
            records.append(ImageRecord(str(image_dir / name), labels[i - 1], cam))
        splits[split] = records
    src = str(split_file)
    return splits, {"train": src, "query": src, "gallery": src}


def _classic(
    mat_path: Path, variant: str, image_dir: Path, counts: list[int], split_id: int
) -> tuple[dict[str, list[ImageRecord]], dict[str, str]]:
    """Classic protocol: split ``split_id`` of the 20 in ``testsets`` (100 test ids); query
    and gallery are both the test images, separated by view through camera filtering."""
    h5py = _import_h5py()
    with h5py.File(mat_path, "r") as f:
        if "testsets" not in f:
            raise DatasetError(f"cuhk03: {mat_path} has no 'testsets' cell (classic splits)")
        refs = _refs(f["testsets"])
        if not 0 <= split_id < len(refs):
            raise DatasetError(
                f"cuhk03: split_id {split_id} out of range, {mat_path} has {len(refs)} splits"
            )
        pairs = np.asarray(f[refs[split_id]][()]).T.reshape(-1, 2).astype(int)  # (N, 2)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    test = {int(offsets[p - 1] + i) for p, i in pairs}
    train, test_records = [], []
    for name in sorted(os.listdir(image_dir)):
        m = _CONVERTED_NAME.match(name)
        if m is None:
            continue
        pair, pid, view = int(m.group(1)), int(m.group(2)), int(m.group(3))
        gpid = int(offsets[pair - 1] + pid)
        rec = ImageRecord(str(image_dir / name), gpid, view - 1)
        (test_records if gpid in test else train).append(rec)
    src = f"{mat_path} (testsets[{split_id}])"
    return (
        {"train": train, "query": list(test_records), "gallery": list(test_records)},
        {"train": src, "query": src, "gallery": src},
    )


def load_cuhk03(
    root: str | os.PathLike,
    opts: LoadOptions,
    variant: Literal["labeled", "detected"] = "labeled",
    source: Literal["auto", "np", "mat"] = "auto",
    classic_split: bool = False,
    split_id: int = 0,
) -> ParsedDataset:
    """CUHK03 (new protocol: 767 train ids / 7,368 labeled images; 700 test ids, 1,400
    query and 5,328 gallery labeled images).

    Args:
        variant: ``labeled`` (hand-drawn boxes) or ``detected`` (DPM boxes).
        source: ``auto`` prefers the CUHK03-NP folders, then the ``.mat`` files.
        classic_split: the old 20-split protocol (needs the ``.mat`` source).
        split_id: which classic split (0..19).
    """
    if variant not in _VARIANTS:
        raise DatasetError(f"cuhk03: variant must be 'labeled' or 'detected', got {variant!r}")
    if source not in ("auto", "np", "mat"):
        raise DatasetError(f"cuhk03: source must be 'auto', 'np' or 'mat', got {source!r}")
    errors: list[str] = []
    if source in ("auto", "np") and not classic_split:
        try:
            ddir = find_dataset_dir(
                root,
                [
                    f"cuhk03-np/{variant}",
                    f"cuhk03/cuhk03-np/{variant}",
                    f"cuhk03_np/{variant}",
                    f"cuhk03/{variant}",
                    variant,
                    "",
                ],
                list(MARKET_FOLDERS.values()),
                "cuhk03 (np)",
                f"<root>/cuhk03-np/{variant}/{{bounding_box_train,query,bounding_box_test}}/"
                "<pid>_c<cam>_<n>.png",
            )
        except DatasetError as exc:
            errors.append(str(exc))
        else:
            return parse_market_layout(
                "cuhk03",
                root,
                ddir,
                opts,
                None,
                "'<pid>_c<cam>_<n>.png, e.g. 0001_c1_1.png'",
                notes=(f"CUHK03-NP {variant}",),
            )
    if source in ("auto", "mat"):
        split_name = f"cuhk03_new_protocol_config_{variant}.mat"
        required = [_MAT] if classic_split else [_MAT, split_name]
        try:
            ddir = find_dataset_dir(
                root,
                ["cuhk03", "CUHK03", ""],
                required,
                "cuhk03 (mat)",
                f"<root>/cuhk03/{_MAT} + <root>/cuhk03/{split_name}",
            )
        except DatasetError as exc:
            errors.append(str(exc))
        else:
            mat_path = resolve_child(ddir, _MAT)
            assert mat_path is not None
            image_dir = ddir / f"images_{variant}"
            counts = convert_cuhk03_mat(mat_path, variant, image_dir, opts.num_workers)
            if classic_split:
                splits, sources = _classic(mat_path, variant, image_dir, counts, split_id)
                note = f"CUHK03 {variant}, classic split {split_id}"
            else:
                split_file = resolve_child(ddir, split_name)
                assert split_file is not None
                splits, sources = _new_protocol(split_file, image_dir)
                note = f"CUHK03 {variant}, new protocol (767/700)"
            return finalize_dataset("cuhk03", root, ddir, splits, opts, sources, [note])
    if classic_split and source == "np":
        errors.append("cuhk03: the classic split needs the original cuhk-03.mat (source='mat')")
    raise DatasetError(" | ".join(errors))
