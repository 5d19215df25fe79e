"""Clips of tracklets for video re-ID: frame sampling, per-clip augmentation, datasets,
collation and loaders.

A clip batch is::

    {"clips": (B, T, 3, H, W) float32, "clip_mask": (B, T) bool, "pids": (B,) int64,
     "camids": (B,) int64, "index": (B,) int64 (tracklet index), "paths": list of B lists,
     "frames": (B, T) int64 (frame index inside the tracklet, -1 for padding)}

plus ``"keypoints": (B, T, 17, 3)`` when every frame of every clip has keypoints, and
``"chunk": (B,)`` (chunk number inside its tracklet) for chunked test loaders.
``clip_mask`` is False for padding positions: a clip shorter than ``T`` (a short tracklet
with ``short="pad"``, the last chunk of a tracklet, or ``sampling="all"``) is padded by
repeating its last real frame, so a model that ignores the mask sees torchreid's padding
and one that honours it averages over real frames only. ``paths[b]`` lists the real frames
of clip ``b`` in clip order (``clip_mask[b].sum()`` entries).

Sampling modes (:func:`sample_clip`): ``evenly`` (the first frame of each of ``seq_len``
equal segments), ``random`` (``seq_len`` distinct frames in temporal order), ``all`` (every
frame) and ``tkp`` (TKP's random temporal crop: ``seq_len`` frames ``stride`` apart from a
random start; tracklets shorter than ``seq_len * stride`` fall back to sorted random
frames, with replacement when shorter than ``seq_len``). Test-time chunking
(:func:`chunk_clip`) cuts a tracklet into consecutive ``chunk_len``-frame chunks so a long
tracklet never sits in memory at once.

Augmentation: the image pipeline (:mod:`reidkit.data.transforms`) applied once per clip to
the stacked ``(T, 3, H, W)`` frames (:class:`ClipTransform`), so every frame gets the same
flip, crop, colour jitter and erasing box. Randomness (frame choice and augmentation) comes
from one ``torch.Generator`` per clip seeded like the image pipeline
(:func:`~reidkit.data.loader.sample_seed` of ``(seed, epoch, position)`` through
:class:`~reidkit.data.loader.SeededSampler`), so batches do not depend on ``num_workers``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, SequentialSampler, get_worker_info

from .loader import (
    CorruptImageError,
    ImageDataset,
    ReIDDataLoader,
    SeededSampler,
    _data_cfg_and_seed,
    loader_kwargs,
    sample_seed,
)
from .records import TrackletRecord
from .samplers import PKSampler, ShuffleSampler
from .transforms import (
    Compose,
    Normalize,
    RandomErasing,
    RandomHorizontalFlip,
    Resize,
    Transform,
    build_test_transforms,
    build_train_transforms,
    image_size,
)

__all__ = [
    "CLIP_SAMPLING",
    "ClipOptions",
    "ClipTransform",
    "ClipDataset",
    "ClipDataLoader",
    "sample_clip",
    "chunk_clip",
    "collate_clips",
    "ClipCollate",
    "build_clip_train_loader",
    "build_clip_test_loader",
    "clip_options_from_config",
]

#: frame sampling modes of :func:`sample_clip`
CLIP_SAMPLING = ("evenly", "random", "all", "tkp")
Sampling = Literal["evenly", "random", "all", "tkp"]


# ----------------------------------------------------------------------- sampling
def sample_clip(
    num_frames: int,
    seq_len: int,
    mode: Sampling = "evenly",
    generator: torch.Generator | None = None,
    stride: int = 8,
    short: Literal["pad", "repeat"] = "pad",
) -> tuple[np.ndarray, np.ndarray]:
    """Choose the frames of one clip.

    Args:
        num_frames: frames in the tracklet (``n >= 1``).
        seq_len: clip length ``T`` (ignored by ``all``).
        mode: ``evenly``: frame ``floor(i n / T)`` for ``i < T`` (the first frame of each of
            ``T`` equal segments; deterministic); ``random``: ``T`` distinct frames drawn
            uniformly, in temporal order; ``all``: every frame; ``tkp``: TKP's random temporal
            crop, ``T`` frames ``stride`` apart from a uniform start when ``n >= T * stride``,
            else ``T`` sorted random frames (with replacement when ``n < T``).
        generator: randomness of ``random`` and ``tkp``.
        stride: frame step of ``tkp``.
        short: for ``evenly`` / ``random`` when ``n < T``: ``pad`` gives the ``n`` frames
            followed by ``T - n`` padding positions (the last frame again, ``valid`` False);
            ``repeat`` is torchreid's behaviour (``evenly`` repeats the last frame,
            ``random`` draws with replacement), all positions valid.

    Returns:
        ``(indices, valid)``: int64 frame indices in clip order and a bool array of the same
        length marking real (not padding) positions.
    """
    n = int(num_frames)
    if n < 1:
        raise ValueError(f"sample_clip: a tracklet needs at least one frame, got {n}")
    if mode not in CLIP_SAMPLING:
        raise ValueError(f"sample_clip: mode must be one of {CLIP_SAMPLING}, got {mode!r}")
    if short not in ("pad", "repeat"):
        raise ValueError(f"sample_clip: short must be 'pad' or 'repeat', got {short!r}")
    if mode == "all":
        return np.arange(n, dtype=np.int64), np.ones(n, dtype=bool)
    t = int(seq_len)
    if t < 1:
        raise ValueError(f"sample_clip: seq_len must be >= 1, got {seq_len}")
    if mode == "tkp":
        if stride < 1:
            raise ValueError(f"sample_clip: stride must be >= 1, got {stride}")
        if n >= t * stride:
            span = (t - 1) * stride + 1
            begin = int(torch.randint(n - span + 1, (1,), generator=generator))
            idx = begin + stride * np.arange(t, dtype=np.int64)
        elif n >= t:
            idx = torch.randperm(n, generator=generator)[:t].sort().values.numpy()
        else:
            idx = torch.randint(n, (t,), generator=generator).sort().values.numpy()
        return idx.astype(np.int64), np.ones(t, dtype=bool)
    if n >= t:
        if mode == "evenly":
            idx = (np.arange(t, dtype=np.int64) * n) // t
        else:
            idx = torch.randperm(n, generator=generator)[:t].sort().values.numpy()
        return idx.astype(np.int64), np.ones(t, dtype=bool)
    if short == "repeat":
        if mode == "evenly":
            idx = np.concatenate([np.arange(n), np.full(t - n, n - 1)])
        else:
            idx = torch.randint(n, (t,), generator=generator).sort().values.numpy()
        return idx.astype(np.int64), np.ones(t, dtype=bool)
    idx = np.concatenate([np.arange(n), np.full(t - n, n - 1)]).astype(np.int64)
    return idx, np.arange(t) < n


def chunk_clip(num_frames: int, chunk_len: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` chunks of at most ``chunk_len`` frames covering a
    tracklet of ``num_frames`` (the last one may be shorter)."""
    if chunk_len < 1:
        raise ValueError(f"chunk_clip: chunk_len must be >= 1, got {chunk_len}")
    if num_frames < 1:
        raise ValueError(f"chunk_clip: a tracklet needs at least one frame, got {num_frames}")
    return [(s, min(s + chunk_len, num_frames)) for s in range(0, num_frames, chunk_len)]


