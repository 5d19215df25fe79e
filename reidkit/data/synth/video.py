"""The synthetic video set: tracklets of the synthetic pedestrians walking across each
camera, in the MARS layout, with occluders that pass through and their ground truth.

``generate_video(out_dir, preset="tiny-video")`` writes::

    out_dir/bbox_train/0002/0002C1T0001F001.jpg     train frames (folder = first 4 characters)
    out_dir/bbox_test/0001/0001C3T0002F017.jpg      query + gallery frames; 0000 distractors,
    out_dir/bbox_test/00-1/00-1C2T0001F001.jpg      00-1 junk tracklets (bad detections)
    out_dir/info/train_name.txt, test_name.txt      frame names, tracklet after tracklet
    out_dir/info/tracks_train_info.mat              track_train_info: rows [start, end, pid, cam]
    out_dir/info/tracks_test_info.mat               track_test_info (1-based into the name list)
    out_dir/info/query_IDX.mat                      query_IDX: 1-based rows of track_test_info
    out_dir/keypoints/{bbox_train,bbox_test}.json   COCO-17 [x, y, v] per frame name
    out_dir/truth/<frame>.png                       occluded frames rendered without the occluder
    out_dir/masks/<frame>.png                       their occluder masks (255 = occluder)
    out_dir/occlusion.json                          per occluded frame: kind, tracklet, mask area
    out_dir/meta.json                               preset, seed, counts, cameras, identities

A tracklet is one person walking through one camera's view as a tracker would crop it:
the box follows the person (small smooth wobble of position and scale), the walking phase
advances continuously, the viewpoint drifts slowly and the background slides past at the
walking speed projected on the image. A share of tracklets (``occluded_share``) has one
occluder that passes in front of the person during some of its frames: a pole (static in
the scene, sliding across the box), another pedestrian walking past closer to the camera,
a car driving by, or a bag carried past. For every frame where the occluder covers at
least one pixel, the generator also writes the same frame without the occluder (same
camera noise, PNG) and the occluder mask at the stored size; frames without occluder
pixels have neither. There are no other occluders, so the ground truth is complete.

Test identities appear in several cameras with at least two tracklets per camera: one
per (identity, camera) is a query, the others are gallery tracklets. A few test
identities are seen by one camera only (their queries have no cross-camera match, like
MARS's 140), and the gallery also holds distractor (pid 0) and junk (pid -1) tracklets.

Deterministic for the same ``(preset, seed, height, width)`` whatever the number of worker
processes: the plan is made in the parent process and every tracklet draws from its own
generators, seeded by ``(seed, tracklet number)`` and ``(seed, tracklet number, frame)``.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .camera import _YAW_DIRS, Camera, _background, _make_cameras, apply_camera
from .identity import PALETTE, _choice, draw_distractor_people, draw_family_group, sample_identity
from .layout import _pick_cams, _split_over
from .rendering import (
    COCO_KEYPOINT_NAMES,
    OCCLUDER_KINDS,
    draw_occluder,
    draw_person,
    hidden_by_mask,
    keypoint_rows,
)

__all__ = [
    "VIDEO_PRESETS",
    "VideoPreset",
    "Walk",
    "generate_video",
    "format_video_summary",
    "mars_frame_name",
    "render_tracklet",
]

VIDEO_FOLDERS = {"train": "bbox_train", "test": "bbox_test"}
VIDEO_MANAGED_ENTRIES = (
    "bbox_train",
    "bbox_test",
    "info",
    "keypoints",
    "truth",
    "masks",
    "occlusion.json",
    "meta.json",
    "preview.png",
)
VIDEO_META_VERSION = 1
_SUPERSAMPLE = 2
_MIN_DPHASE, _MAX_DPHASE = 0.22, 0.42  # walking phase per frame (radians)


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class VideoPreset:
    """Sizes of one synthetic video dataset.

    Train identities walk through ``cams_per_id`` cameras with ``train_tracklets_per_cam``
    tracklets in each; test identities likewise with ``test_tracklets_per_cam`` (at least 2:
    one query per camera, the rest gallery), except ``num_single_camera_test_ids`` of them
    that one camera sees twice (a query without cross-camera match). The gallery also holds
    ``num_distractor_tracklets`` (pid 0) and ``num_junk_tracklets`` (pid -1). Tracklet
    lengths are log-uniform in ``[min_frames, max_frames]``; ``occluded_share`` of the
    tracklets (junk excepted) have a passing occluder.
    """

    name: str
    num_train_ids: int
    num_test_ids: int
    num_single_camera_test_ids: int = 0
    num_distractor_tracklets: int = 0
    num_junk_tracklets: int = 0
    cams_per_id: tuple[int, int] = (2, 3)
    train_tracklets_per_cam: tuple[int, int] = (1, 2)
    test_tracklets_per_cam: tuple[int, int] = (2, 2)
    min_frames: int = 8
    max_frames: int = 64
    occluded_share: float = 0.3
    num_cams: int = 6

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the sizes cannot be met."""
        checks = [
            (2 <= self.num_cams <= 9, "num_cams", "between 2 and 9 (one digit in MARS names)"),
            (self.num_train_ids >= 1, "num_train_ids", ">= 1"),
            (
                0 <= self.num_single_camera_test_ids < self.num_test_ids,
                "num_single_camera_test_ids",
                f"in [0, num_test_ids) = [0, {self.num_test_ids})",
            ),
            (
                2 <= self.cams_per_id[0] <= self.cams_per_id[1] <= self.num_cams,
                "cams_per_id",
                f"(lo, hi) with 2 <= lo <= hi <= num_cams ({self.num_cams})",
            ),
            (
                1 <= self.train_tracklets_per_cam[0] <= self.train_tracklets_per_cam[1],
                "train_tracklets_per_cam",
                "(lo, hi) with 1 <= lo <= hi",
            ),
            (
                2 <= self.test_tracklets_per_cam[0] <= self.test_tracklets_per_cam[1],
                "test_tracklets_per_cam",
                "(lo, hi) with 2 <= lo <= hi (one query + at least one gallery tracklet)",
            ),
            (
                1 <= self.min_frames <= self.max_frames <= 999,
                "min_frames/max_frames",
                "1 <= min_frames <= max_frames <= 999 (three digits in MARS names)",
            ),
            (0.0 <= self.occluded_share <= 1.0, "occluded_share", "in [0, 1]"),
            (
                self.num_distractor_tracklets >= 0 and self.num_junk_tracklets >= 0,
                "num_distractor_tracklets/num_junk_tracklets",
                ">= 0",
            ),
        ]
        for ok, field_name, expected in checks:
            if not ok:
                raise ValueError(
                    f"synth video preset {self.name!r}: field {field_name} must be {expected}; "
                    f"got {asdict(self)}"
                )


