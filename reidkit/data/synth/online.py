"""The synthetic set rendered on the fly: image ``i`` of a split is a pure function of
``(data.render, i)``, rendered in the loader workers, so a set of any size costs no disk.

:class:`SynthRenderSource` knows how to render every image of the train and validation
(query / gallery) splits; :class:`RenderedRecords` are its splits as sequences of
:class:`~reidkit.data.records.ImageRecord` that can also load their images
(:meth:`RenderedRecords.load_image`). :class:`reidkit.data.loader.ImageDataset` uses
``load_image`` instead of reading ``record.path``, so the train loader (PK sampler,
per-sample seeded augmentation, workers, DDP) and the evaluator work unchanged; the
dataset registry builds it as ``data.dataset: synth_render``.

Two plans (``data.render.plan``, see :mod:`reidkit.data.synth.knobs`):

* ``disk``: the on-disk generator's plan of ``disk_preset`` (made once, in the process
  that builds the dataset); image ``i`` is rendered with the task's own seed
  ``(seed, split, person, image index)`` and JPEG-encoded at the camera's quality in
  memory, so its pixels are those of the file ``reidkit synth`` writes, in the order the
  Market parser lists them (junk dropped, train pids relabelled);
* ``index``: random access. Identities come in look-alike families drawn from
  ``(seed, split, family)``; cameras from ``(seed, camera)``; a training identity's
  cameras, tracklets and image count from ``(seed, identity)``; image ``j`` of identity
  ``p`` from ``(seed, split, p, j)``. Image ``i`` maps to ``(p, j)`` through the cumulative
  image counts (one small array), so nothing is planned per image.

Caches (camera backgrounds, families, identity plans) are per process and bounded; they
are not pickled to the workers.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from reidkit.data.records import ImageRecord

from .camera import Camera, _background
from .identity import _make_family, sample_identity
from .knobs import SynthRenderConfig
from .layout import _NAME_RE, PRESETS, SPLIT_FOLDERS, _plan, _split_over
from .rendering import Tracklet, render_sample
from .variety import (
    background_variant_camera,
    image_jitter,
    num_background_variants,
    varied_camera,
    varied_tracklet,
    vary_family,
)

__all__ = ["SynthRenderSource", "RenderedRecords", "RENDER_SPLITS", "jpeg_round_trip"]

RENDER_SPLITS = ("train", "query", "gallery")
_SUPERSAMPLE = 2
# seed tags of the index plan (distinct from the on-disk generator's)
_TAG_FAMILY_SIZES = 0xF5
_TAG_FAMILY = 0xFA
_TAG_COUNTS = 0xC0
_TAG_CAMERA = 0xCA4
_TAG_ID_PLAN = 0x1D
_TAG_IMAGE = 0x1A
_TAG_BG_VARIANT = 0xB6
_TRAIN, _TEST = 1, 2
_CACHE_LIMIT = 4096


def jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    """``img`` (H, W, 3) uint8 encoded as the on-disk JPEG at ``quality`` and decoded back
    (the compression is part of the camera model)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy shares it)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """The bytes ``reidkit synth`` writes for ``img`` (tests compare them with the files)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Cache(dict):
    """A dict that empties itself when it grows past a bound (per-process caches)."""

    def put(self, key: Any, value: Any) -> Any:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        self[key] = value
        return value


class _Plan:
    """What the source needs from a plan (records and raw renders per split)."""

    cams: list[Camera]
    seed: int
    height: int
    width: int

    def __init__(self) -> None:
        self._bg = _Cache()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, _Cache):
                state[key] = _Cache()
        return state

    def background(self, cam: Camera, variant: int | None) -> np.ndarray:
        key = (cam.index, variant)
        bg = self._bg.get(key)
        if bg is None:
            h = int(self.height * _SUPERSAMPLE * 1.3)
            w = int(self.width * _SUPERSAMPLE * 2.0)
            bg = self._bg.put(key, _background(cam, self.seed, h, w, variant))
        return bg

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def split_len(self, split: str) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def pids(self, split: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def pid_camid(self, split: str, i: int) -> tuple[int, int]:  # pragma: no cover
        raise NotImplementedError

    def render(self, split: str, i: int) -> tuple[np.ndarray, int]:  # pragma: no cover
        """(image before compression, JPEG quality)."""
        raise NotImplementedError


class _DiskPlan(_Plan):
    """Exactly the images of the on-disk preset ``knobs.disk_preset``."""

    def __init__(self, knobs: SynthRenderConfig, height: int, width: int) -> None:
        super().__init__()
        preset = PRESETS[str(knobs.disk_preset)]
        self.seed, self.height, self.width = knobs.seed, height, width
        persons, cams, tasks, _meta = _plan(preset, knobs.seed)
        self.persons, self.cams = persons, cams
        rows: dict[str, list[tuple[int, int, int]]] = {}
        for split, folder in SPLIT_FOLDERS.items():
            named = sorted((t.fname, n) for n, t in enumerate(tasks) if t.folder == folder)
            kept = []
            for fname, n in named:
                m = _NAME_RE.match(fname)
                assert m is not None  # the plan's own names
                pid, cam = int(m.group(1)), int(m.group(2)) - 1
                if pid != -1:  # junk: the Market parser drops it (evaluation protocol)
                    kept.append((n, pid, cam))
            rows[split] = kept
        relabel = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in rows["train"]}))}
        rows["train"] = [(n, relabel[pid], cam) for n, pid, cam in rows["train"]]
        if knobs.num_test_ids > 0:  # a validation subset: the first test ids, no distractors
            keep = set(sorted({pid for _, pid, _ in rows["query"]})[: knobs.num_test_ids])
            for split in ("query", "gallery"):
                rows[split] = [r for r in rows[split] if r[1] in keep]
        used = sorted({n for split_rows in rows.values() for n, _, _ in split_rows})
        where = {n: i for i, n in enumerate(used)}
        self.tasks = [tasks[n] for n in used]  # only what is rendered travels to the workers
        self.rows = {
            split: np.array([(where[n], pid, cam) for n, pid, cam in r], dtype=np.int64).reshape(
                -1, 3
            )
            for split, r in rows.items()
        }

    def split_len(self, split: str) -> int:
        return len(self.rows[split])

    def pids(self, split: str) -> np.ndarray:
        return self.rows[split][:, 1]

    def pid_camid(self, split: str, i: int) -> tuple[int, int]:
        _, pid, cam = self.rows[split][i]
        return int(pid), int(cam)

    def render(self, split: str, i: int) -> tuple[np.ndarray, int]:
        task = self.tasks[int(self.rows[split][i, 0])]
        cam = self.cams[task.cam]
        img, _kps = render_sample(
            self.persons[task.person],
            cam,
            task.tracklet,
            task.k,
            np.random.default_rng(list(task.seed_key)),
            self.height,
            self.width,
            self.background(cam, None),
            task.mode,
        )
        return img, cam.jpeg_quality


class _IndexPlan(_Plan):
    """Random access: everything from ``(seed, index)`` (see the module docstring)."""

    def __init__(self, knobs: SynthRenderConfig, height: int, width: int) -> None:
        super().__init__()
        self.knobs = knobs
        self.seed, self.height, self.width = knobs.seed, height, width
        self.cams = [
            varied_camera(np.random.default_rng([knobs.seed, _TAG_CAMERA, c]), c, knobs)
            for c in range(knobs.num_cams)
        ]
        self.kmax = min(knobs.num_cams, 6)
        self.jitter = image_jitter(knobs)
        self.num_variants = num_background_variants(knobs)
        lo, hi = knobs.images_per_id
        counts = np.random.default_rng([knobs.seed, _TAG_COUNTS]).integers(
            lo, hi + 1, knobs.num_ids
        )
        self.counts = counts.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.families = {
            _TRAIN: self._family_table(_TRAIN, knobs.num_ids),
            _TEST: self._family_table(_TEST, knobs.num_test_ids),
        }
        self._test_rows, self._test_tracklets = self._plan_test()
        self._family_cache = _Cache()
        self._id_plan_cache = _Cache()

    # ------------------------------------------------------------------ identities
    def _family_table(self, code: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(family of each person, member index, family size) for ``n`` persons in
        look-alike families of 1-4 (the on-disk generator's size distribution)."""
        if n == 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        rng = np.random.default_rng([self.seed, _TAG_FAMILY_SIZES, code])
        sizes = rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2], size=n).astype(np.int64)
        ends = np.cumsum(sizes)
        num_fam = int(np.searchsorted(ends, n)) + 1
        starts = ends[:num_fam] - sizes[:num_fam]
        sizes = np.minimum(sizes[:num_fam], n - starts)
        family = np.repeat(np.arange(num_fam), sizes)
        member = np.arange(n) - starts[family]
        return family, member, sizes

    def identity(self, code: int, person: int) -> dict[str, Any]:
        """Cue values of ``person`` of split ``code`` (1 train, 2 test)."""
        family, member, sizes = self.families[code]
        f = int(family[person])
        members = self._family_cache.get((code, f))
        if members is None:
            rng = np.random.default_rng([self.seed, _TAG_FAMILY, code, f])
            size = int(sizes[f])
            found, _varies = _make_family(rng, size)
            while len(found) < size:  # a family whose cues ran out of distinct values
                found.append(sample_identity(rng))
            members = self._family_cache.put((code, f), vary_family(rng, found, self.knobs))
        return members[int(member[person])]

    def _tracklet_cut(self, rng: np.random.Generator, m: int) -> list[int]:
        """Lengths of the one or two tracklets of ``m`` images in one camera (as on disk)."""
        if m > 5 and rng.random() < 0.5:
            cut = int(rng.integers(2, m - 1))
            return [cut, m - cut]
        return [m]

    def id_plan(self, person: int) -> list[tuple[int, Tracklet, int]]:
        """(camera, tracklet, index in the tracklet) of every image of training id
        ``person``."""
        plan = self._id_plan_cache.get(person)
        if plan is not None:
            return plan
        n = int(self.counts[person])
        rng = np.random.default_rng([self.seed, _TAG_ID_PLAN, _TRAIN, person])
        k = int(min(self.kmax, n, rng.integers(2, self.kmax + 1)))
        cams = sorted(int(c) for c in rng.choice(len(self.cams), size=k, replace=False))
        plan = []
        for cam, m in zip(cams, _split_over(rng, n, k)):
            for length in self._tracklet_cut(rng, int(m)):
                tr = varied_tracklet(rng, self.cams[cam], self.knobs)
                plan.extend((cam, tr, kk) for kk in range(length))
        return self._id_plan_cache.put(person, plan)

    def _plan_test(self) -> tuple[np.ndarray, list[Tracklet]]:
        """Validation rows ``(person, slot, camera, tracklet, index, is_query)``: every test
        id in 2..6 cameras, one query and 1-3 gallery images per camera."""
        rows: list[tuple[int, ...]] = []
        tracklets: list[Tracklet] = []
        for person in range(self.knobs.num_test_ids):
            rng = np.random.default_rng([self.seed, _TAG_ID_PLAN, _TEST, person])
            k = int(rng.integers(2, self.kmax + 1))
            cams = sorted(int(c) for c in rng.choice(len(self.cams), size=k, replace=False))
            slot = 0
            for cam in cams:
                m = 1 + int(rng.integers(1, 4))
                query_at = int(rng.integers(0, m))
                tracklets.append(varied_tracklet(rng, self.cams[cam], self.knobs))
                for kk in range(m):
                    rows.append((person, slot, cam, len(tracklets) - 1, kk, int(kk == query_at)))
                    slot += 1
        return np.array(rows, dtype=np.int64).reshape(-1, 6), tracklets

    # ------------------------------------------------------------------ splits
    def _test_split(self, split: str) -> np.ndarray:
        want = 1 if split == "query" else 0
        return self._test_rows[self._test_rows[:, 5] == want]

    def split_len(self, split: str) -> int:
        if split == "train":
            return int(self.offsets[-1])
        return len(self._test_split(split))

    def pids(self, split: str) -> np.ndarray:
        if split == "train":
            return np.repeat(np.arange(len(self.counts)), self.counts)
        return self._test_split(split)[:, 0] + 1

    def _locate(self, i: int) -> tuple[int, int]:
        person = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return person, i - int(self.offsets[person])

    def pid_camid(self, split: str, i: int) -> tuple[int, int]:
        if split == "train":
            person, j = self._locate(i)
            return person, self.id_plan(person)[j][0]
        row = self._test_split(split)[i]
        return int(row[0]) + 1, int(row[2])

    def render(self, split: str, i: int) -> tuple[np.ndarray, int]:
        if split == "train":
            person, slot = self._locate(i)
            cam_index, tracklet, kk = self.id_plan(person)[slot]
            code = _TRAIN
        else:
            person, slot, cam_index, t, kk, _ = (int(v) for v in self._test_split(split)[i])
            tracklet, code = self._test_tracklets[t], _TEST
        cam = self.cams[cam_index]
        rng = np.random.default_rng([self.seed, _TAG_IMAGE, code, person, slot])
        variant = int(rng.integers(self.num_variants)) if self.num_variants > 1 else 0
        if variant == 0:
            bg = self.background(cam, None)
        else:
            vrng = np.random.default_rng([self.seed, _TAG_BG_VARIANT, cam_index, variant])
            bg = self.background(background_variant_camera(vrng, cam, self.knobs), variant)
        img, _kps = render_sample(
            self.identity(code, person),
            cam,
            tracklet,
            kk,
            rng,
            self.height,
            self.width,
            bg,
            "normal",
            jitter=self.jitter,
        )
        return img, cam.jpeg_quality


