"""Dataset records shared by every parser, loader and evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path, identity, camera and optional extras (e.g. ``keypoints``).

    ``pid`` is the dataset's own identity label for query/gallery and the relabelled
    0..N-1 label for train; ``camid`` is 0-based; -1 means unknown camera.
    """

    path: str
    pid: int
    camid: int = -1
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class ReIDDataset:
    """Train / query / gallery splits of one dataset."""

    name: str
    root: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})