VIDEO_PRESETS: dict[str, VideoPreset] = {
    # unit tests: ~40 tracklets, ~350 frames, a few seconds
    "tiny-video": VideoPreset(
        "tiny-video",
        num_train_ids=5,
        num_test_ids=5,
        num_single_camera_test_ids=1,
        num_distractor_tracklets=2,
        num_junk_tracklets=2,
        cams_per_id=(2, 3),
        train_tracklets_per_cam=(1, 2),
        test_tracklets_per_cam=(2, 2),
        min_frames=8,
        max_frames=10,
        occluded_share=0.4,
    ),
    # CPU evidence: ~450 tracklets, ~12k frames
    "small-video": VideoPreset(
        "small-video",
        num_train_ids=50,
        num_test_ids=50,
        num_single_camera_test_ids=4,
        num_distractor_tracklets=16,
        num_junk_tracklets=16,
        cams_per_id=(2, 3),
        train_tracklets_per_cam=(1, 2),
        test_tracklets_per_cam=(2, 2),
        min_frames=8,
        max_frames=64,
        occluded_share=0.3,
    ),
}


def mars_frame_name(pid: int, cam: int, tracklet: int, frame: int) -> str:
    """MARS frame name ``PPPPCcTttttFfff.jpg``: pid (``00-1`` for junk), 1-based camera,
    tracklet number, 1-based frame number. Its first four characters name its folder."""
    p = "00-1" if pid < 0 else f"{pid:04d}"
    return f"{p}C{cam}T{tracklet:04d}F{frame:03d}.jpg"


# --------------------------------------------------------------------------- walks
@dataclass(frozen=True)
class Walk:
    """One tracklet's continuous motion, in canvas units (2x the stored size).

    Frame ``t`` shows the person with yaw ``yaw + dyaw t``, walking phase ``phase0 +
    dphase t``, box placement ``xoff`` / ``ytop`` / ``hfrac`` (fractions of the box) plus a
    smooth detector wobble, and the background crop at ``(bg_y, bg_x0 + bg_vx t)``.
    """

    yaw: float
    dyaw: float
    phase0: float
    dphase: float
    stride: float
    hfrac: float
    xoff: float
    ytop: float
    wobble: float
    wobble_freq: float
    wobble_phase: float
    bg_x0: float
    bg_vx: float
    bg_y: int
    gain: float
    junk: str = ""  # "", "background", "part" or "shifted"