# ----------------------------------------------------------------------- augmentation
class ClipTransform:
    """Apply an image pipeline once to a whole clip: one set of random draws, the same
    geometric and photometric change for every frame.

    Every step receives the stacked ``(T, 3, H, W)`` tensor (all built-in transforms accept
    leading dimensions) and the clip's keypoints flattened to ``(T * 17, 3)``; a horizontal
    flip swaps left / right keypoints frame by frame.
    """

    def __init__(self, transform: Transform | None) -> None:
        if transform is None:
            self.steps: list[Transform] = []
        elif isinstance(transform, Compose):
            self.steps = list(transform.transforms)
        else:
            self.steps = [transform]
        self._flips: dict[tuple[int, int], RandomHorizontalFlip] = {}

    def _tiled_flip(self, step: RandomHorizontalFlip, frames: int) -> RandomHorizontalFlip:
        key = (id(step), frames)
        flip = self._flips.get(key)
        if flip is None:
            k = len(step.flip_index)
            index = [f * k + j for f in range(frames) for j in step.flip_index]
            flip = self._flips[key] = RandomHorizontalFlip(step.p, flip_index=index)
        return flip

    def apply(
        self,
        clip: Tensor,
        keypoints: Tensor | None = None,
        generator: torch.Generator | None = None,
        steps: Sequence[Transform] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Transform ``clip`` (T, 3, H, W) and optional keypoints (T, K, 3) together.

        ``steps`` overrides the pipeline (used to run only the per-sample head when
        normalisation is deferred to the device).
        """
        frames = clip.shape[0]
        kp = None
        if keypoints is not None:
            if keypoints.dim() != 3 or keypoints.shape[0] != frames or keypoints.shape[2] != 3:
                raise ValueError(
                    f"ClipTransform: keypoints must be (T={frames}, K, 3), got "
                    f"{tuple(keypoints.shape)}"
                )
            num_k = keypoints.shape[1]
            kp = keypoints.to(torch.float32).reshape(-1, 3).clone()
        out: Any = clip
        for step in self.steps if steps is None else steps:
            if isinstance(step, RandomHorizontalFlip) and kp is not None:
                step = self._tiled_flip(step, frames)
            out, kp = step.apply(out, kp, generator)
        if kp is not None:
            kp = kp.reshape(frames, num_k, 3)
        return out, kp

    def __repr__(self) -> str:
        return f"ClipTransform({Compose(self.steps)!r})"


# ----------------------------------------------------------------------- dataset
def split_deferred(
    transform: Transform | None,
) -> tuple[list[Transform], Normalize, RandomErasing | None]:
    """Split a pipeline ``[..., Normalize, (RandomErasing)]`` into the part run per sample in
    the workers (uint8 output), the ``Normalize`` and the optional ``RandomErasing`` that
    :meth:`ReIDDataLoader.prepare` applies to the whole batch (on the training device)."""
    steps = transform.transforms if isinstance(transform, Compose) else []
    norm_at = [i for i, t in enumerate(steps) if isinstance(t, Normalize)]
    tail = steps[norm_at[0] + 1 :] if norm_at else []
    if len(norm_at) != 1 or len(tail) > 1 or (tail and not isinstance(tail[0], RandomErasing)):
        raise ValueError(
            "defer_normalize needs a Compose ending in Normalize or Normalize + RandomErasing, got "
            f"{transform!r}"
        )
    erasing = tail[0] if tail else None
    return list(steps[: norm_at[0]]), steps[norm_at[0]], erasing  # type: ignore[return-value]


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from tracklets.

    Attributes:
        seq_len: frames per training clip ``T`` (TKP: 4).
        sampling: training frame sampling (:data:`CLIP_SAMPLING`).
        stride: frame step of ``tkp`` sampling (TKP: 8).
        short: ``pad`` or ``repeat`` for short tracklets (see :func:`sample_clip`).
        test_sampling: ``chunks`` (every frame, in ``chunk_len`` chunks: one batch item per
            chunk) or a :data:`CLIP_SAMPLING` mode (one clip of ``test_seq_len`` frames per
            tracklet, seeded by its index).
        chunk_len: frames per test chunk (TKP: 32).
        test_seq_len: clip length of non-chunked test sampling (default ``seq_len``).
    """

    seq_len: int = 4
    sampling: str = "tkp"
    stride: int = 8
    short: str = "pad"
    test_sampling: str = "chunks"
    chunk_len: int = 32
    test_seq_len: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.seq_len >= 1, "seq_len", ">= 1"),
            (self.sampling in CLIP_SAMPLING, "sampling", f"one of {CLIP_SAMPLING}"),
            (self.stride >= 1, "stride", ">= 1"),
            (self.short in ("pad", "repeat"), "short", "'pad' or 'repeat'"),
            (
                self.test_sampling in ("chunks", *CLIP_SAMPLING),
                "test_sampling",
                f"'chunks' or one of {CLIP_SAMPLING}",
            ),
            (self.chunk_len >= 1, "chunk_len", ">= 1"),
            (self.test_seq_len is None or self.test_seq_len >= 1, "test_seq_len", ">= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"ClipOptions.{name} must be {expected}, got {self}")


def clip_options_from_config(data_cfg: Any, **overrides: Any) -> ClipOptions:
    """:class:`ClipOptions` from a ``DataConfig``: reads ``seq_len``, ``clip_sampling``,
    ``clip_stride``, ``clip_short``, ``test_clip_sampling``, ``test_chunk_len`` and
    ``test_seq_len`` where the config has them (defaults otherwise); ``overrides`` win."""
    names = {
        "seq_len": "seq_len",
        "sampling": "clip_sampling",
        "stride": "clip_stride",
        "short": "clip_short",
        "test_sampling": "test_clip_sampling",
        "chunk_len": "test_chunk_len",
        "test_seq_len": "test_seq_len",
    }
    values = {k: getattr(data_cfg, v) for k, v in names.items() if hasattr(data_cfg, v)}
    values.update(overrides)
    return ClipOptions(**values)


class ClipDataset(Dataset):
    """Map-style dataset of clips over :class:`TrackletRecord` s.

    Items are tracklets (training, or one clip per tracklet at test) or, with
    ``chunk_len``, consecutive chunks of every tracklet (``len`` = number of chunks).
    ``dataset[i]`` or ``dataset[(i, seed)]`` returns ``{"clip": (T, 3, H, W) float32,
    "clip_mask": (T,) bool, "frames": (T,) int64, "pid", "camid", "index" (tracklet),
    "paths" (real frames)}`` plus ``"keypoints": (T, 17, 3)`` when the tracklet has them and
    ``"chunk"`` for chunk items. The clip's ``torch.Generator`` is seeded with ``seed`` (a
    plain index uses ``sample_seed(base_seed, 0, i)``) and drives both the frame choice and
    the augmentation.

    Each distinct frame is decoded once (``tkp`` / ``repeat`` may use a frame twice). An
    unreadable frame raises :class:`~reidkit.data.loader.CorruptImageError` naming it;
    with ``skip_corrupt`` it becomes a padding position (mask False) with a warning, and a
    clip without any readable frame is dropped (``None``, removed by :func:`collate_clips`).

    Args:
        records: the tracklets.
        transform: image pipeline applied once per clip (see :class:`ClipTransform`); it
            must start by resizing to the model size when frames differ in size.
        seq_len, sampling, stride, short: see :func:`sample_clip`.
        chunk_len: cut tracklets into chunks instead (test time; ``sampling`` ignored).
        skip_corrupt, base_seed: as :class:`~reidkit.data.loader.ImageDataset`.
        defer_normalize: items carry ``uint8`` clips and an ``erase_box`` (4,) instead;
            normalisation and erasing then run on the whole batch, in the worker
            (:class:`ClipCollate`, what ``build_clip_*_loader`` do by default) or on the
            device (``ClipDataLoader.prepare`` of a loader built with
            ``defer_normalize=True``).
    """

    def __init__(
        self,
        records: Sequence[TrackletRecord],
        transform: Transform | None,
        seq_len: int = 4,
        sampling: Sampling = "evenly",
        stride: int = 8,
        short: Literal["pad", "repeat"] = "pad",
        chunk_len: int | None = None,
        skip_corrupt: bool = False,
        base_seed: int = 0,
        defer_normalize: bool = False,
    ) -> None:
        self.records = list(records)
        for i, r in enumerate(self.records):
            if len(r) == 0:
                raise ValueError(f"ClipDataset: tracklet {i} (pid {r.pid}) has no frames")
        self.clip_transform = ClipTransform(transform)
        self.transform = transform
        self.seq_len, self.sampling, self.stride, self.short = seq_len, sampling, stride, short
        sample_clip(1, seq_len, sampling, torch.Generator(), stride, short)  # validate options
        self.chunk_len = chunk_len
        self.skip_corrupt = bool(skip_corrupt)
        self.base_seed = int(base_seed)
        self.num_skipped = 0
        self.defer_normalize = bool(defer_normalize)
        self.batch_normalized = False  # set by the loader builders (ClipCollate normalises)
        self.head: list[Transform] = []
        self.normalize = None
        self.erasing = None
        if self.defer_normalize:
            self.head, self.normalize, self.erasing = split_deferred(transform)
        self.items: list[tuple[int, int, int, int]] | None = None  # (tracklet, chunk, start, stop)
        if chunk_len is not None:
            self.items = [
                (ti, ci, start, stop)
                for ti, r in enumerate(self.records)
                for ci, (start, stop) in enumerate(chunk_clip(len(r), chunk_len))
            ]

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.records)

    def _frames(
        self, index: int, gen: torch.Generator
    ) -> tuple[int, int | None, np.ndarray, np.ndarray]:
        """(tracklet, chunk or None, frame indices, valid) of item ``index``."""
        if self.items is not None:
            ti, ci, start, stop = self.items[index]
            idx = np.arange(start, stop, dtype=np.int64)
            return ti, ci, idx, np.ones(len(idx), dtype=bool)
        r = self.records[index]
        idx, valid = sample_clip(len(r), self.seq_len, self.sampling, gen, self.stride, self.short)  # type: ignore[arg-type]
        return index, None, idx, valid

    def _decode(
        self, record: TrackletRecord, idx: np.ndarray, valid: np.ndarray
    ) -> tuple[Tensor, np.ndarray] | None:
        """uint8 (T, 3, H, W) of the chosen frames (each distinct frame decoded once);
        unreadable frames (``skip_corrupt``) become copies of a readable one, mask False."""
        arrays: dict[int, np.ndarray | None] = {}
        for f in dict.fromkeys(idx.tolist()):
            try:
                im = ImageDataset.read_image(record.paths[f])
            except CorruptImageError as exc:
                if not self.skip_corrupt:
                    raise CorruptImageError(
                        f"{exc}; set data.skip_corrupt=true to skip unreadable frames"
                    ) from exc
                self.num_skipped += 1
                warnings.warn(
                    f"skipping unreadable frame {record.paths[f]}", RuntimeWarning, stacklevel=3
                )
                arrays[f] = None
                continue
            arrays[f] = np.asarray(im)  # read-only view of a fresh copy; np.stack copies it
            im.close()
        good = [a for a in arrays.values() if a is not None]
        if not good:
            return None
        valid = valid & np.array([arrays[f] is not None for f in idx.tolist()])
        shapes = {a.shape for a in good}
        if len(shapes) > 1:
            size = self._target_size()
            if size is None:
                raise ValueError(
                    f"frames of tracklet {record.paths[0]} differ in size {sorted(shapes)}; "
                    "the clip transform must start with Resize"
                )
            resize = Resize(size)
            for f, a in arrays.items():
                if a is not None and a.shape[:2] != size:
                    arrays[f] = (
                        resize.apply(torch.from_numpy(a.copy()).permute(2, 0, 1))[0]
                        .permute(1, 2, 0)
                        .numpy()
                    )
        first_good = next(a for a in arrays.values() if a is not None)
        stacked = np.stack(
            [arrays[f] if arrays[f] is not None else first_good for f in idx.tolist()]
        )
        return torch.from_numpy(stacked).permute(0, 3, 1, 2), valid

    def _target_size(self) -> tuple[int, int] | None:
        steps = self.clip_transform.steps
        return steps[0].size if steps and isinstance(steps[0], Resize) else None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = sample_seed(self.base_seed, 0, index)
        gen = torch.Generator().manual_seed(seed)
        ti, chunk, idx, valid = self._frames(index, gen)
        record = self.records[ti]
        decoded = self._decode(record, idx, valid)
        if decoded is None:
            warnings.warn(
                f"skipping clip of tracklet {ti}: no readable frame", RuntimeWarning, stacklevel=2
            )
            return None
        clip, valid = decoded
        kps = record.extras.get("keypoints")
        keypoints = (
            torch.from_numpy(np.asarray(kps, dtype=np.float32)[idx]) if kps is not None else None
        )
        erase_box = None
        if self.defer_normalize:
            clip, keypoints = self.clip_transform.apply(clip, keypoints, gen, steps=self.head)
            if clip.is_floating_point():  # e.g. after ColorJitter: back to [0, 255]
                clip = clip.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
            box = (
                self.erasing.sample_box(*image_size(clip), gen)
                if self.erasing is not None
                else None
            )
            erase_box = torch.tensor(box if box is not None else (0, 0, 0, 0), dtype=torch.long)
        else:
            clip, keypoints = self.clip_transform.apply(clip, keypoints, gen)
        if not clip.is_floating_point() and not self.defer_normalize:
            raise TypeError(
                "the clip transform returned a uint8 tensor; it must end in Normalize or ToTensor"
            )
        item: dict[str, Any] = {
            # uint8 clips are copied into the batch anyway (channels-last -> contiguous there)
            "clip": clip if self.defer_normalize else clip.contiguous(),
            "clip_mask": torch.from_numpy(valid),
            "frames": torch.from_numpy(np.where(valid, idx, -1)),
            "pid": int(record.pid),
            "camid": int(record.camid),
            "index": ti,
            "paths": [record.paths[f] for f, v in zip(idx.tolist(), valid.tolist()) if v],
        }
        if keypoints is not None:
            item["keypoints"] = keypoints
        if chunk is not None:
            item["chunk"] = chunk
        if erase_box is not None:
            item["erase_box"] = erase_box
        return item


