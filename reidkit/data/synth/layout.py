"""The synthetic image set in the Market-1501 layout: presets, the plan (identities,
cameras, tracklets, file names) and the parallel writer.

``generate(out_dir, preset="tiny")`` writes::

    out_dir/bounding_box_train/0002_c1s3_012345_01.jpg   train images
    out_dir/query/...                                    one query per (test id, camera)
    out_dir/bounding_box_test/...                        gallery, incl. 0000 distractors, -1 junk
    out_dir/keypoints/<split_folder>.json                COCO-17 [x, y, v] per image
    out_dir/meta.json                                    preset, seed, counts, cameras,
                                                         per-identity cues and families

Each image varies the walking phase, scale and position in the box (detector
misalignment) and sometimes has a partial occluder (box, pole or another person).

Output is byte-identical for the same ``(preset, seed, height, width)`` regardless of the
number of worker processes: every random draw of an image comes from a generator seeded
by ``(seed, split, person, image index)``, and the plan is made in the parent process.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .camera import _YAW_DIRS, Camera, _background, _make_cameras
from .identity import draw_distractor_people, draw_family_group
from .preview import write_preview
from .rendering import COCO_KEYPOINT_NAMES, Tracklet, render_sample

__all__ = [
    "PRESETS",
    "SPLIT_FOLDERS",
    "SynthPreset",
    "generate",
    "ensure_synth",
    "format_summary",
]

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MANAGED_ENTRIES = (*SPLIT_FOLDERS.values(), "keypoints", "meta.json", "preview.png")
META_VERSION = 1

_NAME_RE = re.compile(r"([-\d]+)_c(\d)")


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SynthPreset:
    """Sizes of one synthetic dataset.

    Every test identity appears in ``k`` cameras (``2 <= k <= num_cams``) and has exactly
    one query image per camera, so ``num_query`` fixes the sum of ``k``; its gallery
    images (at least one per camera it appears in) add up to ``num_gallery_id_images``.
    The gallery also holds ``num_distractors`` images with pid 0000 (people outside the
    test identities) and ``num_junk`` images with pid -1 (bad detections).
    """

    name: str
    num_train_ids: int
    num_test_ids: int
    num_train_images: int
    num_query: int
    num_gallery_id_images: int
    num_distractors: int
    num_junk: int
    num_cams: int = 6
    min_train_images_per_id: int = 2
    max_train_images_per_id: int = 72
    max_cams_per_id: int = 6

    @property
    def num_gallery(self) -> int:
        return self.num_gallery_id_images + self.num_distractors + self.num_junk

    @property
    def num_images(self) -> int:
        return self.num_train_images + self.num_query + self.num_gallery

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the sizes cannot be met."""
        kmax = min(self.num_cams, self.max_cams_per_id)
        checks = [
            (self.num_cams >= 2, "num_cams", "at least 2 cameras"),
            (self.num_train_ids >= 1, "num_train_ids", ">= 1"),
            (self.num_test_ids >= 1, "num_test_ids", ">= 1"),
            (
                2 * self.num_test_ids <= self.num_query <= kmax * self.num_test_ids,
                "num_query",
                f"between 2 and {kmax} per test id ({2 * self.num_test_ids}.."
                f"{kmax * self.num_test_ids})",
            ),
            (
                self.num_gallery_id_images >= self.num_query,
                "num_gallery_id_images",
                f">= num_query ({self.num_query}): one gallery image per query camera",
            ),
            (
                self.num_train_ids * max(2, self.min_train_images_per_id)
                <= self.num_train_images
                <= self.num_train_ids * self.max_train_images_per_id,
                "num_train_images",
                f"between {max(2, self.min_train_images_per_id)} and "
                f"{self.max_train_images_per_id} per train id",
            ),
            (self.num_distractors >= 0 and self.num_junk >= 0, "num_distractors/num_junk", ">= 0"),
        ]
        for ok, field_name, expected in checks:
            if not ok:
                raise ValueError(
                    f"synth preset {self.name!r}: field {field_name} must be {expected}; "
                    f"got {asdict(self)}"
                )