def _draw_walk(
    rng: np.random.Generator,
    cam: Camera,
    num_frames: int,
    ch: int,
    cw: int,
    bg_shape: tuple[int, int],
    junk: bool,
) -> Walk:
    yaw = float(_YAW_DIRS[rng.choice(8, p=np.asarray(cam.yaw_profile) / sum(cam.yaw_profile))])
    yaw += float(rng.normal(0, 0.12))
    dphase = float(rng.uniform(_MIN_DPHASE, _MAX_DPHASE))  # a gait cycle in 15-28 frames
    hfrac = cam.scale * float(rng.uniform(0.94, 1.05))
    # the box follows the person: the scene slides past at the walking speed projected on
    # the image (a gait cycle covers about 0.8 body heights)
    speed = dphase / (2 * math.pi) * 0.8 * hfrac * ch * math.sin(yaw)
    bh, bw = bg_shape
    room = bw - cw
    shift = abs(speed) * max(0, num_frames - 1)
    if shift > room:
        speed *= room / shift
        shift = float(room)
    lo = 0.0 if speed >= 0 else shift
    bg_x0 = float(rng.uniform(lo, lo + room - shift))
    junk_kind = ""
    xoff = float(rng.normal(0, 0.04))
    ytop = float(np.clip((1.0 - hfrac) * rng.uniform(0.2, 0.8), 0.0, 0.2))
    if junk:
        junk_kind = _choice(rng, ("background", "part", "shifted"), [0.3, 0.4, 0.3])
        if junk_kind == "part":
            hfrac = float(rng.uniform(1.4, 2.4))
            ytop = float(rng.uniform(-hfrac + 0.5, 0.0))
            xoff = float(rng.uniform(-0.3, 0.3))
        elif junk_kind == "shifted":
            hfrac = float(rng.uniform(0.45, 0.9))
            xoff = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.35, 0.6))
            ytop = float(rng.uniform(-0.3, 0.5))
    return Walk(
        yaw=yaw,
        dyaw=float(rng.normal(0, 0.004)),
        phase0=float(rng.uniform(0, 2 * math.pi)),
        dphase=dphase,
        stride=float(rng.uniform(0.24, 0.46)),
        hfrac=hfrac,
        xoff=xoff,
        ytop=ytop,
        wobble=float(rng.uniform(0.005, 0.03)),
        wobble_freq=float(rng.uniform(0.08, 0.3)),
        wobble_phase=float(rng.uniform(0, 2 * math.pi)),
        bg_x0=bg_x0,
        bg_vx=speed,
        bg_y=int(rng.integers(0, bh - ch + 1)),
        gain=float(rng.uniform(0.93, 1.07)),
        junk=junk_kind,
    )


@dataclass(frozen=True)
class Occlusion:
    """One occluder passing in front of the person: its kind, appearance ``params``
    (see :func:`~reidkit.data.synth.rendering.draw_occluder`), the frames ``t0 .. t0 +
    duration - 1`` of its crossing and the canvas x of its centre at both ends (it enters
    and leaves just outside the box)."""

    kind: str
    params: dict[str, Any]
    t0: int
    duration: int
    x_start: float
    x_end: float

    def centre(self, t: int) -> float | None:
        """Centre x at frame ``t``, or ``None`` outside the crossing."""
        if not self.t0 <= t < self.t0 + self.duration:
            return None
        a = (t - self.t0) / max(1, self.duration - 1)
        return self.x_start + a * (self.x_end - self.x_start)


def _draw_occlusion(
    rng: np.random.Generator, walk: Walk, num_frames: int, ch: int, cw: int
) -> Occlusion:
    kind = _choice(rng, OCCLUDER_KINDS, [0.3, 0.3, 0.2, 0.2])
    # poles are static in the scene: they slide against the walking direction
    if kind == "pole" and abs(walk.bg_vx) > 1e-3:
        direction = -1.0 if walk.bg_vx > 0 else 1.0
    else:
        direction = float(rng.choice([-1.0, 1.0]))
    colour = tuple(int(v) for v in rng.integers(50, 170, 3))
    params: dict[str, Any]
    if kind == "pole":
        params = {"width": float(rng.uniform(0.12, 0.22)), "colour": colour}
        half = params["width"] * cw / 2
    elif kind == "pedestrian":
        height = float(rng.uniform(1.05, 1.3))
        params = {
            "attrs": sample_identity(rng),
            "height": height,
            "top": float(rng.uniform(-0.15, 0.02)),
            "yaw": direction * math.pi / 2 + float(rng.normal(0, 0.1)),
            "phase0": float(rng.uniform(0, 2 * math.pi)),
            "dphase": float(rng.uniform(0.25, 0.45)),
            "stride": float(rng.uniform(0.25, 0.45)),
        }
        half = 0.25 * height * ch
    elif kind == "car":
        car_colour = PALETTE[_choice(rng, ("white", "black", "grey", "red", "blue", "navy"))]
        params = {
            "length": float(rng.uniform(1.8, 2.6)),
            "height": float(rng.uniform(0.38, 0.55)),
            "colour": car_colour,
        }
        half = params["length"] * cw / 2
    else:
        params = {
            "width": float(rng.uniform(0.35, 0.55)),
            "height": float(rng.uniform(0.16, 0.26)),
            "yc": float(rng.uniform(0.55, 0.75)),
            "colour": colour,
        }
        half = params["width"] * cw / 2
    longest = max(4, min(num_frames, 20))
    duration = int(rng.integers(min(4, longest), longest + 1))
    t0 = int(rng.integers(0, num_frames - duration + 1))
    x_in, x_out = -half - 1.0, cw + half + 1.0
    if direction < 0:
        x_in, x_out = x_out, x_in
    return Occlusion(kind, params, t0, duration, x_in, x_out)


