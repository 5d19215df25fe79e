"""Tracklet (video re-ID) dataset parsers and their registry.

``build_video_dataset(name, root, **options)`` returns a :class:`ParsedVideoDataset` of
:class:`~reidkit.data.records.TrackletRecord` s: frames in temporal order (sorted by the
frame number in the file name, never directory order), train pids relabelled 0..N-1,
query / gallery with the dataset's pids, 0-based camids; junk (pid -1) dropped,
distractors (pid 0) kept in the gallery. Layouts and protocols: docs/video.md.

Options understood by every dataset: ``check_files`` (stat every frame, default True),
``verify_images``, ``skip_corrupt`` (drop and count missing / corrupt frames, tracklets
left without frames and empty tracklets instead of raising), ``num_workers``, and
``min_seq_len`` (drop shorter tracklets). ``ilidsvid`` and ``prid2011`` take ``split``
(0..9); ``synth_video`` takes ``preset``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from reidkit.data.datasets.base import DatasetError, LoaderRegistry, LoadOptions
from reidkit.data.datasets.video.base import (
    ParsedVideoDataset,
    SkippedTracklet,
    format_video_stats,
    video_split_stats,
)
from reidkit.data.datasets.video.duke_video import load_dukemtmc_video
from reidkit.data.datasets.video.ilidsvid import load_ilidsvid
from reidkit.data.datasets.video.mars import load_mars, load_synth_video
from reidkit.data.datasets.video.prid2011 import load_prid2011
from reidkit.data.records import PER_FRAME_EXTRAS, TrackletRecord, VideoReIDDataset

__all__ = [
    "PER_FRAME_EXTRAS",
    "ParsedVideoDataset",
    "SkippedTracklet",
    "TrackletRecord",
    "VideoReIDDataset",
    "available_video_datasets",
    "build_video_dataset",
    "format_video_stats",
    "is_video_dataset",
    "num_splits",
    "register_video_dataset",
    "video_dataset_from_config",
    "video_split_stats",
]

VideoLoader = Callable[..., ParsedVideoDataset]

_REGISTRY: dict[str, VideoLoader] = {
    "mars": load_mars,
    "ilidsvid": load_ilidsvid,
    "prid2011": load_prid2011,
    "dukemtmc_video": load_dukemtmc_video,
    "synth_video": load_synth_video,
}
_ALIASES: dict[str, str] = {
    "ilids-vid": "ilidsvid",
    "ilids": "ilidsvid",
    "prid": "prid2011",
    "prid-2011": "prid2011",
    "dukemtmc-videoreid": "dukemtmc_video",
    "dukemtmcvidreid": "dukemtmc_video",
    "duke_video": "dukemtmc_video",
    "dukemtmc-vidreid": "dukemtmc_video",
    "synth-video": "synth_video",
}
#: datasets with 10 train/test splits (``split`` option; evaluate all and average)
MULTI_SPLIT = {"ilidsvid": 10, "prid2011": 10}
_COMMON = {f.name for f in fields(LoadOptions)}


_LOADERS = LoaderRegistry("video dataset", _REGISTRY, _ALIASES)
_specific_options = LoaderRegistry.specific_options
_resolve = _LOADERS.resolve


def register_video_dataset(name: str, loader: VideoLoader | None = None) -> Any:
    """Register ``loader(root, opts: LoadOptions, **options) -> ParsedVideoDataset`` under
    ``name``; usable as a decorator."""
    return _LOADERS.register(name, loader)


def available_video_datasets() -> dict[str, list[str]]:
    """Registered names mapped to the dataset-specific options they accept."""
    return _LOADERS.available()


def is_video_dataset(name: str) -> bool:
    """True when ``name`` (or an alias) is a registered video dataset."""
    return name in _LOADERS


def num_splits(name: str) -> int:
    """How many train/test splits the dataset defines (10 for iLIDS-VID and PRID2011)."""
    key, _ = _resolve(name)
    return MULTI_SPLIT.get(key, 1)


def build_video_dataset(name: str, root: str | os.PathLike, **options: Any) -> ParsedVideoDataset:
    """Parse video dataset ``name`` found under ``root``.

    Args:
        name: ``mars``, ``ilidsvid``, ``prid2011``, ``dukemtmc_video``, ``synth_video`` or
            an alias (``ilids-vid``, ``prid``, ``dukemtmc-videoreid``, ...).
        root: the data root holding the dataset folder (torchreid style), or the dataset
            folder itself.
        **options: common options (``check_files``, ``verify_images``, ``skip_corrupt``,
            ``num_workers``), ``min_seq_len``, ``split`` (iLIDS-VID, PRID2011: 0..9) and
            ``preset`` (synth_video).

    Raises:
        DatasetError: unknown name or option, missing folders / info files (naming the
            expected layout), frame names that do not parse, empty tracklets and missing
            frames (unless ``skip_corrupt``), empty splits.
    """
    key, fn = _resolve(name)
    common = {k: v for k, v in options.items() if k in _COMMON}
    specific = {k: v for k, v in options.items() if k not in _COMMON}
    allowed = _specific_options(fn)
    unknown = sorted(set(specific) - set(allowed))
    if unknown:
        raise DatasetError(
            f"video dataset {key!r}: unknown option(s) {unknown}; accepted: "
            f"{sorted(allowed) + sorted(_COMMON)}"
        )
    return fn(root, LoadOptions(**common), **specific)


def video_dataset_from_config(data_cfg: Any, **overrides: Any) -> ParsedVideoDataset:
    """Build the video dataset of a ``DataConfig`` (``cfg.data``).

    Reads ``dataset``, ``root``, ``skip_corrupt`` and, when the config has them,
    ``video_split`` -> ``split``, ``min_seq_len`` and ``synth_preset`` -> ``preset``
    (an image preset name such as ``small`` maps to ``small-video``), then
    ``dataset_options`` (dataset-specific options such as ``tkp_train``); ``overrides``
    win over all of them.
    """
    key, fn = _resolve(data_cfg.dataset)
    allowed = set(_specific_options(fn))
    preset = getattr(data_cfg, "synth_preset", None)
    if preset is not None and not str(preset).endswith("-video"):
        preset = f"{preset}-video"
    candidates = {
        "split": getattr(data_cfg, "video_split", None),
        "min_seq_len": getattr(data_cfg, "min_seq_len", None),
        "preset": preset,
    }
    options = {k: v for k, v in candidates.items() if k in allowed and v is not None}
    options["skip_corrupt"] = bool(getattr(data_cfg, "skip_corrupt", False))
    options.update(getattr(data_cfg, "dataset_options", None) or {})
    options.update(overrides)
    return build_video_dataset(key, data_cfg.root, **options)
