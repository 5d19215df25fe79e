"""Dataset parsers and their registry.

``build_dataset(name, root, **options)`` returns a :class:`~reidkit.data.records.ReIDDataset`
(a :class:`ParsedDataset` subclass that also records skipped images and notes) with train
pids relabelled 0..N-1 (sorted original order), query/gallery keeping the dataset's pids,
and 0-based camids (-1 = unknown). Folder layouts and preparation: docs/datasets.md.

Options understood by every dataset: ``check_files`` (stat every image, default True),
``verify_images`` (Pillow ``verify()`` every image, default False), ``skip_corrupt`` (drop
and count bad images instead of raising), ``num_workers`` (threads for the checks),
``keypoints`` (a COCO-17 keypoint file attached to every image, docs/keypoints.md) with
``keypoint_images`` / ``keypoint_threshold`` for COCO results files.
Dataset-specific options: see :func:`available_datasets` / each ``load_*`` function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from reidkit.data.datasets.base import DatasetError, LoaderRegistry, LoadOptions, ParsedDataset
from reidkit.data.datasets.cuhk03 import convert_cuhk03_mat, load_cuhk03
from reidkit.data.datasets.custom import load_custom
from reidkit.data.datasets.market import (
    load_dukemtmc,
    load_market1501,
    load_synth,
    load_veri,
)
from reidkit.data.datasets.msmt17 import load_msmt17
from reidkit.data.datasets.synth_render import load_synth_render
from reidkit.data.records import ReIDDataset

__all__ = [
    "DatasetError",
    "LoadOptions",
    "ParsedDataset",
    "available_datasets",
    "build_dataset",
    "convert_cuhk03_mat",
    "dataset_from_config",
    "format_stats",
    "is_video_config",
    "register_dataset",
    "split_stats",
]

Loader = Callable[..., ReIDDataset]

_REGISTRY: dict[str, Loader] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "cuhk03": load_cuhk03,
    "veri": load_veri,
    "custom": load_custom,
    "synth": load_synth,
    "synth_render": load_synth_render,
}
_ALIASES: dict[str, str] = {
    "market": "market1501",
    "market-1501": "market1501",
    "duke": "dukemtmc",
    "dukemtmc-reid": "dukemtmc",
    "dukemtmcreid": "dukemtmc",
    "msmt": "msmt17",
    "cuhk03-np": "cuhk03",
    "veri776": "veri",
    "veri-776": "veri",
}
_COMMON = {f.name for f in fields(LoadOptions)}


def _video_redirect(name: str, key: str) -> str | None:
    from reidkit.data.datasets.video import is_video_dataset

    if is_video_dataset(key):
        return (
            f"{name!r} is a video (tracklet) dataset: read it with "
            "reidkit.data.datasets.video.build_video_dataset (docs/video.md)"
        )
    return None


_LOADERS = LoaderRegistry("dataset", _REGISTRY, _ALIASES, redirect=_video_redirect)
_specific_options = LoaderRegistry.specific_options
_resolve = _LOADERS.resolve


def register_dataset(name: str, loader: Loader | None = None) -> Any:
    """Register ``loader(root, opts: LoadOptions, **options) -> ReIDDataset`` under
    ``name``; usable as a decorator (``@register_dataset("mine")``)."""
    return _LOADERS.register(name, loader)


def available_datasets() -> dict[str, list[str]]:
    """Registered names mapped to the dataset-specific options they accept."""
    return _LOADERS.available()


def build_dataset(name: str, root: str | os.PathLike, **options: Any) -> ReIDDataset:
    """Parse dataset ``name`` found under ``root``.

    Args:
        name: registry name (``market1501``, ``dukemtmc``, ``msmt17``, ``cuhk03``, ``veri``,
            ``custom``, ``synth``) or an alias (``market``, ``duke``, ``veri776``, ...).
        root: the data root holding the dataset folder (torchreid / fast-reid style), or
            the dataset folder itself.
        **options: common options (``check_files``, ``verify_images``, ``skip_corrupt``,
            ``num_workers``, ``keypoints``, ``keypoint_images``, ``keypoint_threshold``)
            and dataset-specific ones: ``msmt17``: ``version`` (auto/v1/v2), ``merge_val``;
            ``cuhk03``: ``variant`` (labeled/detected), ``source`` (auto/np/mat),
            ``classic_split``, ``split_id``; ``custom``: ``manifest``, ``cam_pattern``;
            ``synth``: ``preset``; ``synth_render``: ``render``, ``height``, ``width``.

    Raises:
        DatasetError: unknown name or option, missing folders, bad names, empty splits,
            unreadable images (unless ``skip_corrupt``).
    """
    key, fn = _resolve(name)
    common = {k: v for k, v in options.items() if k in _COMMON}
    specific = {k: v for k, v in options.items() if k not in _COMMON}
    allowed = _specific_options(fn)
    unknown = sorted(set(specific) - set(allowed))
    if unknown:
        raise DatasetError(
            f"dataset {key!r}: unknown option(s) {unknown}; accepted: "
            f"{sorted(allowed) + sorted(_COMMON)}"
        )
    return fn(root, LoadOptions(**common), **specific)


def is_video_config(data_cfg: Any) -> bool:
    """True when ``data_cfg.dataset`` names a video (tracklet) dataset."""
    from reidkit.data.datasets.video import is_video_dataset

    return is_video_dataset(str(data_cfg.dataset))


def dataset_from_config(data_cfg: Any, **overrides: Any) -> Any:
    """Build the dataset described by a ``DataConfig`` (``cfg.data``): a
    :class:`~reidkit.data.records.ReIDDataset` of images, or, when ``data.dataset`` names a
    video dataset (``mars``, ``ilidsvid``, ``prid2011``, ``dukemtmc_video``,
    ``synth_video``), a :class:`~reidkit.data.records.VideoReIDDataset` of tracklets
    (:func:`reidkit.data.datasets.video.video_dataset_from_config`).

    Image datasets: maps ``cuhk03_variant`` -> ``variant``, ``cuhk03_classic_split`` ->
    ``classic_split``, ``custom_manifest`` -> ``manifest``, ``synth_preset`` -> ``preset``,
    ``render``, ``height`` / ``width`` (``synth_render``), ``skip_corrupt`` and
    ``keypoints``; only the options the chosen dataset accepts are passed. Both kinds:
    ``data.dataset_options`` (dataset-specific options, checked by the parser) and the
    keyword ``overrides`` (e.g. ``verify_images=True``) are passed through.
    """
    options_from_cfg = dict(getattr(data_cfg, "dataset_options", None) or {})
    if is_video_config(data_cfg):
        from reidkit.data.datasets.video import video_dataset_from_config

        if getattr(data_cfg, "keypoints", None):
            raise DatasetError(
                f"data.keypoints={data_cfg.keypoints!r}: keypoint files are read for image "
                f"datasets; the video dataset {data_cfg.dataset!r} reads its own per-frame "
                "keypoints (<dataset>/keypoints/bbox_{train,test}.json, docs/video.md)"
            )
        return video_dataset_from_config(data_cfg, **overrides)
    key, fn = _resolve(data_cfg.dataset)
    candidates = {
        "variant": getattr(data_cfg, "cuhk03_variant", None),
        "classic_split": getattr(data_cfg, "cuhk03_classic_split", None),
        "manifest": getattr(data_cfg, "custom_manifest", None),
        "preset": getattr(data_cfg, "synth_preset", None),
        "render": getattr(data_cfg, "render", None),
        "height": getattr(data_cfg, "height", None),
        "width": getattr(data_cfg, "width", None),
    }
    allowed = set(_specific_options(fn))
    options = {k: v for k, v in candidates.items() if k in allowed and v is not None}
    options["skip_corrupt"] = bool(getattr(data_cfg, "skip_corrupt", False))
    if getattr(data_cfg, "keypoints", None):
        options["keypoints"] = data_cfg.keypoints
    options.update(options_from_cfg)
    options.update(overrides)
    return build_dataset(key, data_cfg.root, **options)


def split_stats(ds: ReIDDataset) -> dict[str, dict[str, int]]:
    """Per split: ``{"ids": ..., "images": ..., "cameras": ...}`` (cameras ignore -1)."""
    out = {}
    for split in ("train", "query", "gallery"):
        records = getattr(ds, split)
        out[split] = {
            "ids": len({r.pid for r in records}),
            "images": len(records),
            "cameras": len({r.camid for r in records if r.camid >= 0}),
        }
    return out


def format_stats(ds: ReIDDataset) -> str:
    """A torchreid-style table: rows train/query/gallery, columns # ids, # images,
    # cameras ("-" when camera ids are unknown), plus skipped images and notes."""
    stats = split_stats(ds)
    header = ("subset", "# ids", "# images", "# cameras")
    rows = []
    for split in ("train", "query", "gallery"):
        s = stats[split]
        cams = str(s["cameras"]) if s["cameras"] else "-"
        rows.append((split, str(s["ids"]), str(s["images"]), cams))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]

    def fmt(r: tuple[str, ...]) -> str:
        return "  " + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    rule = "  " + "-" * (sum(widths) + 3 * 3)
    lines = [f"=> {ds.name} ({ds.root})", rule, fmt(header), rule, *map(fmt, rows), rule]
    skipped = getattr(ds, "skipped", None)
    if skipped:
        lines.append(f"  skipped {len(skipped)} unreadable image(s)")
    for note in getattr(ds, "notes", None) or []:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