# --------------------------------------------------------------------------- frames
def _render_frame(
    attrs: dict[str, Any],
    camera: Camera,
    walk: Walk,
    occlusion: Occlusion | None,
    t: int,
    rng: np.random.Generator,
    height: int,
    width: int,
    background: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Frame ``t`` of a tracklet: ``(image (H, W, 3) uint8, keypoints (17, 3), truth
    (H, W, 3) uint8 or None, mask (H, W) bool or None)``; truth and mask only when the
    occluder covers at least one pixel of the stored frame."""
    ss = _SUPERSAMPLE
    ch, cw = height * ss, width * ss
    x = int(round(walk.bg_x0 + walk.bg_vx * t))
    ground = np.ascontiguousarray(background[walk.bg_y : walk.bg_y + ch, x : x + cw])
    canvas = Image.fromarray(ground)
    draw = ImageDraw.Draw(canvas)
    # per-frame detector jitter on top of the smooth walk
    yaw = walk.yaw + walk.dyaw * t + float(rng.normal(0, 0.02))
    phase = walk.phase0 + walk.dphase * t + float(rng.normal(0, 0.03))
    hfrac = walk.hfrac * (1.0 + 0.6 * (attrs["height"] - 1.0)) + float(rng.normal(0, 0.004))
    wobble = walk.wobble * math.sin(walk.wobble_freq * t + walk.wobble_phase)
    xoff = walk.xoff + wobble + float(rng.normal(0, 0.006))
    ytop = walk.ytop + 0.5 * wobble + float(rng.normal(0, 0.004))
    fx_seed = int(rng.integers(0, 2**63))
    kps = np.zeros((17, 3), dtype=np.float64)
    kxy = hidden = None
    if walk.junk != "background":
        kxy, hidden = draw_person(
            draw, attrs, yaw, phase, walk.stride, cw / 2 + xoff * cw, ytop * ch, hfrac * ch, ground
        )

    def finish(img: Image.Image) -> np.ndarray:
        gen = np.random.default_rng(fx_seed)  # same noise with and without the occluder
        return apply_camera(
            img.reduce(ss), camera, gen, (0.985, 1.015), (0.95, 1.05), gain_scale=walk.gain
        )

    centre = occlusion.centre(t) if occlusion is not None else None
    if centre is not None:
        assert occlusion is not None
        occluded = canvas.copy()
        mask = Image.new("L", (cw, ch), 0)
        draw_occluder(
            ImageDraw.Draw(occluded),
            ImageDraw.Draw(mask),
            occlusion.kind,
            occlusion.params,
            centre,
            t - occlusion.t0,
            cw,
            ch,
        )
        small = np.asarray(mask.reduce(ss)) > 0  # any occluder coverage of the stored pixel
        if small.any():
            if kxy is not None and hidden is not None:
                hidden = hidden | hidden_by_mask(kxy, np.asarray(mask))
                kps = keypoint_rows(kxy, hidden, ss, height, width)
            return finish(occluded), kps, finish(canvas), small
    if kxy is not None and hidden is not None:
        kps = keypoint_rows(kxy, hidden, ss, height, width)
    return finish(canvas), kps, None, None


def render_tracklet(
    attrs: dict[str, Any],
    camera: Camera,
    num_frames: int,
    seed: int,
    uid: int,
    height: int,
    width: int,
    background: np.ndarray,
    occluded: bool = False,
    junk: bool = False,
) -> tuple[Walk, Occlusion | None, list[tuple[np.ndarray, np.ndarray, Any, Any]]]:
    """Render one tracklet in memory.

    Args:
        attrs: identity cues; camera: its camera; num_frames: length.
        seed, uid: the dataset seed and the tracklet's number (its generators' seeds).
        height, width: stored frame size; background: the camera texture
            (:func:`video_background`).
        occluded: add a passing occluder; junk: a bad detection (background only, a
            zoomed-in body part or a badly shifted box, the same all along).

    Returns:
        ``(walk, occlusion or None, frames)`` with frames as in :func:`_render_frame`.
    """
    ch, cw = height * _SUPERSAMPLE, width * _SUPERSAMPLE
    rng = np.random.default_rng([seed, 0x7AC, uid])
    walk = _draw_walk(rng, camera, num_frames, ch, cw, background.shape[:2], junk)
    occlusion = _draw_occlusion(rng, walk, num_frames, ch, cw) if occluded else None
    frames = [
        _render_frame(
            attrs,
            camera,
            walk,
            occlusion,
            t,
            np.random.default_rng([seed, 0xF7A, uid, t]),
            height,
            width,
            background,
        )
        for t in range(num_frames)
    ]
    return walk, occlusion, frames


def video_background(
    camera: Camera, seed: int, height: int, width: int, max_frames: int = 64
) -> np.ndarray:
    """The camera's scene texture for video, at canvas scale: wide enough for a box to
    follow the fastest walker of a ``max_frames`` tracklet across it (at most 7 boxes)."""
    ss = _SUPERSAMPLE
    ch, cw = height * ss, width * ss
    travel = _MAX_DPHASE / (2 * math.pi) * 0.8 * 1.05 * ch * max(0, max_frames - 1)
    boxes = 1.0 + min(6.0, travel / cw)
    return _background(camera, seed ^ 0x5EEDF00D, int(ch * 1.3), int(cw * boxes) + 1)


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _VideoTask:
    uid: int
    split: str  # train | query | gallery
    person: int
    pid: int  # dataset pid: > 0 identity, 0 distractor, -1 junk
    cam: int  # 0-based
    tracklet: int  # T number in the names
    num_frames: int
    occluded: bool
    junk: bool

    @property
    def folder(self) -> str:
        return VIDEO_FOLDERS["train" if self.split == "train" else "test"]

    def frame_names(self) -> list[str]:
        return [
            mars_frame_name(self.pid, self.cam + 1, self.tracklet, f + 1)
            for f in range(self.num_frames)
        ]


def _frame_count(rng: np.random.Generator, preset: VideoPreset) -> int:
    lo, hi = math.log(preset.min_frames), math.log(preset.max_frames + 1)
    return int(min(preset.max_frames, math.floor(math.exp(rng.uniform(lo, hi)))))


def _plan_video(
    preset: VideoPreset, seed: int
) -> tuple[list[dict[str, Any]], list[Camera], list[_VideoTask], dict[str, Any]]:
    """Identities, cameras and the tracklets to render, in the parent process."""
    preset.validate()
    rng = np.random.default_rng([seed, 0x71DE0])
    cams = _make_cameras(np.random.default_rng([seed, 0xCA3]), preset.num_cams)
    persons: list[dict[str, Any]] = []
    families: dict[str, dict[str, Any]] = {}
    train_idx = draw_family_group(rng, preset.num_train_ids, "train", persons, families)
    test_idx = draw_family_group(rng, preset.num_test_ids, "test", persons, families)
    pids = (rng.permutation(preset.num_train_ids + preset.num_test_ids) + 1).tolist()
    for person, pid in zip(train_idx + test_idx, pids):
        persons[person]["pid"] = int(pid)
    n_dis_people = math.ceil(preset.num_distractor_tracklets / 2)
    dis_idx = draw_distractor_people(rng, n_dis_people, test_idx, persons, families)

    raw: list[dict[str, Any]] = []  # tracklets before numbering

    def add(split: str, person: int, cam: int, pid: int, junk: bool = False) -> None:
        raw.append(
            {
                "split": split,
                "person": person,
                "cam": cam,
                "pid": pid,
                "frames": _frame_count(rng, preset),
                "junk": junk,
            }
        )

    def n_between(lo_hi: tuple[int, int]) -> int:
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    for person in train_idx:
        cam_list = _pick_cams(rng, preset.num_cams, n_between(preset.cams_per_id))
        persons[person]["cams"] = [c + 1 for c in cam_list]
        for cam in cam_list:
            for _ in range(n_between(preset.train_tracklets_per_cam)):
                add("train", person, cam, persons[person]["pid"])
    single = set(
        rng.choice(test_idx, size=preset.num_single_camera_test_ids, replace=False).tolist()
    )
    for person in test_idx:
        k = 1 if person in single else n_between(preset.cams_per_id)
        cam_list = _pick_cams(rng, preset.num_cams, k)
        persons[person]["cams"] = [c + 1 for c in cam_list]
        for cam in cam_list:
            n = n_between(preset.test_tracklets_per_cam)
            query_at = int(rng.integers(0, n))
            for i in range(n):
                add("query" if i == query_at else "gallery", person, cam, persons[person]["pid"])
    if dis_idx:
        for person, n in zip(
            dis_idx, _split_over(rng, preset.num_distractor_tracklets, len(dis_idx))
        ):
            for _ in range(int(n)):
                add("gallery", person, int(rng.integers(0, preset.num_cams)), 0)
    pool = test_idx + dis_idx
    for _ in range(preset.num_junk_tracklets):
        person = int(pool[int(rng.integers(0, len(pool)))])
        add("gallery", person, int(rng.integers(0, preset.num_cams)), -1, junk=True)

    # occluded tracklets: a fixed share of the non-junk ones
    candidates = [i for i, r in enumerate(raw) if not r["junk"]]
    n_occ = int(round(preset.occluded_share * len(candidates)))
    occluded = set(rng.choice(candidates, size=n_occ, replace=False).tolist()) if n_occ else set()

    # tracklet numbers: running per (name folder), in (pid, cam) order like MARS names
    order = sorted(range(len(raw)), key=lambda i: (raw[i]["pid"] < 0, raw[i]["pid"], i))
    counters: dict[int, int] = {}
    tasks: list[_VideoTask] = []
    for uid, i in enumerate(order):
        r = raw[i]
        counters[r["pid"]] = counters.get(r["pid"], 0) + 1
        tasks.append(
            _VideoTask(
                uid=uid,
                split=r["split"],
                person=r["person"],
                pid=r["pid"],
                cam=r["cam"],
                tracklet=counters[r["pid"]],
                num_frames=r["frames"],
                occluded=i in occluded,
                junk=r["junk"],
            )
        )

    train_set = set(train_idx)
    identities: dict[str, dict[str, Any]] = {}
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
        "single_camera_test_ids": sorted(persons[i]["pid"] for i in single),
        "distractors": [
            {"family": persons[i]["family"], "attributes": persons[i]["attrs"]} for i in dis_idx
        ],
    }
    return [p["attrs"] for p in persons], cams, tasks, meta


# --------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(
    persons: list[dict],
    cams: list[Camera],
    seed: int,
    height: int,
    width: int,
    root: str,
    max_frames: int,
) -> None:
    _WORKER.update(
        persons=persons,
        cams=cams,
        seed=seed,
        height=height,
        width=width,
        root=root,
        max_frames=max_frames,
        bg={},
    )


def _render_video_task(task: _VideoTask) -> tuple[int, list[list[list[float]]], dict | None]:
    w = _WORKER
    cam = w["cams"][task.cam]
    bg = w["bg"].get(task.cam)
    if bg is None:
        bg = video_background(cam, w["seed"], w["height"], w["width"], w["max_frames"])
        w["bg"][task.cam] = bg
    _, occlusion, frames = render_tracklet(
        w["persons"][task.person],
        cam,
        task.num_frames,
        w["seed"],
        task.uid,
        w["height"],
        w["width"],
        bg,
        occluded=task.occluded,
        junk=task.junk,
    )
    root = Path(w["root"])
    names = task.frame_names()
    folder = root / task.folder / names[0][:4]
    folder.mkdir(parents=True, exist_ok=True)
    rows_out: list[list[list[float]]] = []
    occluded_frames: list[dict[str, Any]] = []
    for t, (name, (img, kps, truth, mask)) in enumerate(zip(names, frames)):
        Image.fromarray(img).save(folder / name, format="JPEG", quality=cam.jpeg_quality)
        rows_out.append([[x, y, int(v)] for x, y, v in np.round(kps, 2).tolist()])
        if truth is not None and mask is not None:
            stem = name[: -len(".jpg")]
            Image.fromarray(truth).save(root / "truth" / f"{stem}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")
            occluded_frames.append({"t": t, "area": round(float(mask.mean()), 4)})
    info = None
    if occlusion is not None:
        info = {
            "kind": occlusion.kind,
            "t0": occlusion.t0,
            "duration": occlusion.duration,
            "frames": occluded_frames,
        }
    return task.uid, rows_out, info


# --------------------------------------------------------------------------- API
def _prepare_video_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"synth output {out} exists and is not a directory")
    existing = [e for e in VIDEO_MANAGED_ENTRIES if (out / e).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"synth output {out} already holds {', '.join(existing)}; "
            "pass overwrite=True (CLI: --overwrite) to regenerate it"
        )
    for e in existing:
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for folder in (*VIDEO_FOLDERS.values(), "info", "keypoints", "truth", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)


def _savemat(path: Path, data: dict[str, np.ndarray]) -> None:
    """``scipy.io.savemat`` (MATLAB 5 format, as MARS ships) with a fixed header text:
    scipy writes the creation time there, which would make the output differ per run."""
    import io

    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, data)
    raw = bytearray(buf.getvalue())
    header = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: reidkit synth --video"
    raw[:116] = header.ljust(116, b" ")
    path.write_bytes(bytes(raw))


def _write_info(out: Path, tasks: Sequence[_VideoTask]) -> dict[str, np.ndarray]:
    """MARS ``info/`` files; returns the track tables."""

    tables: dict[str, np.ndarray] = {}
    query_rows: list[int] = []
    for split in ("train", "test"):
        chosen = [t for t in tasks if (t.split == "train") == (split == "train")]
        chosen.sort(key=lambda t: t.frame_names()[0])
        names: list[str] = []
        rows = []
        for row, t in enumerate(chosen):
            start = len(names) + 1
            names.extend(t.frame_names())
            rows.append([start, len(names), t.pid, t.cam + 1])
            if t.split == "query":
                query_rows.append(row + 1)
        (out / "info" / f"{split}_name.txt").write_text("".join(n + "\n" for n in names))
        table = np.asarray(rows, dtype=np.int32).reshape(-1, 4)
        key = f"track_{split}_info"
        _savemat(out / "info" / f"tracks_{split}_info.mat", {key: table})
        tables[key] = table
    query = np.asarray(sorted(query_rows), dtype=np.int32)
    _savemat(out / "info" / "query_IDX.mat", {"query_IDX": query})
    tables["query_IDX"] = query
    return tables


def _split_counts(tasks: Sequence[_VideoTask], split: str) -> dict[str, Any]:
    chosen = [t for t in tasks if t.split == split and t.pid != -1]
    out: dict[str, Any] = {
        "tracklets": len(chosen),
        "ids": len({t.pid for t in chosen if t.pid > 0}),
        "frames": sum(t.num_frames for t in chosen),
        "cameras": sorted({t.cam + 1 for t in chosen}),
    }
    if split == "gallery":
        out["distractor_tracklets"] = sum(t.pid == 0 for t in chosen)
        out["junk_tracklets"] = sum(t.split == "gallery" and t.pid == -1 for t in tasks)
    return out


def generate_video(
    out_dir: str | os.PathLike,
    preset: str | VideoPreset = "tiny-video",
    seed: int = 0,
    workers: int | None = None,
    height: int = 128,
    width: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = False,
) -> dict[str, Any]:
    """Render a synthetic video dataset in the MARS layout into ``out_dir``.

    Args:
        out_dir: target folder (created); must not already hold a dataset unless
            ``overwrite`` (which deletes only the folders/files this function writes).
        preset: a name in ``VIDEO_PRESETS`` or a ``VideoPreset``.
        seed: the output is byte-identical for the same seed, preset and size.
        workers: processes (default ``os.cpu_count()``); 1 renders in-process.
        height, width: stored frame size (default 128 x 64; MARS stores 256 x 128).
        progress: show a tqdm bar (frames).
        preview: also write ``out_dir/preview.png`` (see ``write_video_preview``).

    Returns:
        summary dict (``format_video_summary`` prints it). Counts follow the MARS protocol:
        gallery tracklets exclude junk (pid -1), which is counted separately.
        ``meta.json`` is written last and so marks a complete dataset.
    """
    if isinstance(preset, str):
        if preset not in VIDEO_PRESETS:
            raise ValueError(
                f"unknown synth video preset {preset!r}; choose one of {sorted(VIDEO_PRESETS)}"
            )
        preset = VIDEO_PRESETS[preset]
    if height < 32 or width < 16:
        raise ValueError(f"synth frame size must be at least 32x16 (HxW); got {height}x{width}")
    t_start = time.perf_counter()
    out = Path(out_dir)
    persons, cams, tasks, meta = _plan_video(preset, seed)
    _prepare_video_out(out, overwrite)
    workers = max(1, int(workers or os.cpu_count() or 1))
    workers = min(workers, max(1, len(tasks) // 4))
    init_args = (persons, cams, seed, height, width, str(out), preset.max_frames)
    by_uid = {t.uid: t for t in tasks}
    keypoints: dict[str, dict[str, list]] = {f: {} for f in VIDEO_FOLDERS.values()}
    occlusion_frames: dict[str, dict[str, Any]] = {}
    occluded_tracklets: list[dict[str, Any]] = []
    from tqdm import tqdm

    total_frames = sum(t.num_frames for t in tasks)
    bar = tqdm(total=total_frames, desc=f"synth {preset.name}", unit="frame", disable=not progress)

    def collect(result: tuple[int, list, dict | None]) -> None:
        uid, rows, info = result
        task = by_uid[uid]
        names = task.frame_names()
        for name, r in zip(names, rows):
            keypoints[task.folder][name] = r
        if info is not None:
            for f in info["frames"]:
                occlusion_frames[names[f["t"]]] = {
                    "kind": info["kind"],
                    "tracklet": names[0],
                    "t": f["t"],
                    "area": f["area"],
                }
            occluded_tracklets.append(
                {
                    "first_frame": names[0],
                    "split": task.split,
                    "kind": info["kind"],
                    "crossing": [info["t0"], info["t0"] + info["duration"] - 1],
                    "occluded_frames": [f["t"] for f in info["frames"]],
                }
            )
        bar.update(task.num_frames)

    try:
        if workers == 1:
            _init_worker(*init_args)
            for task in tasks:
                collect(_render_video_task(task))
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
                for result in pool.imap(_render_video_task, tasks, chunksize=2):
                    collect(result)
    finally:
        bar.close()
    for folder, rows in keypoints.items():
        with open(out / "keypoints" / f"{folder}.json", "w") as f:
            json.dump(dict(sorted(rows.items())), f, separators=(",", ":"))
    _write_info(out, tasks)
    occluded_tracklets.sort(key=lambda r: r["first_frame"])
    with open(out / "occlusion.json", "w") as f:
        json.dump(
            {
                "frames": dict(sorted(occlusion_frames.items())),
                "tracklets": occluded_tracklets,
            },
            f,
            indent=1,
        )

    splits = {s: _split_counts(tasks, s) for s in ("train", "query", "gallery")}
    single = set(meta["single_camera_test_ids"])
    occ = {
        "tracklets": len(occluded_tracklets),
        "frames": len(occlusion_frames),
        "kinds": {
            k: sum(r["kind"] == k for r in occluded_tracklets)
            for k in OCCLUDER_KINDS
            if any(r["kind"] == k for r in occluded_tracklets)
        },
    }
    counts = {
        **splits,
        "occlusion": occ,
        "queries_without_cross_camera_match": sum(
            t.split == "query" and t.pid in single for t in tasks
        ),
    }
    lengths = [t.num_frames for t in tasks]
    counts["frames_per_tracklet"] = {
        "min": min(lengths),
        "max": max(lengths),
        "mean": round(float(np.mean(lengths)), 1),
    }
    summary = {
        "root": str(out),
        "preset": preset.name,
        "seed": seed,
        "height": height,
        "width": width,
        "num_cams": preset.num_cams,
        "counts": counts,
        "seconds": round(time.perf_counter() - t_start, 2),
        "workers": workers,
    }
    full = {
        "version": VIDEO_META_VERSION,
        "generator": "reidkit.data.synth.video",
        "layout": "mars",
        "preset": asdict(preset),
        "seed": seed,
        "height": height,
        "width": width,
        "counts": counts,
        "keypoint_names": list(COCO_KEYPOINT_NAMES),
        "cameras": [asdict(c) | {"name": f"c{c.index + 1}"} for c in cams],
        **meta,
    }
    # meta.json must not depend on timing / workers: it is part of the byte-identical output
    with open(out / "meta.json", "w") as f:
        json.dump(full, f, indent=1)
    if preview:
        from .preview import write_video_preview

        write_video_preview(out)
    return summary


def format_video_summary(summary: dict[str, Any]) -> str:
    """Human-readable table of a ``generate_video`` summary."""
    c = summary["counts"]
    lines = [
        f"synthetic video dataset '{summary['preset']}' (seed {summary['seed']}, "
        f"{summary['height']}x{summary['width']}, {summary['num_cams']} cameras, MARS layout) "
        f"-> {summary['root']}",
        f"  {'split':<8} {'tracklets':>9} {'ids':>5} {'frames':>7}  cameras",
    ]
    for split in ("train", "query", "gallery"):
        s = c[split]
        cams = ",".join(str(x) for x in s["cameras"])
        extra = ""
        if split == "gallery":
            extra = (
                f"  (incl. {s['distractor_tracklets']} distractor tracklets 0000; "
                f"{s['junk_tracklets']} junk tracklets 00-1 not counted)"
            )
        lines.append(
            f"  {split:<8} {s['tracklets']:>9} {s['ids']:>5} {s['frames']:>7}  {cams}{extra}"
        )
    occ = c["occlusion"]
    kinds = ", ".join(f"{k} {n}" for k, n in occ["kinds"].items()) or "none"
    lines.append(
        f"  occluded: {occ['tracklets']} tracklets ({kinds}), {occ['frames']} frames "
        "with truth/ and masks/"
    )
    fpt = c["frames_per_tracklet"]
    lonely = c["queries_without_cross_camera_match"]
    lines.append(
        f"  frames per tracklet {fpt['min']}-{fpt['max']} (mean {fpt['mean']}); "
        f"{lonely} {'query' if lonely == 1 else 'queries'} without a cross-camera match"
    )
    total = sum(c[s]["frames"] for s in ("train", "query", "gallery"))
    lines.append(
        f"  total {total} frames (+ junk) in {summary['seconds']:.1f} s "
        f"with {summary['workers']} worker(s)"
    )
    return "\n".join(lines)
