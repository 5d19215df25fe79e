"""Datasets in the Market-1501 folder layout: Market-1501, DukeMTMC-reID, VeRi-776, the
synthetic set, and (from :mod:`.cuhk03`) CUHK03-NP.

Layout (inside the dataset folder)::

    bounding_box_train/  0002_c1s1_000451_03.jpg ...   -> train
    query/               0001_c1s1_001051_00.jpg ...   -> query
    bounding_box_test/   0000_c1s1_000151_01.jpg ...   -> gallery
    keypoints/           bounding_box_train.json ...   (optional, COCO-17)

File names start with ``<pid>_c<camera>``; pid ``-1`` marks junk boxes (dropped, as in
the evaluation protocol), pid ``0`` marks distractors (kept in the gallery).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from reidkit.data.datasets.base import (
    DatasetError,
    LoadOptions,
    ParsedDataset,
    finalize_dataset,
    find_dataset_dir,
    load_keypoints,
    resolve_child,
    scan_folder,
)
from reidkit.data.records import ImageRecord

__all__ = [
    "MARKET_FOLDERS",
    "parse_market_layout",
    "load_market1501",
    "load_dukemtmc",
    "load_veri",
    "load_synth",
    "synth_sets_on_disk",
]

#: split -> folder name in the Market layout
MARKET_FOLDERS: dict[str, str] = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
}
_PID_CAM = re.compile(r"^(-?\d+)_c(\d+)")


def parse_market_layout(
    name: str,
    root: str | os.PathLike,
    dataset_dir: Path,
    opts: LoadOptions,
    num_cams: int | None,
    expected: str,
    pattern: re.Pattern[str] = _PID_CAM,
    keypoints: bool = True,
    notes: tuple[str, ...] = (),
) -> ParsedDataset:
    """Read the three Market-layout folders of ``dataset_dir``.

    Args:
        name: dataset name (for records and errors).
        root: the user's data root.
        dataset_dir: folder holding ``bounding_box_train``, ``query``, ``bounding_box_test``.
        opts: common load options.
        num_cams: valid cameras are ``1..num_cams`` in the names (None: no check).
        expected: the file-name pattern shown in errors.
        pattern: regex capturing pid (group 1) and 1-based camera (group 2).
        keypoints: attach ``extras["keypoints"]`` from ``keypoints/<folder>.json``.
    """
    splits: dict[str, list[ImageRecord]] = {}
    sources: dict[str, str] = {}
    for split, folder_name in MARKET_FOLDERS.items():
        folder = resolve_child(dataset_dir, folder_name)
        if folder is None or not folder.is_dir():
            raise DatasetError(f"{name}: missing folder {dataset_dir / folder_name}")
        sources[split] = str(folder)
        items = scan_folder(folder, pattern, expected, name, num_cams)
        kp: dict = {}
        if keypoints:
            kp_file = dataset_dir / "keypoints" / f"{folder_name}.json"
            if kp_file.is_file():
                kp = load_keypoints(kp_file, name)
        records = []
        for path, pid, cam in items:
            if pid == -1:  # junk boxes are not part of the protocol
                continue
            extras = {}
            if kp:
                base = os.path.basename(path)  # keys: file names or <folder>/<file name>
                rows = kp.get(base, kp.get(f"{folder_name}/{base}"))
                if rows is not None:
                    extras["keypoints"] = rows
            records.append(ImageRecord(path=path, pid=pid, camid=cam - 1, extras=extras))
        splits[split] = records
    return finalize_dataset(name, root, dataset_dir, splits, opts, sources, notes)


_MARKET_LAYOUT = (
    "<dir>/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>s<seq>_<frame>_<box>.jpg"
)


def load_market1501(root: str | os.PathLike, opts: LoadOptions) -> ParsedDataset:
    """Market-1501 (751 train ids / 12,936 images; 750 query ids / 3,368; gallery 15,913
    incl. distractors; 6 cameras). Accepts torchreid (``<root>/market1501[/Market-1501-
    v15.09.15]``) and fast-reid (``<root>/Market-1501-v15.09.15``) roots."""
    ddir = find_dataset_dir(
        root,
        [
            "market1501/Market-1501-v15.09.15",
            "market1501",
            "Market-1501-v15.09.15",
            "Market-1501",
            "market1501/Market-1501",
            "",
        ],
        list(MARKET_FOLDERS.values()),
        "market1501",
        _MARKET_LAYOUT,
    )
    return parse_market_layout(
        "market1501", root, ddir, opts, 6, "'<pid>_c<1-6>..., e.g. 0002_c1s1_000451_03.jpg'"
    )


def load_dukemtmc(root: str | os.PathLike, opts: LoadOptions) -> ParsedDataset:
    """DukeMTMC-reID (702 train ids / 16,522 images; 702 query ids / 2,228; gallery 17,661;
    8 cameras). Names like ``0001_c2_f0046182.jpg``."""
    ddir = find_dataset_dir(
        root,
        [
            "dukemtmc-reid/DukeMTMC-reID",
            "dukemtmc-reid",
            "DukeMTMC-reID",
            "dukemtmc/DukeMTMC-reID",
            "dukemtmc",
            "",
        ],
        list(MARKET_FOLDERS.values()),
        "dukemtmc",
        "<dir>/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>_f<frame>.jpg",
    )
    return parse_market_layout(
        "dukemtmc", root, ddir, opts, 8, "'<pid>_c<1-8>_f<frame>.jpg, e.g. 0001_c2_f0046182.jpg'"
    )


_VERI_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
_VERI_PATTERN = re.compile(r"^(-?\d+)_c(\d+)_")


def load_veri(root: str | os.PathLike, opts: LoadOptions) -> ParsedDataset:
    """VeRi-776 vehicles (576 train ids / 37,778 images; 200 query ids / 1,678; gallery
    11,579; 20 cameras). Folders ``image_train``, ``image_query``, ``image_test``; names
    like ``0001_c001_00016450_0.jpg``."""
    name = "veri"
    ddir = find_dataset_dir(
        root,
        ["veri", "VeRi", "VeRi-776", "veri776", "VeRi_with_plate", ""],
        list(_VERI_FOLDERS.values()),
        name,
        "<dir>/{image_train,image_query,image_test}/<pid>_c<cam:03d>_<frame>_<n>.jpg",
    )
    expected = "'<pid>_c<001-020>_<frame>_<n>.jpg, e.g. 0001_c001_00016450_0.jpg'"
    splits: dict[str, list[ImageRecord]] = {}
    sources: dict[str, str] = {}
    for split, folder_name in _VERI_FOLDERS.items():
        folder = resolve_child(ddir, folder_name)
        assert folder is not None  # find_dataset_dir checked it
        sources[split] = str(folder)
        splits[split] = [
            ImageRecord(path=p, pid=pid, camid=cam - 1)
            for p, pid, cam in scan_folder(folder, _VERI_PATTERN, expected, name, 20)
            if pid != -1
        ]
    return finalize_dataset(name, root, ddir, splits, opts, sources)


def synth_sets_on_disk(root: str | os.PathLike) -> list[str]:
    """Presets of the synthetic sets under ``root``: ``NAME`` for each ``root/synth-NAME``
    folder holding the Market folders (sorted)."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        return []
    out = []
    for entry in sorted(os.scandir(root_path), key=lambda e: e.name):
        if entry.is_dir() and entry.name.startswith("synth-"):
            if all((Path(entry.path) / f).is_dir() for f in MARKET_FOLDERS.values()):
                out.append(entry.name[len("synth-") :])
    return out