# ----------------------------------------------------------------------- collation
def _empty(like: Tensor, shape: Sequence[int], dtype: torch.dtype, shared: bool) -> Tensor:
    """An empty tensor, in shared memory when ``shared`` and inside a DataLoader worker (the
    batch then travels to the main process without the copy the worker would make)."""
    if not shared or get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)
    numel = int(np.prod(shape))
    itemsize = torch.empty((), dtype=dtype).element_size()
    storage = like.untyped_storage()._new_shared(numel * itemsize, device=like.device)
    return torch.empty(0, dtype=dtype, device=like.device).set_(storage).view(*shape)


def _padded(items: list[dict[str, Any]], key: str, length: int, shared: bool = True) -> Tensor:
    """Stack ``item[key]`` (T_i, ...) into (B, length, ...), padding by repeating each
    item's last entry."""
    elem = items[0][key]
    out = _empty(elem, (len(items), length, *elem.shape[1:]), elem.dtype, shared)
    for b, it in enumerate(items):
        x = it[key]
        t = x.shape[0]
        out[b, :t] = x
        if t < length:
            out[b, t:] = x[t - 1 : t]
    return out


def collate_clips(
    items: Sequence[dict[str, Any] | None], _shared_clips: bool = True
) -> dict[str, Any]:
    """Batch clip items (``None`` items, i.e. clips without a readable frame, are dropped).

    Clips of different lengths are padded to the longest (last real frame repeated,
    ``clip_mask`` False, ``frames`` -1, keypoints zero). An optional key (``keypoints``) is
    never dropped silently: every item has it, or none (else ``CollateError`` names the
    first tracklet without it).
    """
    from reidkit.data.loader import CollateError

    kept = [it for it in items if it is not None]
    if not kept:
        return {
            "clips": torch.empty(0, 0, 3, 0, 0),
            "clip_mask": torch.empty(0, 0, dtype=torch.bool),
            "frames": torch.empty(0, 0, dtype=torch.long),
            "pids": torch.empty(0, dtype=torch.long),
            "camids": torch.empty(0, dtype=torch.long),
            "index": torch.empty(0, dtype=torch.long),
            "paths": [],
        }
    length = max(it["clip"].shape[0] for it in kept)
    mask = torch.zeros(len(kept), length, dtype=torch.bool)
    frames = torch.full((len(kept), length), -1, dtype=torch.long)
    for b, it in enumerate(kept):
        t = it["clip_mask"].shape[0]
        mask[b, :t] = it["clip_mask"]
        frames[b, :t] = it["frames"]
    batch: dict[str, Any] = {
        "clips": _padded(kept, "clip", length, _shared_clips),
        "clip_mask": mask,
        "frames": frames,
        "pids": torch.tensor([it["pid"] for it in kept], dtype=torch.long),
        "camids": torch.tensor([it["camid"] for it in kept], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in kept], dtype=torch.long),
        "paths": [it["paths"] for it in kept],
    }
    have_kp = [("keypoints" in it) for it in kept]
    if all(have_kp):
        kp = _padded(kept, "keypoints", length)
        batch["keypoints"] = kp.masked_fill(~mask[:, :, None, None], 0.0)
    elif any(have_kp):
        lacking = kept[have_kp.index(False)]
        raise CollateError(
            f"batch items disagree on 'keypoints': tracklet {lacking.get('index')} "
            f"({(lacking.get('paths') or ['?'])[0]}) has none while others have them; every "
            "tracklet of a dataset must have keypoints or none"
        )
    if all("chunk" in it for it in kept):
        batch["chunk"] = torch.tensor([it["chunk"] for it in kept], dtype=torch.long)
    if all("erase_box" in it for it in kept):
        batch["erase_boxes"] = torch.stack([it["erase_box"] for it in kept])
    return batch


