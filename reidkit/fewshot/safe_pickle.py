"""Reading the few-shot pickle caches without executing pickled code.

The miniImageNet / tieredImageNet caches that circulate (``mini-imagenet-cache-*.pkl``,
``miniImageNet_category_split_*.pickle``, tieredImageNet's ``*_labels.pkl`` and
``*_images_png.pkl``) are Python pickles, and ``pickle.load`` on a file from the internet
can run arbitrary code. :func:`safe_load_pickle` uses an unpickler whose ``find_class``
only resolves NumPy's array / dtype / scalar reconstructors and a few harmless builtins
(``set``, ``frozenset``, ``bytearray``, ``complex``, ``OrderedDict`` and ``_codecs.encode``
that Python-3 pickles use for ``bytes``); every other global (``os.system``, ``eval``,
``builtins.getattr``, any class) is refused with :class:`UnsafePickleError`. Plain
containers, strings and numbers need no global at all. Python-2 pickles (the older caches)
are read with ``encoding="latin1"``, which restores their NumPy arrays byte for byte.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

__all__ = ["UnsafePickleError", "safe_load_pickle", "safe_loads_pickle", "ALLOWED_GLOBALS"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle refers to a global outside the allow-list (it could execute code).

    Also a ``ValueError``, so the CLI reports it as a user error (no traceback)."""


#: ``(module, name)`` pairs a pickle may refer to (modules normalised, see ``_normalise``).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }
)


def _normalise(module: str) -> str:
    """Map the historical module names of the allowed globals onto one spelling."""
    if module == "__builtin__":  # Python 2
        return "builtins"
    if module.startswith("numpy.core."):  # NumPy 1.x wrote numpy.core, 2.x numpy._core
        return "numpy._core." + module[len("numpy.core.") :]
    return module


def _import(module: str, name: str) -> Any:
    candidates = [module]
    if module.startswith("numpy._core."):
        candidates.append("numpy.core." + module[len("numpy._core.") :])  # NumPy 1.x
    for mod in candidates:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot resolve {module}.{name} in this NumPy version")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        key = (_normalise(module), name)
        if key not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle the global '{module}.{name}': only NumPy "
                "arrays and plain Python containers are allowed in a dataset cache (a pickle "
                "that refers to other globals can execute code). Re-create the cache from "
                "the images, or convert it with a trusted script."
            )
        return _import(*key)


def safe_loads_pickle(data: bytes, source: str = "<bytes>", encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with the restricted unpickler (see the module docstring)."""
    return _RestrictedUnpickler(io.BytesIO(data), source, encoding=encoding).load()


def safe_load_pickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Unpickle the file at ``path`` allowing only NumPy arrays and builtin containers.

    Raises:
        FileNotFoundError: no such file.
        UnsafePickleError: the pickle refers to a disallowed global (nothing was executed).
        ValueError: the file is not a readable pickle (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle cache not found: {path}")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, str(path), encoding=encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable pickle cache: {exc}") from exc