def load_synth(
    root: str | os.PathLike, opts: LoadOptions, preset: str | None = None
) -> ParsedDataset:
    """The synthetic set written by ``reidkit synth --preset PRESET --out
    <root>/synth-PRESET`` (Market layout, keypoints included).

    ``preset=None`` takes the synthetic set that is there: ``root`` itself when it is a
    ``synth-NAME`` folder, else the only ``root/synth-NAME``; with none or several, the
    error lists what is on disk.
    """
    root_path = Path(root).expanduser()
    present = synth_sets_on_disk(root_path)
    if preset is None:
        if root_path.name.startswith("synth-") and all(
            (root_path / f).is_dir() for f in MARKET_FOLDERS.values()
        ):
            preset = root_path.name[len("synth-") :]
        elif len(present) == 1:
            preset = present[0]
        elif not present:
            raise DatasetError(
                f"synth: no synthetic set under data root {str(root_path)!r} (no synth-NAME "
                f"folder with {', '.join(MARKET_FOLDERS.values())}); generate one: reidkit "
                f"synth --preset tiny --out {root_path / 'synth-tiny'}"
            )
        else:
            raise DatasetError(
                f"synth: {len(present)} synthetic sets under {str(root_path)!r} "
                f"({', '.join('synth-' + p for p in present)}); choose one with "
                f"--option preset=NAME (data.synth_preset=NAME), e.g. preset={present[0]}"
            )
    folder = f"synth-{preset}"
    candidates = [folder]
    if root_path.name == folder:
        candidates.append("")
    try:
        ddir = find_dataset_dir(
            root,
            candidates,
            list(MARKET_FOLDERS.values()),
            "synth",
            f"<root>/{folder}/{{bounding_box_train,query,bounding_box_test}}/<pid>_c<cam>...jpg",
        )
    except DatasetError:
        there = (
            f"presets on disk: {', '.join(present)} (data.synth_preset=NAME, --option preset=NAME)"
            if present
            else "no synthetic set is there yet"
        )
        raise DatasetError(
            f"synth: preset {preset!r} not found under data root {str(root_path)!r} (no "
            f"{folder}/ with {', '.join(MARKET_FOLDERS.values())}); {there}. Generate it "
            f"with: reidkit synth --preset {preset} --out {root_path / folder}"
        ) from None
    return parse_market_layout(
        "synth", root, ddir, opts, None, "'<pid>_c<cam>..., e.g. 0002_c1s1_000451_03.jpg'"
    )