class SynthRenderSource:
    """Every image of one on-the-fly synthetic set (``data.render``), rendered on demand.

    Args:
        knobs: the set (:class:`~reidkit.data.synth.knobs.SynthRenderConfig`).
        height, width: rendered size when ``knobs.height`` / ``knobs.width`` are unset
            (the training input size, so no resize is needed).

    ``render(split, i)`` returns image ``i`` of ``split`` (``train``, ``query``,
    ``gallery``) as uint8 ``(H, W, 3)``, after the camera's JPEG compression; the same
    ``(knobs, split, i)`` always gives the same pixels, in any process.
    """

    def __init__(self, knobs: SynthRenderConfig, height: int = 128, width: int = 64) -> None:
        self.knobs = knobs
        self.height = int(knobs.height or height)
        self.width = int(knobs.width or width)
        if self.height < 32 or self.width < 16:
            raise ValueError(
                f"data.render: rendered size must be at least 32x16 (HxW), got "
                f"{self.height}x{self.width}"
            )
        plan_cls = _DiskPlan if knobs.plan == "disk" else _IndexPlan
        self.plan: _Plan = plan_cls(knobs, self.height, self.width)
        self.name = f"synth_render:{knobs.preset}"

    def __len__(self) -> int:
        return sum(self.plan.split_len(s) for s in RENDER_SPLITS)

    def records(self, split: str) -> RenderedRecords:
        """The records of ``split`` (lazy; they can load their images)."""
        if split not in RENDER_SPLITS:
            raise ValueError(f"split must be one of {RENDER_SPLITS}, got {split!r}")
        return RenderedRecords(self, split)

    def path(self, split: str, i: int) -> str:
        """A name for image ``i`` (no such file exists): ``synth_render/<preset>/s<seed>/
        <split>/<i>.jpg``."""
        return f"synth_render/{self.knobs.preset}/s{self.knobs.seed}/{split}/{i:07d}.jpg"

    def record(self, split: str, i: int) -> ImageRecord:
        pid, camid = self.plan.pid_camid(split, i)
        return ImageRecord(self.path(split, i), pid, camid)

    def render(self, split: str, i: int) -> np.ndarray:
        """Image ``i`` of ``split``: uint8 ``(H, W, 3)``."""
        img, quality = self.plan.render(split, i)
        return jpeg_round_trip(img, quality)

    def render_jpeg(self, split: str, i: int) -> bytes:
        """Image ``i`` of ``split`` as the JPEG bytes an on-disk writer would store."""
        img, quality = self.plan.render(split, i)
        return encode_jpeg(img, quality)


