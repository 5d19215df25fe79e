"""User errors: what the command line reports in one line, without a traceback.

Every mistake a user can make (a config key, a file, a missing optional package, a full
disk) raises an exception whose message is one line naming the file or field and what to
do about it. :func:`reidkit.cli.main` prints ``reidkit COMMAND: error: <message>`` for

* :class:`UserError` (a mixin: ``class PretrainedLoadError(UserError, RuntimeError)``),
* ``ValueError`` (config, dataset, keypoint and argument errors derive from it),
* ``OSError`` (missing files, permissions, a full disk: :class:`DiskFullError`),

and re-raises with the traceback under ``--debug``. ``docs/errors.md`` lists the errors
and what to do about each. This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import errno
import importlib
import re

__all__ = [
    "UserError",
    "DiskFullError",
    "MissingExtraError",
    "EXTRAS",
    "require_extra",
    "one_line",
    "describe_load_error",
    "format_bytes",
]


class UserError(Exception):
    """Mixin for errors caused by the user's input or environment (not a reidkit bug).

    The message is one line naming the file / field and the fix; the CLI prints it without
    a traceback. Combine it with the builtin the error is (``RuntimeError``, ``OSError``).
    """


class DiskFullError(UserError, OSError):
    """A write failed for lack of space (``ENOSPC`` / ``EDQUOT``); the message names the
    file, the bytes needed and free, and says what was kept."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


#: pip extra -> (import names, what it is for)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    # matplotlib is a core dependency (analysis figures, CMC plots); the extra remains for
    # installs made with --no-deps
    "plot": (("matplotlib",), "figures"),
    "onnx": (("onnx", "onnxruntime"), "ONNX export and ONNX pose models"),
    "faiss": (("faiss",), "the FAISS gallery index"),
    "cuhk03": (("scipy", "h5py"), "the CUHK03 .mat files"),
}


def require_extra(extra: str, purpose: str, modules: tuple[str, ...] | None = None) -> None:
    """Import the modules of the pip ``extra`` (or only ``modules`` of it), or raise
    :class:`MissingExtraError` naming what needs them and ``pip install 'reidkit[extra]'``.

    Called when a command starts, so a missing package stops it before any work is done.
    """
    names = modules if modules is not None else EXTRAS[extra][0]
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"{purpose} needs {' and '.join(missing)}, which is not installed: "
            f"pip install 'reidkit[{extra}]'"
        )


_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*(?:Error|Exception): ")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    An exception re-raised from a DataLoader worker carries the worker's traceback in its
    message: the original message (its last line) is kept. Other multi-line messages are
    joined with ``"; "``. An ``OSError`` without a message gets its strerror and filename.
    """
    text = str(exc).strip()
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        name = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{name}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            text += " (free some space and run the command again)"
    if "Traceback (most recent call last)" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = _QUALIFIED.sub("", lines[-1]) if lines else text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return "; ".join(lines)


# torch words it "Unsupported global: GLOBAL os.system ..." or "Trying to load unsupported
# GLOBAL posix.mkdir whose module posix is blocked", depending on the version and module
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def describe_load_error(exc: BaseException) -> str:
    """A one-line reason for a failed ``torch.load(weights_only=True)``.

    torch explains a refused pickle over a dozen lines; this keeps what matters: which
    Python object the file wanted to import (its code is never run).
    """
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return (
            f"it contains pickled Python code ({found.group(1)}), which reidkit never runs; "
            "re-save the tensors as a plain state dict or as .safetensors"
        )
    if "weights_only" in text or "Weights only load failed" in text:
        return (
            "it contains pickled Python objects other than tensors, which reidkit never "
            "unpickles; re-save the tensors as a plain state dict or as .safetensors"
        )
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"not a readable PyTorch file (corrupt or truncated?): {first}"


def format_bytes(num: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    if abs(num) < 1024:
        return f"{num:.0f} B"
    exp = 0
    while abs(num) >= 1024 and exp < 3:
        num /= 1024
        exp += 1
    return f"{num:.1f} {('B', 'KiB', 'MiB', 'GiB')[exp]}"