_CACHE_ELEMENTS = 1 << 18  # float32 values normalised per step (1 MiB)


class ClipCollate:
    """:func:`collate_clips` for a dataset that ships ``uint8`` clips, then (unless the
    loader defers it to the device) the batch's normalisation and erasing in one pass each,
    written straight into the float batch the worker sends. Same values as normalising
    every clip on its own, with less memory traffic."""

    def __init__(self, normalize: Normalize | None, erasing: RandomErasing | None) -> None:
        self.normalize, self.erasing = normalize, erasing

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        if self.normalize is None:
            return collate_clips(items)
        batch = collate_clips(items, _shared_clips=False)
        clips = batch["clips"]
        boxes = batch.pop("erase_boxes", None)
        if clips.numel() == 0 or clips.dtype != torch.uint8:
            return batch
        b, t = clips.shape[:2]
        out = _empty(clips, clips.shape, torch.float32, shared=True)
        flat = out.view(b * t, *clips.shape[2:])
        src = clips.view_as(flat)
        scale, shift = self.normalize._scale_u8, self.normalize._shift
        # (x - mean) / std as Normalize computes it, in cache-sized groups of frames: one
        # pass over a whole batch of 256 x 128 frames is several times slower
        step = max(1, _CACHE_ELEMENTS // max(1, flat[0].numel()))
        for i in range(0, b * t, step):
            block = flat[i : i + step]
            block.copy_(src[i : i + step])
            block.mul_(scale).add_(shift)
        if self.erasing is not None and boxes is not None:
            self.erasing.erase_batch(flat, boxes.repeat_interleave(t, dim=0))
        batch["clips"] = out
        return batch


# ----------------------------------------------------------------------- loaders
class ClipDataLoader(ReIDDataLoader):
    """:class:`~reidkit.data.loader.ReIDDataLoader` for clips: ``set_epoch`` and
    :meth:`prepare`, which moves a batch to the device and, for loaders built with
    ``defer_normalize=True``, normalises the ``uint8`` clips and erases their boxes there
    (the same box in every frame of a clip)."""

    def prepare(
        self, batch: dict[str, Any], device: torch.device | str, non_blocking: bool = True
    ) -> dict[str, Any]:
        out = {
            k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
            for k, v in batch.items()
        }
        boxes = out.pop("erase_boxes", None)
        ds = self.dataset
        if (
            isinstance(ds, ClipDataset)
            and ds.defer_normalize
            and not ds.batch_normalized
            and out["clips"].dtype == torch.uint8
        ):
            assert ds.normalize is not None
            b, t = out["clips"].shape[:2]
            clips = ds.normalize.apply(out["clips"].flatten(0, 1))[0]
            if ds.erasing is not None and boxes is not None:
                clips = ds.erasing.erase_batch(clips, boxes.repeat_interleave(t, dim=0))
            out["clips"] = clips.unflatten(0, (b, t))
        return out


def _clip_dataset_and_collate(
    records: Sequence[TrackletRecord],
    transform: Transform,
    defer_normalize: bool,
    **kw: Any,
) -> tuple[ClipDataset, Any]:
    """The dataset ships uint8 clips whenever the pipeline ends in ``Normalize`` (+
    ``RandomErasing``); the collate then normalises in the worker, or, with
    ``defer_normalize``, ``ClipDataLoader.prepare`` does it on the device."""
    try:
        split_deferred(transform)
        splittable = True
    except ValueError:
        splittable = False
    if defer_normalize and not splittable:
        split_deferred(transform)  # raises the explanatory error
    dataset = ClipDataset(records, transform, defer_normalize=splittable, **kw)
    if not splittable:
        return dataset, collate_clips
    if defer_normalize:
        return dataset, ClipCollate(None, None)
    dataset.batch_normalized = True
    return dataset, ClipCollate(dataset.normalize, dataset.erasing)


def build_clip_train_loader(
    cfg: Any,
    records: Sequence[TrackletRecord],
    clip: ClipOptions | None = None,
    rank: int = 0,
    world_size: int = 1,
    epoch_seed: int | None = None,
    transform: Transform | None = None,
    defer_normalize: bool = False,
) -> ClipDataLoader:
    """Training clip loader: P identities x K tracklets (``data.sampler: pk``, reusing
    :class:`~reidkit.data.samplers.PKSampler` over tracklet pids) or a shuffle, one clip
    per tracklet, augmented once per clip.

    Args:
        cfg: a ``Config`` (uses ``cfg.data`` and ``cfg.seed``) or a ``DataConfig``.
            ``data.batch_size`` is the global number of clips (P * K), ``data.num_instances``
            is K, the transforms come from the image settings (``height``, ``width``,
            ``hflip_p``, ``pad``, ``random_erasing_*``, ``color_jitter``).
        records: training tracklets (relabelled pids).
        clip: clip options (default :func:`clip_options_from_config` of ``cfg.data``).
        rank, world_size, epoch_seed, transform, defer_normalize: as
            :func:`~reidkit.data.loader.build_train_loader`.

    Returns:
        a :class:`ClipDataLoader`; call ``loader.set_epoch(epoch)`` before each epoch.
    """
    data, cfg_seed = _data_cfg_and_seed(cfg)
    seed = cfg_seed if epoch_seed is None else int(epoch_seed)
    clip = clip or clip_options_from_config(data)
    if len(records) == 0:
        raise ValueError("build_clip_train_loader: no training tracklets")
    if data.sampler == "pk":
        base: Sampler[int] = PKSampler(
            [r.pid for r in records],
            batch_size=data.batch_size,
            num_instances=data.num_instances,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=True,
        )
    elif data.sampler == "random":
        base = ShuffleSampler(
            len(records), data.batch_size, seed=seed, rank=rank, world_size=world_size
        )
    else:
        raise ValueError(f"data.sampler: expected 'pk' or 'random', got {data.sampler!r}")
    dataset, collate = _clip_dataset_and_collate(
        records,
        transform if transform is not None else build_train_transforms(data),
        defer_normalize,
        seq_len=clip.seq_len,
        sampling=clip.sampling,
        stride=clip.stride,
        short=clip.short,
        skip_corrupt=data.skip_corrupt,
        base_seed=seed,
    )
    return ClipDataLoader(
        dataset,
        batch_size=data.batch_size // world_size,
        sampler=SeededSampler(base, seed),
        drop_last=True,
        **loader_kwargs(data.num_workers, seed, collate, prefetch_factor=2),
    )


def build_clip_test_loader(
    cfg: Any,
    records: Sequence[TrackletRecord],
    clip: ClipOptions | None = None,
    transform: Transform | None = None,
    defer_normalize: bool = False,
) -> ClipDataLoader:
    """Ordered test loader over every tracklet, without augmentation.

    With ``clip.test_sampling == "chunks"`` every frame is loaded, in consecutive
    ``clip.chunk_len`` chunks (items in tracklet order, then chunk order; ``batch["index"]``
    and ``batch["chunk"]`` say where each belongs, ``clip_mask`` marks the real frames of a
    last, shorter chunk), so features can be pooled per tracklet without holding a long
    tracklet in memory. Otherwise one clip of ``test_seq_len`` frames per tracklet.
    ``data.test_batch_size`` counts frames: a batch holds ``test_batch_size // T`` clips
    (at least one).
    """
    data, seed = _data_cfg_and_seed(cfg)
    clip = clip or clip_options_from_config(data)
    if transform is None:
        transform = build_test_transforms(data)
    chunked = clip.test_sampling == "chunks"
    t = clip.chunk_len if chunked else (clip.test_seq_len or clip.seq_len)
    dataset, collate = _clip_dataset_and_collate(
        records,
        transform,
        defer_normalize,
        seq_len=clip.test_seq_len or clip.seq_len,
        sampling="evenly" if chunked else clip.test_sampling,
        stride=clip.stride,
        short=clip.short,
        chunk_len=clip.chunk_len if chunked else None,
        skip_corrupt=data.skip_corrupt,
        base_seed=seed,
    )
    return ClipDataLoader(
        dataset,
        batch_size=max(1, data.test_batch_size // t),
        sampler=SequentialSampler(dataset),
        drop_last=False,
        **loader_kwargs(data.num_workers, seed, collate, prefetch_factor=2),
    )
