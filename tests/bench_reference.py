"""The naive reference implementations of ``benchmarks/_reference.py`` for the tests.

``from bench_reference import ref`` gives the module (loaded once, by file path, since
``benchmarks/`` is not a package): ``ref.naive_eval`` (per-query CMC / AP / INP loops) and
``ref.naive_re_ranking`` (the original dense k-reciprocal re-ranking).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_bench_reference", "ref"]

_NAME = "reidkit_bench_reference"
_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_reference.py"


def load_bench_reference() -> ModuleType:
    """Import ``benchmarks/_reference.py`` (once per process) and return the module."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the benchmark reference implementations from {_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module


ref = load_bench_reference()
