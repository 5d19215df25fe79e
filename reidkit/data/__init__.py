"""Data layer: records, dataset parsers, transforms, samplers, loaders and video clips.

Public names are imported lazily (``from reidkit.data import PKSampler`` loads only
``reidkit.data.samplers``), so importing :mod:`reidkit.data` stays cheap and free of cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # records
    "ImageRecord": "records",
    "ReIDDataset": "records",
    "TrackletRecord": "records",
    "VideoReIDDataset": "records",
    # transforms
    "Compose": "transforms",
    "Transform": "transforms",
    "Resize": "transforms",
    "RandomHorizontalFlip": "transforms",
    "RandomPadCrop": "transforms",
    "ColorJitter": "transforms",
    "ToTensor": "transforms",
    "Normalize": "transforms",
    "RandomErasing": "transforms",
    "COCO_FLIP_INDEX": "transforms",
    "build_train_transforms": "transforms",
    "build_test_transforms": "transforms",
    "BatchTransform": "batch_transforms",
    "decode_image": "decode",
    # samplers
    "PKSampler": "samplers",
    "ShuffleSampler": "samplers",
    # loaders
    "ImageDataset": "loader",
    "CorruptImageError": "loader",
    "ReIDDataLoader": "loader",
    "collate_reid": "loader",
    "collate_device_batch": "loader",
    "build_train_loader": "loader",
    "build_test_loader": "loader",
    # clips (video)
    "ClipDataset": "clips",
    "ClipDataLoader": "clips",
    "ClipOptions": "clips",
    "ClipTransform": "clips",
    "sample_clip": "clips",
    "chunk_clip": "clips",
    "collate_clips": "clips",
    "build_clip_train_loader": "clips",
    "build_clip_test_loader": "clips",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reidkit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
