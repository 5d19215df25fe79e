"""Datasets and DataLoaders that yield re-ID batch dicts (see docs/design.md).

A batch is ``{"images": (B, 3, H, W) float32, "pids": (B,) int64, "camids": (B,) int64,
"paths": list[str], "index": (B,) int64}`` plus ``"keypoints": (B, 17, 3) float32`` when
every record of the batch has ``extras["keypoints"]``.

Two ways to run the transforms:

- per sample in the loader workers (default): batches arrive ready;
- ``device_transforms=True``: the workers only decode files to uint8 and draw each
  sample's random decisions; ``loader.prepare(batch, device)`` then runs the whole
  pipeline batched on the training device (:mod:`reidkit.data.batch_transforms`), with
  the same per-sample seeds, so the images are the same as the per-sample path's.
  Batches hold ``"images"`` uint8 ``(B, 3, h, w)`` (or a list when sizes differ) and
  ``"aug"`` ``(B, NUM_PARAMS)`` float64 until :meth:`ReIDDataLoader.prepare`.

Reproducibility: the training sampler hands each dataset index together with a per-sample
seed derived from ``(seed, epoch, global position in the epoch)``; the dataset builds a
``torch.Generator`` from it for the transforms. Augmentation therefore depends on neither
``num_workers`` nor the DDP world size, and is identical when an epoch is replayed.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, get_worker_info

from reidkit.errors import UserError

from .batch_transforms import BatchTransform
from .decode import DecodeError, decode_image
from .records import ImageRecord
from .samplers import PKSampler, ShuffleSampler
from .transforms import (
    ColorJitter,
    Compose,
    Normalize,
    RandomErasing,
    RandomHorizontalFlip,
    RandomPadCrop,
    Resize,
    ToTensor,
    Transform,
    build_test_transforms,
    build_train_transforms,
)

__all__ = [
    "CollateError",
    "batch_keys",
    "is_tracklet_records",
    "CorruptImageError",
    "ImageDataset",
    "SeededSampler",
    "ReIDDataLoader",
    "collate_reid",
    "collate_device_batch",
    "sample_seed",
    "worker_init_fn",
    "build_train_loader",
    "build_test_loader",
]

_MASK64 = (1 << 64) - 1


class CorruptImageError(UserError, RuntimeError):
    """An image file could not be read; the message names the file."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Per-sample 63-bit seed from ``(seed, epoch, position)`` (splitmix64 chain).

    Distinct triples give statistically independent seeds; the value is platform-independent.
    """
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    h = _splitmix64(h ^ (position & _MASK64))
    return h >> 1


def _read_keypoints(record: ImageRecord) -> Tensor | None:
    kp = record.extras.get("keypoints") if record.extras else None
    if kp is None:
        return None
    # always a copy: transforms move keypoints in place, the record must stay unchanged
    t = torch.tensor(np.asarray(kp, dtype=np.float32))
    if t.shape != (17, 3):
        raise ValueError(
            f"{record.path}: extras['keypoints'] must be 17 rows of [x, y, v] (COCO-17), got shape {tuple(t.shape)}"
        )
    return t


class ImageDataset(Dataset):
    """Map-style dataset over :class:`ImageRecord` s.

    Records that can render their own images (a sequence with ``load_image(i)``, such as
    :class:`reidkit.data.synth.RenderedRecords`) are kept as given and never read from
    disk.

    ``dataset[i]`` or ``dataset[(i, seed)]`` returns ``{"image": (3, H, W) float32, "pid": int,
    "camid": int, "path": str, "index": int}`` plus ``"keypoints": (17, 3) float32`` when the
    record has ``extras["keypoints"]`` (moved consistently with the geometric transforms).
    The transform receives a ``torch.Generator`` seeded with ``seed`` (or, for a plain index,
    with ``sample_seed(base_seed, 0, i)``).

    With ``device_transforms=True`` the item instead holds the decoded ``"image"`` (uint8
    ``(3, h, w)``), the sample's drawn parameters ``"aug"`` (``(NUM_PARAMS,)`` float64),
    the moved keypoints and, for ``fill="random"`` erasing, ``"erase_noise"``;
    :attr:`batch_transform` turns a batch of them into what the per-sample path gives.

    Unreadable images raise :class:`CorruptImageError` naming the file, or, with
    ``skip_corrupt=True``, emit a warning, count it in ``num_skipped`` (of this process) and
    return ``None``, which :func:`collate_reid` drops from the batch.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Transform | None,
        skip_corrupt: bool = False,
        base_seed: int = 0,
        device_transforms: bool = False,
    ) -> None:
        # records that render their own images (the on-the-fly synthetic set) stay lazy
        self._load_image = getattr(records, "load_image", None)
        self.records = records if self._load_image is not None else list(records)
        self.transform = transform
        self.skip_corrupt = bool(skip_corrupt)
        self.base_seed = int(base_seed)
        self.num_skipped = 0
        self.batch_transform: BatchTransform | None = (
            BatchTransform(transform) if device_transforms else None
        )
        # reidkit's own transforms take uint8 tensors: decode straight to one (faster)
        steps = transform.transforms if isinstance(transform, Compose) else [transform]
        self._tensor_input = all(
            isinstance(t, _TENSOR_TRANSFORMS) and not getattr(t, "keep_pil", False) for t in steps
        )

    @property
    def device_transforms(self) -> bool:
        """True when the transforms run batched in :meth:`ReIDDataLoader.prepare`."""
        return self.batch_transform is not None

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def read_image(path: str) -> Image.Image:
        """Open ``path`` as an RGB PIL image, or raise :class:`CorruptImageError` naming it."""
        try:
            im = Image.open(path)
            try:
                im.load()  # decodes; PIL then closes the file of a single-frame image
            except BaseException:
                im.close()
                raise
            if im.mode != "RGB":
                rgb = im.convert("RGB")
                im.close()
                return rgb
            return im
        except (
            OSError,
            UnidentifiedImageError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
        ) as exc:
            raise CorruptImageError(
                f"{path}: cannot read image ({type(exc).__name__}: {exc})"
            ) from exc

    def _decode(self, path: str, index: int | None = None) -> Any:
        if self._load_image is not None and index is not None:
            pixels = self._load_image(index)  # (H, W, 3) uint8, rendered
            if self.batch_transform is not None or self._tensor_input:
                return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
            return Image.fromarray(pixels)
        if self.batch_transform is not None or self._tensor_input:
            try:
                return decode_image(path)
            except DecodeError as exc:
                raise CorruptImageError(str(exc)) from exc
        return self.read_image(path)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = sample_seed(self.base_seed, 0, index)
        record = self.records[index]
        try:
            img: Any = self._decode(record.path, index)
        except CorruptImageError as exc:
            if not self.skip_corrupt:
                raise CorruptImageError(
                    f"{exc}; set data.skip_corrupt=true to skip unreadable images"
                ) from exc
            self.num_skipped += 1
            warnings.warn(f"skipping unreadable image {record.path}", RuntimeWarning, stacklevel=2)
            return None
        keypoints = _read_keypoints(record)
        extra: dict[str, Tensor] = {}
        if self.batch_transform is not None:
            gen = torch.Generator().manual_seed(seed)
            params, keypoints, noise = self.batch_transform.sample(
                (int(img.shape[-2]), int(img.shape[-1])), keypoints, gen
            )
            extra["aug"] = params
            if noise is not None:
                extra["erase_noise"] = noise
        elif self.transform is not None:
            gen = torch.Generator().manual_seed(seed)
            img, keypoints = self.transform.apply(img, keypoints, gen)
        if not isinstance(img, Tensor):
            raise TypeError(
                f"{record.path}: the transform returned {type(img).__name__}; it must end in a "
                "tensor (add Normalize or ToTensor)"
            )
        item: dict[str, Any] = {
            "image": img,
            "pid": int(record.pid),
            "camid": int(record.camid),
            "path": record.path,
            "index": index,
        }
        if keypoints is not None:
            item["keypoints"] = keypoints
        item.update(extra)
        return item