class RenderedRecords(Sequence[ImageRecord]):
    """The records of one split of a :class:`SynthRenderSource` (a lazy, read-only
    sequence; slices are views). ``load_image(i)`` renders record ``i``'s image, which
    :class:`reidkit.data.loader.ImageDataset` calls instead of reading a file."""

    def __init__(
        self, source: SynthRenderSource, split: str, start: int = 0, stop: int | None = None
    ):
        self.source, self.split = source, split
        self.start = int(start)
        self.stop = int(source.plan.split_len(split) if stop is None else stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def _index(self, i: Any) -> int:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record index {i} out of range for {n} records")
        return self.start + i

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return RenderedRecords(
                self.source, self.split, self.start + start, self.start + max(start, stop)
            )
        return self.source.record(self.split, self._index(i))

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(self.start, self.stop):
            yield self.source.record(self.split, i)

    def load_image(self, i: int) -> np.ndarray:
        """The image of record ``i``: uint8 ``(H, W, 3)``."""
        return self.source.render(self.split, self._index(i))

    @property
    def pids(self) -> np.ndarray:
        """(N,) identity labels of the records, without building them."""
        return self.source.plan.pids(self.split)[self.start : self.stop]

    def __repr__(self) -> str:
        return (
            f"RenderedRecords({self.source.name}, {self.split}, "
            f"[{self.start}:{self.stop}] of {self.source.plan.split_len(self.split)})"
        )