PRESETS: dict[str, SynthPreset] = {
    # unit tests: ~300 images, about a second
    "tiny": SynthPreset(
        "tiny",
        num_train_ids=24,
        num_test_ids=24,
        num_train_images=144,
        num_query=48,
        num_gallery_id_images=96,
        num_distractors=12,
        num_junk=12,
        min_train_images_per_id=6,
        max_train_images_per_id=6,
    ),
    # CPU demo: ~4.4k images
    "small": SynthPreset(
        "small",
        num_train_ids=150,
        num_test_ids=150,
        num_train_images=1800,
        num_query=450,
        num_gallery_id_images=1650,
        num_distractors=150,
        num_junk=150,
        min_train_images_per_id=6,
        max_train_images_per_id=20,
    ),
    # Market-1501 counts: 12,936 train / 3,368 query / 19,732 gallery
    "market": SynthPreset(
        "market",
        num_train_ids=751,
        num_test_ids=750,
        num_train_images=12936,
        num_query=3368,
        num_gallery_id_images=13120,
        num_distractors=2793,
        num_junk=3819,
        min_train_images_per_id=2,
        max_train_images_per_id=72,
    ),
}


# --------------------------------------------------------------------------- planning
def _sample_counts(
    rng: np.random.Generator, total: int, lo: np.ndarray, hi: np.ndarray, concentration: float = 2.0
) -> np.ndarray:
    """Integers ``lo <= n_i <= hi`` summing to ``total``, spread randomly (gamma weights)."""
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(
            f"cannot split {total} into {len(lo)} counts within [{lo.sum()}, {hi.sum()}]"
        )
    out = lo.copy()
    weights = rng.gamma(concentration, 1.0, len(lo))
    remaining = total - int(out.sum())
    while remaining > 0:
        room = hi - out
        w = np.where(room > 0, weights, 0.0)
        add = rng.multinomial(remaining, w / w.sum())
        add = np.minimum(add, room)
        out += add
        remaining = total - int(out.sum())
    return out