_TENSOR_TRANSFORMS = (
    Compose,
    Resize,
    RandomHorizontalFlip,
    RandomPadCrop,
    ColorJitter,
    ToTensor,
    Normalize,
    RandomErasing,
)


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``; inside a DataLoader worker the result is written straight into shared
    memory (as ``default_collate`` does), saving the copy the worker would make to send it."""
    elem = tensors[0]
    if get_worker_info() is None:
        return torch.stack(tensors)
    numel = sum(t.numel() for t in tensors)
    storage = elem.untyped_storage()._new_shared(numel * elem.element_size(), device=elem.device)
    out = elem.new(storage).resize_(len(tensors), *elem.shape)
    return torch.stack(tensors, out=out)


class CollateError(ValueError):
    """Items of one batch disagree on their keys; the message names the item."""


#: item key -> batch key, for the optional per-item tensors collate_reid stacks
_OPTIONAL_KEYS = {"keypoints": "keypoints", "erase_box": "erase_boxes"}


def is_tracklet_records(records: Sequence[Any]) -> bool:
    """True when ``records`` are :class:`~reidkit.data.records.TrackletRecord` s (video)."""
    from .records import TrackletRecord

    return bool(records) and isinstance(records[0], TrackletRecord)


def batch_keys(records: Sequence[Any]) -> set[str]:
    """The batch keys a loader over ``records`` provides (what ``ReIDMethod.requires`` is
    checked against): ``images``, ``pids``, ``camids``, ``index``, ``paths`` for images;
    ``clips``, ``clip_mask``, ``frames``, ``pids``, ``camids``, ``index``, ``paths`` for
    tracklets (:mod:`reidkit.data.clips`); plus ``keypoints`` when every record has
    ``extras["keypoints"]`` (every frame of every tracklet)."""
    if is_tracklet_records(records):
        keys = {"clips", "clip_mask", "frames", "pids", "camids", "index", "paths"}
    else:
        keys = {"images", "pids", "camids", "index", "paths"}
    if records and all(
        getattr(r, "extras", None) and r.extras.get("keypoints") is not None for r in records
    ):
        keys.add("keypoints")
    return keys


def collate_reid(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack dataset items into the batch dict (``None`` items, i.e. skipped images, are
    dropped). An optional key (``keypoints``) is never dropped silently: either every item
    has it, or :class:`CollateError` names the first item without it."""
    kept = [it for it in items if it is not None]
    if not kept:
        return {
            "images": torch.empty(0, 3, 0, 0),
            "pids": torch.empty(0, dtype=torch.long),
            "camids": torch.empty(0, dtype=torch.long),
            "paths": [],
            "index": torch.empty(0, dtype=torch.long),
        }
    batch: dict[str, Any] = {
        "images": _stack([it["image"] for it in kept]),
        "pids": torch.tensor([it["pid"] for it in kept], dtype=torch.long),
        "camids": torch.tensor([it["camid"] for it in kept], dtype=torch.long),
        "paths": [it["path"] for it in kept],
        "index": torch.tensor([it["index"] for it in kept], dtype=torch.long),
    }
    for key, batch_key in _OPTIONAL_KEYS.items():
        have = [key in it for it in kept]
        if all(have):
            batch[batch_key] = torch.stack([it[key] for it in kept])
        elif any(have):
            lacking = kept[have.index(False)]
            owner = kept[have.index(True)]
            raise CollateError(
                f"batch items disagree on '{key}': {owner.get('path')} has it, "
                f"{lacking.get('path')} (index {lacking.get('index')}) does not; every record "
                f"of a dataset must have '{key}' or none"
            )
    return batch


