"""MSMT17 (V1 and V2).

Layout (inside ``MSMT17_V1`` / ``MSMT17_V2``)::

    V1: train/ test/                  V2: mask_train_v2/ mask_test_v2/
    list_train.txt list_val.txt list_query.txt list_gallery.txt   (both versions)

List lines are ``<pid>/<pid>_<idx>_<cam:02d>_<date><time>_<n>_<m>.jpg <label>``; the label
is the identity, the camera (1..15) is the third ``_`` field of the file name. Train and
val lists are both relative to the train folder, query and gallery to the test folder.
The standard training set (1,041 ids / 32,621 images) is train+val, so ``merge_val``
defaults to True; test: 3,060 ids, 11,659 query and 82,161 gallery images.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from reidkit.data.datasets.base import (
    DatasetError,
    LoadOptions,
    ParsedDataset,
    finalize_dataset,
    find_dataset_dir,
    resolve_child,
)
from reidkit.data.records import ImageRecord

__all__ = ["load_msmt17", "MSMT17_VERSIONS"]

_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
#: version -> (main folder name, train folder, test folder)
MSMT17_VERSIONS: dict[str, tuple[str, str, str]] = {
    "v1": ("MSMT17_V1", "train", "test"),
    "v2": ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
}
_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_")
_EXPECTED = "'<pid>/<pid>_<idx>_<cam 01-15>_<date+time>_<n>_<m>.jpg <label>', e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'"


def _read_list(list_file: Path, image_dir: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    bad: list[str] = []
    base = str(image_dir)
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        m = _NAME.match(os.path.basename(parts[0])) if parts else None
        if len(parts) != 2 or m is None or not parts[1].lstrip("-").isdigit():
            bad.append(f"line {lineno}: {line!r}")
            continue
        cam = int(m.group(3))
        if not 1 <= cam <= 15:
            bad.append(f"line {lineno}: {line!r} (camera {cam} not in 1..15)")
            continue
        records.append(
            ImageRecord(path=os.path.join(base, parts[0]), pid=int(parts[1]), camid=cam - 1)
        )
    if bad:
        shown = "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise DatasetError(
            f"msmt17: {len(bad)} line(s) of {list_file} do not match the expected format "
            f"{_EXPECTED}: {shown}"
        )
    return records


def load_msmt17(
    root: str | os.PathLike,
    opts: LoadOptions,
    version: Literal["auto", "v1", "v2"] = "auto",
    merge_val: bool = True,
) -> ParsedDataset:
    """MSMT17 V1 or V2.

    Args:
        root: data root; accepts ``<root>/msmt17/MSMT17_V1``, ``<root>/MSMT17_V1``,
            ``<root>/msmt17`` (holding the folders directly) and the same for V2.
        version: ``"auto"`` tries V1 then V2.
        merge_val: train on train+val (the standard 32,621-image training set);
            False trains on ``list_train.txt`` only.
    """
    version = version.lower()  # type: ignore[assignment]
    if version not in ("auto", "v1", "v2"):
        raise DatasetError(f"msmt17: version must be 'auto', 'v1' or 'v2', got {version!r}")
    versions = ["v1", "v2"] if version == "auto" else [version]
    errors = []
    for ver in versions:
        main, train_name, test_name = MSMT17_VERSIONS[ver]
        try:
            ddir = find_dataset_dir(
                root,
                [f"msmt17/{main}", f"MSMT17/{main}", main, "msmt17", "MSMT17", ""],
                [train_name, test_name, *_LISTS],
                f"msmt17 ({ver.upper()})",
                f"<dir>/{{{train_name},{test_name}}}/<pid>/<images> + {', '.join(_LISTS)}",
            )
        except DatasetError as exc:
            errors.append(str(exc))
            continue
        train_dir = resolve_child(ddir, train_name)
        test_dir = resolve_child(ddir, test_name)
        assert train_dir is not None and test_dir is not None
        lists = {n: resolve_child(ddir, n) for n in _LISTS}
        train = _read_list(lists["list_train.txt"], train_dir)
        if merge_val:
            train += _read_list(lists["list_val.txt"], train_dir)
        splits = {
            "train": train,
            "query": _read_list(lists["list_query.txt"], test_dir),
            "gallery": _read_list(lists["list_gallery.txt"], test_dir),
        }
        sources = {
            "train": str(lists["list_train.txt"]),
            "query": str(lists["list_query.txt"]),
            "gallery": str(lists["list_gallery.txt"]),
        }
        notes = [f"MSMT17 {ver.upper()}" + (", train+val" if merge_val else ", train only")]
        return finalize_dataset("msmt17", root, ddir, splits, opts, sources, notes)
    raise DatasetError(" | ".join(errors))