def _split_over(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Split ``n >= k`` items into ``k`` positive parts."""
    return _sample_counts(rng, n, np.ones(k, np.int64), np.full(k, n, np.int64), 1.5)


@dataclass(frozen=True)
class _Task:
    folder: str
    fname: str
    person: int
    cam: int
    tracklet: Tracklet
    k: int
    mode: str
    seed_key: tuple[int, ...]


def _new_tracklet(rng: np.random.Generator, cam: Camera) -> Tracklet:
    yaw = float(_YAW_DIRS[rng.choice(8, p=np.asarray(cam.yaw_profile) / sum(cam.yaw_profile))])
    stride = 0.06 if rng.random() < 0.08 else float(rng.uniform(0.24, 0.46))
    hfrac = cam.scale * float(rng.uniform(0.94, 1.05))
    return Tracklet(
        yaw=yaw + float(rng.normal(0, 0.15)),
        phase0=float(rng.uniform(0, 2 * math.pi)),
        dphase=float(rng.uniform(0.7, 1.6)),
        stride=stride,
        hfrac=hfrac,
        xoff=float(rng.normal(0, 0.05)),
        ytop=float(np.clip((1.0 - hfrac) * rng.uniform(0.2, 0.8), 0.0, 0.2)),
    )


class _Namer:
    """Market-1501 names ``PPPP_cCsS_FFFFFF_NN.jpg``, unique per folder."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def tracklet_start(self, rng: np.random.Generator) -> tuple[int, int]:
        return int(rng.integers(1, 7)), int(rng.integers(100, 180000))

    def name(self, pid: int, cam: int, seq: int, frame: int, nn: int) -> tuple[str, int]:
        p = "-1" if pid < 0 else f"{pid:04d}"
        while True:
            fname = f"{p}_c{cam + 1}s{seq}_{frame:06d}_{nn:02d}.jpg"
            if fname not in self.used:
                self.used.add(fname)
                return fname, frame
            frame += 1


def _pick_cams(rng: np.random.Generator, num_cams: int, k: int) -> list[int]:
    return sorted(int(c) for c in rng.choice(num_cams, size=k, replace=False))


def _plan(
    preset: SynthPreset, seed: int
) -> tuple[list[dict[str, Any]], list[Camera], list[_Task], dict]:
    """Identities, cameras and the ordered list of images to render (parent process)."""
    preset.validate()
    rng = np.random.default_rng([seed, 0x5EED])
    cams = _make_cameras(np.random.default_rng([seed, 0xCA3]), preset.num_cams)
    persons: list[dict[str, Any]] = []
    families: dict[str, dict[str, Any]] = {}
    identities: dict[str, dict[str, Any]] = {}

    train_idx = draw_family_group(rng, preset.num_train_ids, "train", persons, families)
    test_idx = draw_family_group(rng, preset.num_test_ids, "test", persons, families)
    pids = (rng.permutation(preset.num_train_ids + preset.num_test_ids) + 1).tolist()
    for person, pid in zip(train_idx + test_idx, pids):
        persons[person]["pid"] = int(pid)

    # distractor people: some are extra look-alikes of test families
    n_dis_people = max(1, math.ceil(preset.num_distractors / 3)) if preset.num_distractors else 0
    dis_idx = draw_distractor_people(rng, n_dis_people, test_idx, persons, families)

    namer = _Namer()
    tasks: list[_Task] = []
    person_counter = [0] * len(persons)
    split_code = {"train": 1, "query": 2, "gallery": 2}

    def emit(folder_split: list[str], person: int, cam: int, pid: int, mode: str = "normal"):
        """One tracklet of len(folder_split) images in ``cam``."""
        tr = _new_tracklet(rng, cams[cam])
        seq, frame = namer.tracklet_start(rng)
        nn = 1 if rng.random() < 0.7 else int(rng.integers(2, 9))
        for k, split in enumerate(folder_split):
            frame += int(rng.integers(3, 30))
            fname, frame = namer.name(pid, cam, seq, frame, nn)
            key = (seed, split_code[split], person, person_counter[person])
            person_counter[person] += 1
            tasks.append(_Task(SPLIT_FOLDERS[split], fname, person, cam, tr, k, mode, key))

    def tracklets(rng_: np.random.Generator, labels: list[str]) -> list[list[str]]:
        """Cut a (person, camera) image list into one or two tracklets."""
        if len(labels) > 5 and rng_.random() < 0.5:
            cut = int(rng_.integers(2, len(labels) - 1))
            return [labels[:cut], labels[cut:]]
        return [labels]

    kmax = min(preset.num_cams, preset.max_cams_per_id)
    # train
    n_train = _sample_counts(
        rng,
        preset.num_train_images,
        np.full(len(train_idx), max(2, preset.min_train_images_per_id)),
        np.full(len(train_idx), preset.max_train_images_per_id),
    )
    for person, n in zip(train_idx, n_train):
        k = int(min(kmax, n, rng.integers(2, kmax + 1)))
        cam_list = _pick_cams(rng, preset.num_cams, k)
        persons[person]["cams"] = [c + 1 for c in cam_list]
        for cam, m in zip(cam_list, _split_over(rng, int(n), k)):
            for part in tracklets(rng, ["train"] * int(m)):
                emit(part, person, cam, persons[person]["pid"])
    # test: one query per camera of the id, >= 1 gallery image per camera
    n_cams = _sample_counts(
        rng, preset.num_query, np.full(len(test_idx), 2), np.full(len(test_idx), kmax)
    )
    n_gal = _sample_counts(rng, preset.num_gallery_id_images, n_cams, n_cams * 8)
    for person, k, g in zip(test_idx, n_cams, n_gal):
        cam_list = _pick_cams(rng, preset.num_cams, int(k))
        persons[person]["cams"] = [c + 1 for c in cam_list]
        for cam, m in zip(cam_list, _split_over(rng, int(g), int(k))):
            labels = ["gallery"] * int(m)
            labels.insert(int(rng.integers(0, len(labels) + 1)), "query")
            for part in tracklets(rng, labels):
                emit(part, person, cam, persons[person]["pid"])
    # distractors (pid 0000)
    if n_dis_people:
        n_dis = _split_over(rng, preset.num_distractors, n_dis_people)
        for person, n in zip(dis_idx, n_dis):
            for cam, m in zip(
                *np.unique(rng.integers(0, preset.num_cams, int(n)), return_counts=True)
            ):
                emit(["gallery"] * int(m), person, int(cam), 0)
    # junk (pid -1): bad detections of test people or distractors
    pool = test_idx + dis_idx
    for _ in range(preset.num_junk):
        person = int(pool[int(rng.integers(0, len(pool)))])
        emit(["gallery"], person, int(rng.integers(0, preset.num_cams)), -1, mode="junk")

    train_set = set(train_idx)
    for i, p in enumerate(persons):
        if p["family"] is not None and p["pid"] > 0:
            families[str(p["family"])]["members"].append(p["pid"])
        if p["pid"] > 0:
            identities[f"{p['pid']:04d}"] = {
                "split": "train" if i in train_set else "test",
                "family": p["family"],
                "cameras": p["cams"],
                "attributes": p["attrs"],
            }
    for fam in families.values():
        fam["members"] = sorted(fam["members"])
    meta = {
        "identities": dict(sorted(identities.items())),
        "families": families,
        "distractors": [
            {"family": persons[i]["family"], "attributes": persons[i]["attrs"]} for i in dis_idx
        ],
    }
    return [p["attrs"] for p in persons], cams, tasks, meta


# --------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(
    persons: list[dict], cams: list[Camera], seed: int, height: int, width: int, root: str
) -> None:
    _WORKER.update(
        persons=persons, cams=cams, seed=seed, height=height, width=width, root=root, bg={}
    )