_DEVICE_KEYS = ("image", "aug", "erase_noise")


def collate_device_batch(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate items of a ``device_transforms`` dataset: the labels as
    :func:`collate_reid` does, plus ``"images"`` (uint8 ``(B, 3, h, w)``, or a list of
    ``(3, h_i, w_i)`` when sizes differ), ``"aug"`` ``(B, NUM_PARAMS)`` and, when some
    sample is erased with noise, ``"erase_noise"`` (their noise concatenated)."""
    kept = [it for it in items if it is not None]
    rest = [
        {**{k: v for k, v in it.items() if k not in _DEVICE_KEYS}, "image": torch.empty(0)}
        for it in kept
    ]
    batch = collate_reid(rest)
    if not kept:
        batch["images"] = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        batch["aug"] = torch.empty(0, 0, dtype=torch.float64)
        return batch
    images = [it["image"] for it in kept]
    same = all(im.shape == images[0].shape for im in images)
    batch["images"] = _stack(images) if same else images
    batch["aug"] = _stack([it["aug"] for it in kept])
    noise = [it["erase_noise"] for it in kept if "erase_noise" in it]
    if noise:
        batch["erase_noise"] = torch.cat(noise)
    return batch


class SeededSampler(Sampler[tuple[int, int]]):
    """Wrap an index sampler so it yields ``(index, per-sample seed)`` pairs.

    The seed is :func:`sample_seed` of ``(seed, epoch, global position)``, using the inner
    sampler's ``iter_with_positions()`` when it has one (the samplers of
    :mod:`reidkit.data.samplers`) and the local position otherwise. ``set_epoch`` and
    ``len`` are forwarded.
    """

    def __init__(self, sampler: Sampler[int], seed: int) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            if start_step:
                self.sampler.set_epoch(epoch, start_step=start_step)
            else:
                self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pairs = (
            self.sampler.iter_with_positions()
            if hasattr(self.sampler, "iter_with_positions")
            else ((i, p) for p, i in enumerate(self.sampler))
        )
        for index, position in pairs:
            yield index, sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class ReIDDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch(epoch, start_step=0)`` forwarded to its sampler and
    :meth:`prepare`, which moves a batch to the device (and, for loaders built with
    ``device_transforms=True``, runs the transforms there, batched)."""

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the training epoch (and, when resuming mid-epoch, the first step)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch, start_step=start_step)

    def prepare(
        self, batch: dict[str, Any], device: torch.device | str, non_blocking: bool = True
    ) -> dict[str, Any]:
        """The batch with its tensors on ``device`` and ``images`` the normalised float32
        ``(B, 3, H, W)`` the model takes. Call it on every batch (the training loop does).

        For a loader built with ``device_transforms=True`` this runs the transforms
        batched on ``device`` (resize, flip, pad + crop, colour jitter, normalisation,
        random erasing) from the uint8 images and per-sample parameters the workers sent;
        other batches are only moved.
        """
        device = torch.device(device)
        out: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, list) and v and isinstance(v[0], Tensor):
                v = [t.to(device, non_blocking=non_blocking) for t in v]
            out[k] = v
        transform = getattr(self.dataset, "batch_transform", None)
        if transform is not None and "aug" in out:
            params = out.pop("aug")
            noise = out.pop("erase_noise", None)
            if params.shape[0] == 0:
                h, w = transform.output_size((0, 0))
                out["images"] = torch.empty(0, 3, h, w, device=device)
            else:
                out["images"] = transform(out["images"], params, noise)
        return out


