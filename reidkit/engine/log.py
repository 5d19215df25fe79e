"""Run logging: ``log.jsonl`` rows, optional TensorBoard, console messages (rank 0 only)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "read_jsonl", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _clean(value: Any) -> Any:
    """JSON-safe values (non-finite floats become strings, tensors become lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunLogger:
    """Appends one JSON object per line to ``<run>/log.jsonl``; mirrors scalars to
    TensorBoard when ``tensorboard=True`` (needs the ``tensorboard`` package). All
    methods are no-ops when ``enabled`` is false (ranks other than 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.tb = None
        self.start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError(
                    "tensorboard: true, but the 'tensorboard' package is not installed "
                    "(pip install tensorboard, or set tensorboard=false)"
                )
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, kind: str, step: int | None = None, **fields: Any) -> None:
        """Write ``{"type": kind, "time": seconds since start, **fields}``; numeric fields
        (and numeric values of dict fields) also go to TensorBoard under ``kind/name``."""
        if not self.enabled:
            return
        row = {"type": kind, "time": round(time.time() - self.start, 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
        if self.tb is not None and step is not None:
            for key, value in fields.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]
                for sub, v in items:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        tag = f"{kind}/{key}" + (f"/{sub}" if sub else "")
                        self.tb.add_scalar(tag, v, step)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a ``log.jsonl`` file."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