def _render_task(task: _Task) -> tuple[str, str, list[list[float]]]:
    w = _WORKER
    cam = w["cams"][task.cam]
    bg = w["bg"].get(task.cam)
    if bg is None:
        ss = 2
        bg = _background(cam, w["seed"], int(w["height"] * ss * 1.3), int(w["width"] * ss * 2.0))
        w["bg"][task.cam] = bg
    rng = np.random.default_rng(list(task.seed_key))
    img, kps = render_sample(
        w["persons"][task.person],
        cam,
        task.tracklet,
        task.k,
        rng,
        w["height"],
        w["width"],
        bg,
        task.mode,
    )
    path = os.path.join(w["root"], task.folder, task.fname)
    Image.fromarray(img).save(path, format="JPEG", quality=cam.jpeg_quality)
    rows = [[x, y, int(v)] for x, y, v in np.round(kps, 2).tolist()]
    return task.folder, task.fname, rows


# --------------------------------------------------------------------------- API
def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"synth output {out} exists and is not a directory")
    existing = [e for e in MANAGED_ENTRIES if (out / e).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"synth output {out} already holds {', '.join(existing)}; "
            "pass overwrite=True (CLI: --overwrite) to regenerate it"
        )
    for e in existing:
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for folder in (*SPLIT_FOLDERS.values(), "keypoints"):
        (out / folder).mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | os.PathLike,
    preset: str | SynthPreset = "tiny",
    seed: int = 0,
    workers: int | None = None,
    height: int = 128,
    width: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = False,
) -> dict[str, Any]:
    """Render a synthetic dataset in the Market-1501 layout into ``out_dir``.

    Args:
        out_dir: target folder (created); must not already hold a dataset unless
            ``overwrite`` (which deletes only the folders/files this function writes).
        preset: a name in ``PRESETS`` or a ``SynthPreset``.
        seed: the output is byte-identical for the same seed, preset and size.
        workers: processes (default ``os.cpu_count()``); 1 renders in-process.
        height, width: stored image size (default Market's 128 x 64).
        progress: show a tqdm bar.
        preview: also write ``out_dir/preview.png`` (see ``write_preview``).

    Returns:
        summary dict (``format_summary`` prints it); also stored in ``meta.json``, which is
        written last and so marks a complete dataset.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown synth preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if height < 32 or width < 16:
        raise ValueError(f"synth image size must be at least 32x16 (HxW); got {height}x{width}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    persons, cams, tasks, meta = _plan(preset, seed)
    workers = max(1, int(workers or os.cpu_count() or 1))
    workers = min(workers, max(1, len(tasks) // 64))
    init_args = (persons, cams, seed, height, width, str(out))
    keypoints: dict[str, dict[str, list]] = {f: {} for f in SPLIT_FOLDERS.values()}
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"synth {preset.name}", unit="img", disable=not progress)
    try:
        if workers == 1:
            _init_worker(*init_args)
            results = map(_render_task, tasks)
            for folder, fname, rows in results:
                keypoints[folder][fname] = rows
                bar.update()
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
                for folder, fname, rows in pool.imap(_render_task, tasks, chunksize=32):
                    keypoints[folder][fname] = rows
                    bar.update()
    finally:
        bar.close()
    for folder, rows in keypoints.items():
        with open(out / "keypoints" / f"{folder}.json", "w") as f:
            json.dump(dict(sorted(rows.items())), f, separators=(",", ":"))

    splits: dict[str, dict[str, Any]] = {}
    for split, folder in SPLIT_FOLDERS.items():
        names = keypoints[folder]
        parsed = [_NAME_RE.match(n) for n in names]
        pids = [int(m.group(1)) for m in parsed]
        camset = sorted({int(m.group(2)) for m in parsed})
        splits[split] = {
            "folder": folder,
            "images": len(names),
            "ids": len({p for p in pids if p > 0}),
            "cameras": camset,
        }
        if split == "gallery":
            splits[split]["distractors"] = sum(p == 0 for p in pids)
            splits[split]["junk"] = sum(p == -1 for p in pids)
    summary = {
        "root": str(out),
        "preset": preset.name,
        "seed": seed,
        "height": height,
        "width": width,
        "num_cams": preset.num_cams,
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 2),
        "workers": workers,
    }
    full = {
        "version": META_VERSION,
        "generator": "reidkit.data.synth",
        "preset": asdict(preset),
        "seed": seed,
        "height": height,
        "width": width,
        "counts": {
            k: {kk: vv for kk, vv in v.items() if kk != "folder"} for k, v in splits.items()
        },
        "keypoint_names": list(COCO_KEYPOINT_NAMES),
        "cameras": [asdict(c) | {"name": f"c{c.index + 1}"} for c in cams],
        **meta,
    }
    # meta.json must not depend on timing / workers: it is part of the byte-identical output
    with open(out / "meta.json", "w") as f:
        json.dump(full, f, indent=1)
    if preview:
        write_preview(out)
    return summary


def ensure_synth(
    data_cfg: Any, progress: bool = True, regenerate_incomplete: bool = False
) -> Path | None:
    """Generate the synthetic set a config trains on, the first time it is needed.

    For ``data.dataset == "synth"`` whose ``<data.root>/synth-<data.synth_preset>`` does not
    exist (or is an empty folder), render it there with seed 0, saying so on stdout, and
    return the folder; otherwise return ``None``. A folder that already holds images but no
    ``meta.json`` (hand-made, or an interrupted generation) is left as it is, unless
    ``regenerate_incomplete`` (``reidkit demo``), which replaces only what ``generate``
    writes.
    """
    if str(getattr(data_cfg, "dataset", "")).lower() != "synth":
        return None
    preset = data_cfg.synth_preset
    folder = Path(data_cfg.root).expanduser() / f"synth-{preset}"
    if (folder / "meta.json").is_file():
        return None
    incomplete = folder.is_dir() and any(folder.iterdir())
    if incomplete and not regenerate_incomplete:
        return None
    if preset not in PRESETS:
        return None  # the dataset loader says which presets exist
    n = PRESETS[preset].num_images
    print(
        f"{folder} not found: generating the '{preset}' synthetic set there ({n} images, "
        "once; `reidkit synth --help` for options) ...",
        flush=True,
    )
    generate(folder, preset, seed=0, overwrite=incomplete, progress=progress)
    return folder


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable table of a ``generate`` summary."""
    lines = [
        f"synthetic dataset '{summary['preset']}' (seed {summary['seed']}, "
        f"{summary['height']}x{summary['width']}, {summary['num_cams']} cameras) -> {summary['root']}",
        f"  {'split':<8} {'folder':<20} {'images':>7} {'ids':>6}  cameras",
    ]
    for split, s in summary["splits"].items():
        extra = ""
        if split == "gallery":
            extra = f"  (incl. {s['distractors']} distractors 0000, {s['junk']} junk -1)"
        cams = ",".join(str(c) for c in s["cameras"])
        lines.append(
            f"  {split:<8} {s['folder']:<20} {s['images']:>7} {s['ids']:>6}  {cams}{extra}"
        )
    total = sum(s["images"] for s in summary["splits"].values())
    lines.append(
        f"  total {total} images in {summary['seconds']:.1f} s with {summary['workers']} worker(s)"
    )
    return "\n".join(lines)