def worker_init_fn(worker_id: int) -> None:
    """Seed Python's and NumPy's global RNGs of a worker from torch's per-worker seed.

    The DataLoader derives torch's worker seed from its own seeded generator, so custom
    transforms that use the global RNGs stay reproducible; reidkit's own transforms only use
    the per-sample generator and do not depend on this.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _data_cfg_and_seed(cfg: Any) -> tuple[Any, int]:
    data = getattr(cfg, "data", None)
    if data is None:  # a DataConfig passed directly
        return cfg, 0
    return data, int(getattr(cfg, "seed", 0))


def loader_kwargs(
    num_workers: int, seed: int, collate: Any, prefetch_factor: int = 4
) -> dict[str, Any]:
    """DataLoader keywords shared by the image and clip loaders: seeded workers and
    shuffling, pinned memory on CUDA, persistent workers."""
    kw: dict[str, Any] = {
        "num_workers": num_workers,
        "collate_fn": collate,
        "pin_memory": torch.cuda.is_available(),
        "worker_init_fn": worker_init_fn,
        "generator": torch.Generator().manual_seed(seed),
    }
    if num_workers > 0:
        kw["persistent_workers"] = True
        kw["prefetch_factor"] = prefetch_factor
    return kw


def build_train_loader(
    cfg: Any,
    records: Sequence[ImageRecord],
    rank: int = 0,
    world_size: int = 1,
    epoch_seed: int | None = None,
    transform: Transform | None = None,
    device_transforms: bool = False,
) -> ReIDDataLoader:
    """Training DataLoader: PK (or shuffle) sampler + training transforms.

    Args:
        cfg: a :class:`reidkit.config.Config` (uses ``cfg.data`` and ``cfg.seed``) or a
            ``DataConfig`` alone (seed 0).
        records: training records (relabelled pids).
        rank, world_size: DDP position; ``cfg.data.batch_size`` is the global batch, each rank
            yields ``batch_size // world_size`` samples per step (whole identities for PK).
        epoch_seed: seed of the sampler and of the augmentation (default ``cfg.seed``).
        transform: override the transforms (default :func:`build_train_transforms`).
        device_transforms: workers only decode (uint8) and draw the per-sample random
            parameters; ``loader.prepare(batch, device)`` runs the transforms batched on
            ``device`` (what keeps a GPU fed). Same images as the per-sample path.

    Returns:
        A :class:`ReIDDataLoader`; call ``loader.set_epoch(epoch)`` before each epoch.
        ``len(loader)`` is the number of steps per epoch.

    Tracklets (:class:`~reidkit.data.records.TrackletRecord`) get the clip loader
    :func:`reidkit.data.clips.build_clip_train_loader` (clip options from ``cfg.data``).
    """
    if is_tracklet_records(records):
        from .clips import build_clip_train_loader

        return build_clip_train_loader(
            cfg,
            records,
            rank=rank,
            world_size=world_size,
            epoch_seed=epoch_seed,
            transform=transform,
        )
    data, cfg_seed = _data_cfg_and_seed(cfg)
    seed = cfg_seed if epoch_seed is None else int(epoch_seed)
    if len(records) == 0:
        raise ValueError(
            "build_train_loader: no training records (is the dataset's train split empty?)"
        )
    if data.sampler == "pk":
        pids = getattr(records, "pids", None)  # lazy records give them without building
        base: Sampler[int] = PKSampler(
            [int(p) for p in pids] if pids is not None else [r.pid for r in records],
            batch_size=data.batch_size,
            num_instances=data.num_instances,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=True,
            epoch=data.pk_epoch,
        )
    elif data.sampler == "random":
        base = ShuffleSampler(
            len(records), data.batch_size, seed=seed, rank=rank, world_size=world_size
        )
    else:
        raise ValueError(f"data.sampler: expected 'pk' or 'random', got {data.sampler!r}")
    sampler = SeededSampler(base, seed)
    dataset = ImageDataset(
        records,
        transform if transform is not None else build_train_transforms(data),
        skip_corrupt=data.skip_corrupt,
        base_seed=seed,
        device_transforms=device_transforms,
    )
    return ReIDDataLoader(
        dataset,
        batch_size=data.batch_size // world_size,
        sampler=sampler,
        drop_last=True,
        **loader_kwargs(
            data.num_workers,
            seed,
            collate_device_batch if device_transforms else collate_reid,
        ),
    )


def build_test_loader(
    cfg: Any,
    records: Sequence[ImageRecord],
    transform: Transform | None = None,
    occlusion_p: float = 0.0,
    device_transforms: bool = False,
) -> ReIDDataLoader:
    """Ordered DataLoader without augmentation (``data.test_batch_size``, keeps every record).

    ``occlusion_p > 0`` adds random erasing seeded by record index (MGRe's occlusion test);
    ``device_transforms`` as in :func:`build_train_loader`. Tracklets get
    :func:`reidkit.data.clips.build_clip_test_loader` (every frame in
    ``data.test_chunk_len`` chunks by default).
    """
    if is_tracklet_records(records):
        from .clips import build_clip_test_loader

        if occlusion_p > 0:
            raise ValueError(
                "occlusion_p (the occlusion test) erases boxes of test images; it is not "
                "defined for tracklets"
            )
        return build_clip_test_loader(cfg, records, transform=transform)
    data, seed = _data_cfg_and_seed(cfg)
    if transform is None:
        transform = build_test_transforms(data, occlusion_p=occlusion_p)
    dataset = ImageDataset(
        records,
        transform,
        skip_corrupt=data.skip_corrupt,
        base_seed=seed,
        device_transforms=device_transforms,
    )
    return ReIDDataLoader(
        dataset,
        batch_size=data.test_batch_size,
        sampler=SequentialSampler(dataset),
        drop_last=False,
        **loader_kwargs(
            data.num_workers,
            seed,
            collate_device_batch if device_transforms else collate_reid,
        ),
    )
