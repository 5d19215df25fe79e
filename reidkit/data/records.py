"""Dataset records shared by every parser, loader and evaluator: images and tracklets."""

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
        pids = getattr(self.train, "pids", None)  # lazy records (rendered on the fly)
        if pids is not None:
            return len(set(pids.tolist()))
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})


#: ``TrackletRecord.extras`` keys that hold one value per frame (sequences of length T);
#: :meth:`TrackletRecord.select` subsets them together with the frames.
PER_FRAME_EXTRAS: frozenset[str] = frozenset(
    {"keypoints", "frame_numbers", "occluded", "truth", "masks"}
)


@dataclass(frozen=True)
class TrackletRecord:
    """One tracklet (video re-ID): its frames in temporal order, identity, camera, extras.

    ``paths`` are sorted by frame number (the number in the file name, not directory order).
    ``pid`` / ``camid`` follow :class:`ImageRecord` (train pids relabelled 0..N-1; 0-based
    camera, -1 unknown). Per-frame extras (keys in :data:`PER_FRAME_EXTRAS`) have one entry
    per frame: ``frame_numbers`` (T,) ints, ``keypoints`` (T, 17, 3) float32 array (COCO-17
    ``[x, y, v]``), and for the synthetic video set ``occluded`` (T,) bool and ``truth`` /
    ``masks`` (paths of the frame without the occluder and of its mask, ``None`` where the
    frame is not occluded).
    """

    paths: tuple[str, ...]
    pid: int
    camid: int = -1
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_frames(self) -> int:
        return len(self.paths)

    def select(self, indices: Any) -> TrackletRecord:
        """A record with the frames at ``indices`` (in that order) and the matching entries
        of the per-frame extras; other extras are shared."""
        idx = [int(i) for i in indices]
        extras: dict[str, Any] = {}
        for key, value in self.extras.items():
            if key in PER_FRAME_EXTRAS and value is not None:
                if hasattr(value, "shape"):  # numpy array
                    extras[key] = value[idx]
                else:
                    extras[key] = type(value)(value[i] for i in idx)
            else:
                extras[key] = value
        return TrackletRecord(tuple(self.paths[i] for i in idx), self.pid, self.camid, extras)

    def frame(self, i: int) -> ImageRecord:
        """Frame ``i`` as an :class:`ImageRecord` (with its keypoints, if any): the image
        query of image-to-video protocols."""
        kps = self.extras.get("keypoints")
        extras = {"keypoints": [list(map(float, r)) for r in kps[i]]} if kps is not None else {}
        return ImageRecord(self.paths[i], self.pid, self.camid, extras)


@dataclass
class VideoReIDDataset:
    """Train / query / gallery tracklets of one video dataset."""

    name: str
    root: str
    train: list[TrackletRecord]
    query: list[TrackletRecord]
    gallery: list[TrackletRecord]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})
