"""Few-shot classification: CAN (cross attention network) and its prototype baseline.

``reidkit fewshot train|eval -c CONFIG`` on miniImageNet, tieredImageNet or any re-ID
dataset used as a few-shot set; see docs/fewshot.md. Public names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "FewShotConfig": "config",
    "load_fewshot_config": "config",
    "FewShotDataset": "datasets",
    "FewShotSplit": "datasets",
    "load_fewshot_dataset": "datasets",
    "load_mini_imagenet": "datasets",
    "load_tiered_imagenet": "datasets",
    "load_reid_as_fewshot": "datasets",
    "Episode": "episodes",
    "EpisodeSampler": "episodes",
    "EpisodeDataset": "episodes",
    "FewShotNet": "model",
    "build_fewshot_model": "model",
    "transductive_counts": "model",
    "mean_confidence_interval": "metrics",
    "safe_load_pickle": "safe_pickle",
    "UnsafePickleError": "safe_pickle",
    "train_fewshot": "engine",
    "evaluate_fewshot": "engine",
    "load_fewshot_weights": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reidkit.fewshot' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
