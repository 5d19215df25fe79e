"""Test-only start-up hooks for CLI subprocesses (tests/test_bad_inputs.py).

Put this folder first on ``PYTHONPATH`` of a ``python -m reidkit.cli ...`` subprocess; the
environment variables below then change that one process, and nothing in reidkit knows:

``REIDKIT_TEST_FAKE_METHOD=1``
    register the tiny ``_engine_fake`` method of ``tests/engine_fakes.py`` when
    ``reidkit.methods`` is imported (training in a second instead of a ResNet's minutes).
``REIDKIT_TEST_HIDE=onnx,onnxruntime``
    make those modules (and their submodules) unimportable, as in an install without the
    extra: ``import onnx`` raises ``ModuleNotFoundError``.
``REIDKIT_TEST_FAULT=enospc:last.pt:2`` / ``kill:last.pt:2``
    the 2nd time a process opens a ``.last.pt.tmp-PID`` file for writing (the atomic
    checkpoint write), write half of the bytes, then raise ``OSError(ENOSPC)`` (a full
    disk) or ``SIGKILL`` the process (``kill -9`` in the middle of the write).
"""

from __future__ import annotations

import builtins
import errno
import importlib.abc
import os
import signal
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent)


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}'", name=fullname)
        return None


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run ``hook()`` right after module ``target`` is executed."""

    def __init__(self, target: str, hook) -> None:
        self.target, self.hook = target, hook

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, hook = spec.loader.exec_module, self.hook

        def exec_then_hook(module):
            exec_module(module)
            hook()

        spec.loader.exec_module = exec_then_hook
        return spec


def _register_fake_method() -> None:
    if _TESTS not in sys.path:
        sys.path.append(_TESTS)
    import engine_fakes  # noqa: F401  (registers the method on import)


class _FaultyFile:
    """A file whose next ``write`` writes half of the data, then fails (or kills)."""

    def __init__(self, f, action: str) -> None:
        self._f, self._action = f, action

    def write(self, data) -> int:
        view = memoryview(data)
        self._f.write(view[: len(view) // 2])
        self._f.flush()
        if self._action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


def _install_fault(spec: str) -> None:
    action, name, nth = spec.split(":")
    prefix, count = f".{name}.tmp-", [0]
    real_open = builtins.open

    def faulty_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(os.fspath(file)).startswith(prefix):
            count[0] += 1
            if count[0] == int(nth):
                return _FaultyFile(f, action)
        return f

    builtins.open = faulty_open


if os.environ.get("REIDKIT_TEST_HIDE"):
    sys.meta_path.insert(0, _Hide(set(os.environ["REIDKIT_TEST_HIDE"].split(","))))
if os.environ.get("REIDKIT_TEST_FAKE_METHOD"):
    sys.meta_path.insert(0, _AfterImport("reidkit.methods", _register_fake_method))
if os.environ.get("REIDKIT_TEST_FAULT"):
    _install_fault(os.environ["REIDKIT_TEST_FAULT"])
