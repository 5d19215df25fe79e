"""reidkit: person re-identification toolkit.

The convenience names below are imported lazily (PEP 562), so ``import reidkit`` does not
import torch::

    import reidkit
    cfg = reidkit.load_config("configs/synth/bot.yaml", ["solver.max_epochs=2"])
    run = reidkit.train(cfg)                       # reidkit.api.train -> Run
    feats = reidkit.FeatureExtractor(weights=run.dir)(["a.jpg", "b.jpg"])

``reidkit.api`` holds the full Python API (``reidkit.api.config`` accepts keyword
overrides; ``reidkit.config`` is the config *module*).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> (module, attribute); attribute None means the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "api": ("reidkit.api", None),
    "Config": ("reidkit.config", "Config"),
    "load_config": ("reidkit.config", "load_config"),
    "train": ("reidkit.api", "train"),
    "evaluate": ("reidkit.api", "evaluate"),
    "load_run": ("reidkit.api", "load_run"),
    "Run": ("reidkit.api", "Run"),
    "FeatureExtractor": ("reidkit.api", "FeatureExtractor"),
    "export_onnx": ("reidkit.export", "export_onnx"),
    "build_method": ("reidkit.methods", "build_method"),
}

__all__ = [
    "__version__",
    "api",
    "Config",
    "load_config",
    "train",
    "evaluate",
    "load_run",
    "Run",
    "FeatureExtractor",
    "export_onnx",
    "build_method",
]

if TYPE_CHECKING:
    from reidkit import api
    from reidkit.api import FeatureExtractor, Run, evaluate, load_run, train
    from reidkit.config import Config, load_config
    from reidkit.export import export_onnx
    from reidkit.methods import build_method


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'reidkit' has no attribute '{name}'") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
