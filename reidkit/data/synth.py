"""Synthetic pedestrian re-ID dataset, rendered with numpy + Pillow.

``generate(out_dir, preset="tiny")`` writes a Market-1501 style tree::

    out_dir/bounding_box_train/0002_c1s3_012345_01.jpg   train images
    out_dir/query/...                                    one query per (test id, camera)
    out_dir/bounding_box_test/...                        gallery, incl. 0000 distractors, -1 junk
    out_dir/keypoints/<split_folder>.json                COCO-17 [x, y, v] per image
    out_dir/meta.json                                    preset, seed, counts, cameras,
                                                         per-identity cues and families

Identity cues live in separate body regions (head: hair colour/style and hat; upper
garment: colour, sleeves, pattern plain/stripes/logo; lower garment: colour and type
trousers/shorts/skirt; shoes; carried bag: backpack/handbag/strap; body width/height).
Identities come in look-alike *families* that share every cue except one or two small
local ones (shoes, hat, bag, logo/stripe colour or hair colour), so a model that only
looks at the most salient cue (the upper-body colour) confuses family members.

Cameras differ in illumination, colour cast, saturation, background, blur, noise, JPEG
quality and viewpoint distribution (front/back/side decides which cues are visible: a
backpack is seen from the back, a logo only from the front). Each image varies the
walking phase, scale and position in the box (detector misalignment) and sometimes has a
partial occluder (box, pole or another person).

Rendering: body parts are projected from a simple 3D skeleton (orthographic, yaw about
the vertical axis) and drawn back to front (painter's algorithm) as polygons and ellipses
on a 2x supersampled canvas, then reduced; camera effects are vectorised numpy.
Keypoints come from the same skeleton: ``v=2`` visible, ``v=1`` inside the image but
hidden (self-occluded, facing away, or behind an occluder), ``v=0`` outside the image
(written as ``[0, 0, 0]`` like COCO).

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "PRESETS",
    "SynthPreset",
    "COCO_KEYPOINT_NAMES",
    "SPLIT_FOLDERS",
    "generate",
    "ensure_synth",
    "format_summary",
    "write_preview",
    "sample_identity",
    "render_sample",
    "Camera",
    "Tracklet",
    "CUE_KEYS",
    "FAMILY_VARYING_CUES",
]

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MANAGED_ENTRIES = (*SPLIT_FOLDERS.values(), "keypoints", "meta.json", "preview.png")
META_VERSION = 1

COCO_KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

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


# --------------------------------------------------------------------------- palettes
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 230),
    "grey": (132, 132, 132),
    "dark_grey": (68, 68, 72),
    "navy": (28, 38, 92),
    "blue": (38, 88, 205),
    "light_blue": (128, 180, 232),
    "red": (205, 32, 36),
    "maroon": (112, 24, 36),
    "green": (36, 145, 62),
    "olive": (108, 112, 46),
    "yellow": (235, 205, 38),
    "orange": (238, 122, 28),
    "pink": (238, 138, 172),
    "purple": (112, 48, 152),
    "brown": (112, 70, 38),
    "beige": (205, 184, 140),
    "teal": (28, 132, 132),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (22, 18, 16),
    "dark_brown": (58, 38, 24),
    "brown": (112, 74, 42),
    "blonde": (214, 182, 108),
    "grey": (168, 166, 162),
    "auburn": (140, 58, 28),
}
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "light": (242, 208, 182),
    "fair": (226, 182, 148),
    "tan": (192, 142, 102),
    "brown": (142, 96, 64),
    "dark": (96, 64, 44),
}
UPPER_COLOURS = tuple(PALETTE)
LOWER_COLOURS = (
    "black",
    "navy",
    "blue",
    "light_blue",
    "dark_grey",
    "grey",
    "beige",
    "brown",
    "olive",
    "white",
    "maroon",
    "green",
)
SHOE_COLOURS = ("black", "white", "red", "blue", "brown", "grey", "yellow", "green", "orange")
ACCENT_COLOURS = ("white", "black", "red", "yellow", "blue", "green", "orange", "pink", "teal")
HAT_COLOURS = ("black", "white", "red", "navy", "yellow", "green", "grey", "orange", "pink")
BAG_COLOURS = ("black", "brown", "red", "blue", "grey", "green", "orange", "purple", "beige")
HAIR_STYLES = ("short", "long", "ponytail", "buzz")
HATS = ("none", "cap", "beanie")
BAGS = ("none", "backpack", "handbag", "strap")
PATTERNS = ("plain", "stripes", "logo")
LOWER_TYPES = ("trousers", "shorts", "skirt")

# cues that may differ inside a look-alike family (small, local)
FAMILY_VARYING_CUES = ("shoes", "hat", "bag", "accent", "hair_colour")
CUE_KEYS: dict[str, tuple[str, ...]] = {
    "shoes": ("shoes_colour",),
    "hat": ("hat", "hat_colour"),
    "bag": ("bag", "bag_colour"),
    "accent": ("upper_accent",),
    "hair_colour": ("hair_colour",),
}


def _choice(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float] | None = None):
    if p is not None:
        p = np.asarray(p, dtype=np.float64)
        p = p / p.sum()
    return options[int(rng.choice(len(options), p=p))]


def _sample_cue(rng: np.random.Generator, cue: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """New values for one family-varying cue group."""
    if cue == "shoes":
        return {"shoes_colour": _choice(rng, SHOE_COLOURS)}
    if cue == "hat":
        hat = _choice(rng, HATS, [0.5, 0.3, 0.2])
        return {"hat": hat, "hat_colour": "none" if hat == "none" else _choice(rng, HAT_COLOURS)}
    if cue == "bag":
        bag = _choice(rng, BAGS, [0.3, 0.3, 0.2, 0.2])
        return {"bag": bag, "bag_colour": "none" if bag == "none" else _choice(rng, BAG_COLOURS)}
    if cue == "accent":
        options = [c for c in ACCENT_COLOURS if c != attrs["upper_colour"]]
        return {"upper_accent": _choice(rng, options)}
    if cue == "hair_colour":
        return {"hair_colour": _choice(rng, tuple(HAIR_COLOURS))}
    raise KeyError(cue)


def sample_identity(rng: np.random.Generator) -> dict[str, Any]:
    """Draw the cue values of one identity (a JSON-able dict of names and numbers)."""
    upper = _choice(rng, UPPER_COLOURS)
    pattern = _choice(rng, PATTERNS, [0.45, 0.25, 0.3])
    lower_type = _choice(rng, LOWER_TYPES, [0.65, 0.2, 0.15])
    lower_options = [c for c in LOWER_COLOURS if c != upper] or list(LOWER_COLOURS)
    attrs: dict[str, Any] = {
        "height": round(float(rng.uniform(0.9, 1.08)), 3),
        "width": round(float(rng.uniform(0.86, 1.2)), 3),
        "skin": _choice(rng, tuple(SKIN_TONES)),
        "hair_style": _choice(rng, HAIR_STYLES, [0.4, 0.25, 0.15, 0.2]),
        "upper_colour": upper,
        "upper_pattern": pattern,
        "sleeves": _choice(rng, ("long", "short"), [0.55, 0.45]),
        "lower_type": lower_type,
        "lower_colour": _choice(rng, lower_options),
    }
    for cue in FAMILY_VARYING_CUES:
        attrs.update(_sample_cue(rng, cue, attrs))
    return attrs


def _cue_signature(attrs: dict[str, Any], cues: Sequence[str]) -> tuple:
    return tuple(attrs[k] for c in cues for k in CUE_KEYS[c])


def _make_family(
    rng: np.random.Generator, size: int, max_tries: int = 50
) -> tuple[list[dict[str, Any]], list[str]]:
    """A template identity and ``size`` members that differ only in 1-2 local cues."""
    template = sample_identity(rng)
    if size == 1:
        return [template], []
    eligible = [
        c for c in FAMILY_VARYING_CUES if c != "accent" or template["upper_pattern"] != "plain"
    ]
    num_varying = 1 if rng.random() < 0.55 else 2
    varies = sorted(rng.choice(eligible, size=num_varying, replace=False).tolist())
    members = [dict(template)]
    seen = {_cue_signature(template, varies)}
    tries = 0
    while len(members) < size and tries < max_tries * size:
        tries += 1
        member = dict(template)
        # change at least one varying cue group, sometimes both
        for i, cue in enumerate(varies):
            if i == 0 or rng.random() < 0.6:
                member.update(_sample_cue(rng, cue, member))
        sig = _cue_signature(member, varies)
        if sig not in seen:
            seen.add(sig)
            members.append(member)
    return members, varies


# --------------------------------------------------------------------------- cameras
_YAW_DIRS = np.arange(8) * (math.pi / 4)  # 0 = facing the camera, pi = facing away
_YAW_PROFILES = (
    # corridor: people walk towards / away from the camera
    (0.42, 0.04, 0.02, 0.04, 0.42, 0.02, 0.02, 0.02),
    # crossing: people walk left / right
    (0.06, 0.06, 0.38, 0.0, 0.06, 0.0, 0.38, 0.06),
    # diagonal
    (0.1, 0.25, 0.05, 0.2, 0.1, 0.2, 0.05, 0.05),
    # mostly front
    (0.55, 0.12, 0.06, 0.0, 0.1, 0.0, 0.05, 0.12),
    # mostly back
    (0.1, 0.0, 0.06, 0.14, 0.5, 0.14, 0.06, 0.0),
    # mixed
    (0.14, 0.11, 0.14, 0.11, 0.14, 0.11, 0.14, 0.11),
)
_BACKGROUNDS = ("pavement", "wall", "park", "shopfront", "road", "brick")
_CASTS = (
    (1.0, 1.0, 1.0),
    (1.12, 1.0, 0.82),  # warm / sodium
    (0.86, 0.97, 1.16),  # cool / overcast
    (0.93, 1.08, 0.9),  # fluorescent green
    (1.06, 0.96, 1.04),  # magenta tint
    (0.97, 1.0, 1.08),
)


@dataclass(frozen=True)
class Camera:
    """Appearance model of one camera (all effects applied at the stored resolution)."""

    index: int
    background: str
    bg_colours: tuple[tuple[int, int, int], ...]
    gain: float
    cast: tuple[float, float, float]
    saturation: float
    gamma: float
    light_gradient: float
    blur: float
    noise: float
    jpeg_quality: int
    yaw_profile: tuple[float, ...]
    occlusion_prob: float
    scale: float


def _make_cameras(rng: np.random.Generator, num_cams: int) -> list[Camera]:
    order = rng.permutation(len(_YAW_PROFILES))
    cast_order = rng.permutation(len(_CASTS))
    cams = []
    for c in range(num_cams):
        base = np.array(
            [rng.uniform(90, 200), rng.uniform(90, 190), rng.uniform(80, 190)], dtype=np.float64
        )
        # muted scene colours: random hue, mostly grey
        colours = tuple(
            tuple(
                int(v)
                for v in np.clip(
                    0.4 * base * rng.uniform(0.6, 1.25, 3) + 0.6 * base.mean(), 20, 235
                )
            )
            for _ in range(4)
        )
        cams.append(
            Camera(
                index=c,
                background=_BACKGROUNDS[c % len(_BACKGROUNDS)],
                bg_colours=colours,
                gain=round(float(rng.uniform(0.72, 1.22)), 3),
                cast=_CASTS[int(cast_order[c % len(_CASTS)])],
                saturation=round(float(rng.uniform(0.65, 1.1)), 3),
                gamma=round(float(rng.uniform(0.85, 1.18)), 3),
                light_gradient=round(float(rng.uniform(-0.25, 0.25)), 3),
                blur=round(float(rng.choice([0.0, 0.3, 0.5, 0.7])), 3),
                noise=round(float(rng.uniform(2.0, 8.0)), 3),
                jpeg_quality=int(rng.integers(72, 96)),
                yaw_profile=_YAW_PROFILES[int(order[c % len(order)])],
                occlusion_prob=round(float(rng.uniform(0.06, 0.22)), 3),
                scale=round(float(rng.uniform(0.84, 0.93)), 3),
            )
        )
    return cams


def _lowfreq(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [0, 1], shape (h, w)."""
    small = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(cam: Camera, seed: int, h: int, w: int) -> np.ndarray:
    """Camera background texture, uint8 (h, w, 3); crops of it are used per image."""
    rng = np.random.default_rng([seed, 0xBAC6, cam.index])
    cols = np.array(cam.bg_colours, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ynorm = yy / h
    out = np.empty((h, w, 3), np.float32)
    horizon = rng.uniform(0.35, 0.55)
    kind = cam.background
    if kind == "pavement":
        out[:] = cols[0]
        # tiles: rows get wider towards the bottom (cheap perspective)
        t = np.sqrt(np.clip(ynorm, 0, 1)) * 9.0
        rows = (np.abs(t - np.round(t)) < 0.035).astype(np.float32)
        colw = w / rng.uniform(3.0, 5.0)
        colsl = (np.abs((xx + 0.4 * yy) % colw - colw / 2) > colw / 2 - 1.5).astype(np.float32)
        out *= (1 - 0.25 * np.maximum(rows, colsl))[..., None]
    elif kind == "wall":
        wall = ynorm < horizon
        out[:] = cols[1]
        out[wall] = cols[0]
        panel = w / rng.uniform(2.5, 4.5)
        seams = ((xx % panel) < 2.0) & wall
        out[seams] *= 0.7
        # a window
        x0 = rng.uniform(0.1, 0.5) * w
        win = (xx > x0) & (xx < x0 + 0.3 * w) & (ynorm > 0.08) & (ynorm < horizon - 0.1)
        out[win] = cols[2] * 0.6 + np.array([30, 40, 60], np.float32)
        out[np.abs(ynorm - horizon) < 0.006] *= 0.6
    elif kind == "park":
        out[:] = np.array([70, 120, 55], np.float32) * 0.7 + cols[0] * 0.3
        hedge = ynorm < horizon
        out[hedge] = np.array([35, 75, 35], np.float32) * 0.8 + cols[1] * 0.2
        leaf = _lowfreq(rng, h, w, 3)
        out *= (0.75 + 0.5 * leaf)[..., None]
        path = np.abs(xx / w - 0.5 - 0.3 * (ynorm - 0.5)) < 0.28
        out[path & ~hedge] = cols[3] * 0.9
    elif kind == "shopfront":
        out[:] = cols[0]
        top = ynorm < horizon
        x = 0.0
        k = 0
        while x < w:
            width = rng.uniform(0.2, 0.45) * w
            colour = np.array(PALETTE[_choice(rng, UPPER_COLOURS)], np.float32) * 0.55 + 60
            block = top & (xx >= x) & (xx < x + width - 3) & (ynorm > 0.05 + 0.04 * (k % 2))
            out[block] = colour
            x += width
            k += 1
        floor = ~top
        out[floor] = cols[1] * (0.85 + 0.3 * ynorm[floor])[:, None]
    elif kind == "road":
        out[:] = np.array([70, 70, 74], np.float32) * 0.7 + cols[0] * 0.25
        curb = np.abs(ynorm - horizon) < 0.02
        out[ynorm < horizon] = cols[1] * 0.9
        out[curb] = np.array([190, 190, 185], np.float32)
        stripe_y = horizon + 0.3
        dash = (np.abs(ynorm - stripe_y) < 0.02) & (((xx + 0.0) % (w / 3)) < w / 6)
        out[dash] = np.array([225, 225, 210], np.float32)
    else:  # brick
        out[:] = np.array([150, 70, 50], np.float32) * 0.6 + cols[0] * 0.4
        bh = h / rng.uniform(14, 20)
        bw = bh * 2.2
        row = np.floor(yy / bh)
        mortar = ((yy % bh) < 1.2) | (((xx + (row % 2) * bw / 2) % bw) < 1.2)
        out[mortar] = np.array([200, 195, 185], np.float32)
        floor = ynorm > horizon + 0.2
        out[floor] = cols[1]
    out *= (0.85 + 0.3 * _lowfreq(rng, h, w, 24))[..., None]
    out += rng.normal(0, 6, size=out.shape).astype(np.float32)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(1))
    return np.asarray(img)


# --------------------------------------------------------------------------- rendering
@dataclass
class _Shape:
    depth: float
    kind: str  # poly | ellipse | capsule | chord | line
    geom: Any
    colour: tuple[int, int, int]
    owner: str = ""  # limb the shape belongs to ("" = none); used for keypoint occlusion
    occludes: bool = True


def _rgb(name: str, table: dict[str, tuple[int, int, int]] = PALETTE) -> tuple[int, int, int]:
    return table[name]


def _shade(colour: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in colour)  # type: ignore[return-value]


def _skeleton(
    attrs: dict[str, Any], phase: float, stride: float, handbag: bool
) -> dict[str, np.ndarray]:
    """3D joints in units of standing height: x = person's left, y down from the head top,
    z = forward. Returns a dict of (3,) arrays (plus ``ground`` y)."""
    w = attrs["width"]
    legf = 1.0 + 0.6 * (attrs["height"] - 1.0)
    sh, hp = 0.112 * w, 0.074 * w
    thigh, shin = 0.222 * legf, 0.212 * legf
    upper_arm, forearm = 0.172, 0.152
    hip_y = 0.52
    j: dict[str, np.ndarray] = {}
    j["head"] = np.array([0.0, 0.068, 0.004])
    j["neck"] = np.array([0.0, 0.142, 0.0])
    for side, sgn in (("l", 1.0), ("r", -1.0)):
        j[f"{side}_shoulder"] = np.array([sgn * sh, 0.188, 0.0])
        j[f"{side}_hip"] = np.array([sgn * hp, hip_y, 0.0])
        ph = phase if side == "l" else phase + math.pi
        a = stride * math.sin(ph)  # thigh swing, + = forward
        b = 0.06 + 0.55 * stride * max(0.0, math.cos(ph)) ** 2  # knee flexion in swing
        knee = j[f"{side}_hip"] + thigh * np.array([-sgn * 0.01, math.cos(a), math.sin(a)])
        ankle = knee + shin * np.array([-sgn * 0.02, math.cos(a - b), math.sin(a - b)])
        j[f"{side}_knee"], j[f"{side}_ankle"] = knee, ankle
        # arms swing opposite to the leg on the same side
        g = -0.8 * stride * math.sin(ph)
        d = 0.18 + 0.35 * max(0.0, math.sin(g))
        if handbag and side == "r":
            g, d = 0.25 * g, 0.05
        elbow = j[f"{side}_shoulder"] + upper_arm * np.array([sgn * 0.12, math.cos(g), math.sin(g)])
        wrist = elbow + forearm * np.array([sgn * 0.08, math.cos(g + d), math.sin(g + d)])
        j[f"{side}_elbow"], j[f"{side}_wrist"] = elbow, wrist
    standing_ground = hip_y + thigh + shin + 0.036
    lowest = max(j["l_ankle"][1], j["r_ankle"][1]) + 0.036
    drop = standing_ground - lowest  # vertical bob: the stance foot touches the ground
    for v in j.values():
        v[1] += drop
    j["ground"] = np.array([0.0, standing_ground, 0.0])
    j["height_units"] = np.array([standing_ground, 0.0, 0.0])
    return j


class _Projector:
    """Orthographic projection of body coordinates to canvas pixels."""

    def __init__(self, yaw: float, cx: float, top: float, scale: float):
        self.c, self.s = math.cos(yaw), math.sin(yaw)
        self.cx, self.top, self.scale = cx, top, scale

    def xy(self, p: np.ndarray) -> tuple[float, float]:
        return (
            self.cx + (p[0] * self.c + p[2] * self.s) * self.scale,
            self.top + p[1] * self.scale,
        )

    def depth(self, p: np.ndarray) -> float:
        return -p[0] * self.s + p[2] * self.c


def _quad(p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float) -> list:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy) or 1e-6
    nx, ny = -dy / n, dx / n
    return [
        (p0[0] + nx * r0, p0[1] + ny * r0),
        (p1[0] + nx * r1, p1[1] + ny * r1),
        (p1[0] - nx * r1, p1[1] - ny * r1),
        (p0[0] - nx * r0, p0[1] - ny * r0),
    ]


def _box_poly(pr: _Projector, centre: np.ndarray, half: tuple[float, float, float]) -> list:
    """Silhouette of an axis-aligned (body frame) box: a rectangle in the image."""
    cx, cy = pr.xy(centre)
    hx = (half[0] * abs(pr.c) + half[2] * abs(pr.s)) * pr.scale
    hy = half[1] * pr.scale
    return [(cx - hx, cy - hy), (cx + hx, cy - hy), (cx + hx, cy + hy), (cx - hx, cy + hy)]


def _person_shapes(
    attrs: dict[str, Any],
    yaw: float,
    phase: float,
    stride: float,
    cx: float,
    top: float,
    height_px: float,
) -> tuple[list[_Shape], np.ndarray, np.ndarray, _Projector, tuple[float, float]]:
    """Shapes of one person plus keypoints.

    Returns (shapes, kps (17, 2) canvas xy, kp_info (17, 2) [depth, facing], projector,
    feet (x, y)).
    """
    bag = attrs["bag"]
    j = _skeleton(attrs, phase, stride, handbag=bag == "handbag")
    scale = height_px / float(j["height_units"][0])
    pr = _Projector(yaw, cx, top, scale)
    c, s = pr.c, pr.s
    shapes: list[_Shape] = []
    skin = _rgb(attrs["skin"], SKIN_TONES)
    upper = _rgb(attrs["upper_colour"])
    lower = _rgb(attrs["lower_colour"])
    shoe = _rgb(attrs["shoes_colour"])
    hair = _rgb(attrs["hair_colour"], HAIR_COLOURS)
    wf = 0.5 + 0.5 * attrs["width"]
    P = pr.xy
    D = pr.depth

    def capsule(a, b, r0, r1, colour, depth, owner):
        shapes.append(_Shape(depth, "capsule", (P(a), P(b), r0 * scale, r1 * scale), colour, owner))

    # ---- legs: thigh / shin capsules, shoes
    for side in ("l", "r"):
        hip, knee, ankle = j[f"{side}_hip"], j[f"{side}_knee"], j[f"{side}_ankle"]
        dl = (D(hip) + D(knee) + D(ankle)) / 3
        owner = f"leg_{side}"
        leg_colour = lower if attrs["lower_type"] == "trousers" else skin
        capsule(knee, ankle, 0.033 * wf, 0.026 * wf, leg_colour, dl, owner)
        if attrs["lower_type"] == "shorts":
            mid = hip + 0.62 * (knee - hip)
            capsule(mid, knee, 0.04 * wf, 0.034 * wf, skin, dl + 1e-4, owner)
            capsule(hip, mid, 0.05 * wf, 0.044 * wf, lower, dl + 2e-4, owner)
        else:
            capsule(hip, knee, 0.047 * wf, 0.035 * wf, leg_colour, dl + 1e-4, owner)
        # shoe: heel/toe along the body's forward axis
        lat = 0.027
        pts = [ankle + np.array([dxl, 0.0, dz]) for dxl in (-lat, lat) for dz in (-0.028, 0.07)]
        xs = [P(p)[0] for p in pts]
        _, ay = P(ankle)
        shapes.append(
            _Shape(
                D(ankle) + 0.02 * c + 3e-4,
                "ellipse",
                (min(xs), ay - 0.006 * scale, max(xs), ay + 0.038 * scale),
                shoe,
                owner,
            )
        )

    # ---- pelvis / skirt
    hl, hr = j["l_hip"], j["r_hip"]
    hip_y = P(hl)[1]
    hwp = (abs(hl[0]) * abs(c) + 0.05 * abs(s)) * scale * 1.08
    hcx = P((hl + hr) / 2)[0]
    if attrs["lower_type"] == "skirt":
        knees_x = [P(j["l_knee"])[0], P(j["r_knee"])[0]]
        bot_y = hip_y + 0.2 * scale
        bw = max(hwp * 1.3, (max(knees_x) - min(knees_x)) / 2 + 0.045 * scale)
        bcx = (knees_x[0] + knees_x[1]) / 2
        poly = [
            (hcx - hwp, hip_y - 0.02 * scale),
            (hcx + hwp, hip_y - 0.02 * scale),
            (bcx + bw, bot_y),
            (bcx - bw, bot_y),
        ]
        d = max(D(hl), D(hr), D(j["l_knee"]), D(j["r_knee"])) + 0.01
        shapes.append(_Shape(d, "poly", poly, lower, "pelvis"))
    else:
        poly = [
            (hcx - hwp, hip_y - 0.03 * scale),
            (hcx + hwp, hip_y - 0.03 * scale),
            (hcx + hwp * 0.92, hip_y + 0.075 * scale),
            (hcx - hwp * 0.92, hip_y + 0.075 * scale),
        ]
        shapes.append(_Shape(-1e-3, "poly", poly, lower, "pelvis"))

    # ---- torso (upper garment)
    ls, rs = j["l_shoulder"], j["r_shoulder"]
    sy = P(ls)[1]
    scx = P((ls + rs) / 2)[0]
    swp = (abs(ls[0]) * abs(c) + 0.056 * abs(s)) * scale
    neck_w = 0.04 * scale
    neck_y = P(j["neck"])[1]
    bottom_y = hip_y + 0.012 * scale
    torso = [
        (scx - neck_w, neck_y),
        (scx - swp, sy - 0.008 * scale),
        (scx - swp * 0.98, sy + 0.04 * scale),
        (hcx - hwp * 0.98, bottom_y),
        (hcx + hwp * 0.98, bottom_y),
        (scx + swp * 0.98, sy + 0.04 * scale),
        (scx + swp, sy - 0.008 * scale),
        (scx + neck_w, neck_y),
    ]
    shapes.append(_Shape(0.0, "poly", torso, upper, "torso"))
    accent = _rgb(attrs["upper_accent"])
    if attrs["upper_pattern"] == "stripes":
        left_top, left_bot = (scx - swp * 0.98, sy + 0.02 * scale), (hcx - hwp * 0.98, bottom_y)
        right_top, right_bot = (scx + swp * 0.98, sy + 0.02 * scale), (hcx + hwp * 0.98, bottom_y)

        def lerp(a, b, t):
            return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)

        for t0 in (0.12, 0.42, 0.72):
            t1 = t0 + 0.14
            band = [
                lerp(left_top, left_bot, t0),
                lerp(right_top, right_bot, t0),
                lerp(right_top, right_bot, t1),
                lerp(left_top, left_bot, t1),
            ]
            shapes.append(_Shape(1e-4, "poly", band, accent, "torso", occludes=False))
    elif attrs["upper_pattern"] == "logo" and c > 0.15:
        zc = 0.058
        corners = [
            np.array([x, y, zc])
            for x, y in ((-0.036, 0.245), (0.036, 0.245), (0.036, 0.315), (-0.036, 0.315))
        ]
        shapes.append(
            _Shape(zc * c, "poly", [P(q) for q in corners], accent, "torso", occludes=False)
        )

    # ---- arms
    for side in ("l", "r"):
        sh_, el, wr = j[f"{side}_shoulder"], j[f"{side}_elbow"], j[f"{side}_wrist"]
        da = (D(sh_) + D(el) + D(wr)) / 3 + 0.004
        owner = f"arm_{side}"
        sleeve = upper if attrs["sleeves"] == "long" else skin
        capsule(el, wr, 0.027 * wf, 0.022 * wf, sleeve, da, owner)
        if attrs["sleeves"] == "short":
            mid = sh_ + 0.55 * (el - sh_)
            capsule(mid, el, 0.029 * wf, 0.027 * wf, skin, da + 1e-4, owner)
            capsule(sh_, mid, 0.036 * wf, 0.033 * wf, upper, da + 2e-4, owner)
        else:
            capsule(sh_, el, 0.034 * wf, 0.028 * wf, upper, da + 1e-4, owner)
        hand = wr + 0.3 * (wr - el) / (np.linalg.norm(wr - el) + 1e-9) * 0.05
        hx, hy = P(hand)
        r = 0.021 * scale
        shapes.append(_Shape(da + 3e-4, "ellipse", (hx - r, hy - r, hx + r, hy + r), skin, owner))

    # ---- head, neck, hair, hat
    head = j["head"]
    hx, hy = P(head)
    rx = (0.05 * abs(c) + 0.058 * abs(s)) * scale
    ry = 0.064 * scale
    neck_top = head + np.array([0.0, 0.04, -0.005])
    capsule(neck_top, j["neck"] + np.array([0.0, 0.02, 0.0]), 0.024, 0.026, skin, -0.02, "head")
    dh = 0.03
    shapes.append(_Shape(dh, "ellipse", (hx - rx, hy - ry, hx + rx, hy + ry), skin, "head"))
    if c > 0.3:  # eyes, seen from the front
        for ex in (0.018, -0.018):
            e = head + np.array([ex, -0.002, 0.045])
            px, py = P(e)
            er = 0.0085 * scale
            shapes.append(
                _Shape(
                    dh + 5e-4,
                    "ellipse",
                    (px - er, py - er, px + er, py + er),
                    (40, 30, 30),
                    "head",
                    occludes=False,
                )
            )
    back_w = (1.0 - c) / 2.0  # 0 facing the camera, 1 facing away
    centre_angle = 270.0 - 38.0 * s
    style = attrs["hair_style"]
    if style == "long":
        p_hair = head + np.array([0.0, 0.0, -0.035])
        top_x, top_y = P(p_hair)
        hw = rx * 1.02
        poly = [
            (top_x - hw, top_y),
            (top_x + hw, top_y),
            (top_x + hw * 1.1, top_y + 0.17 * scale),
            (top_x - hw * 1.1, top_y + 0.17 * scale),
        ]
        shapes.append(_Shape(D(p_hair) - 0.005, "poly", poly, hair, "head", occludes=False))
    elif style == "ponytail":
        p_tail = head + np.array([0.0, 0.02, -0.06])
        tx, ty = P(p_tail)
        shapes.append(
            _Shape(
                D(p_tail),
                "ellipse",
                (tx - 0.022 * scale, ty - 0.02 * scale, tx + 0.022 * scale, ty + 0.085 * scale),
                hair,
                "head",
                occludes=False,
            )
        )
    span = {"short": 100.0, "long": 108.0, "ponytail": 100.0, "buzz": 82.0}[style]
    span += 62.0 * back_w
    hair_col = hair if style != "buzz" else _shade(hair, 1.25)
    grow = 1.06 if style != "buzz" else 1.0
    bbox = (hx - rx * grow, hy - ry * grow, hx + rx * grow, hy + ry * 1.02)
    shapes.append(
        _Shape(
            dh + 1e-3,
            "chord",
            (bbox, centre_angle - span, centre_angle + span),
            hair_col,
            "head",
            occludes=False,
        )
    )
    if attrs["hat"] != "none":
        hat = _rgb(attrs["hat_colour"])
        if attrs["hat"] == "cap":
            bbox = (hx - rx * 1.08, hy - ry * 1.1, hx + rx * 1.08, hy + ry * 1.0)
            shapes.append(
                _Shape(
                    dh + 2e-3,
                    "chord",
                    (bbox, centre_angle - 92, centre_angle + 92),
                    hat,
                    "head",
                    occludes=False,
                )
            )
            brim_c = head + np.array([0.0, -0.012, 0.05])
            bx, by = P(brim_c)
            bhw = (0.046 * abs(c) + 0.042 * abs(s)) * scale
            shapes.append(
                _Shape(
                    D(brim_c) + dh,
                    "ellipse",
                    (bx - bhw, by - 0.01 * scale, bx + bhw, by + 0.012 * scale),
                    _shade(hat, 0.85),
                    "head",
                    occludes=False,
                )
            )
        else:  # beanie
            bbox = (hx - rx * 1.1, hy - ry * 1.28, hx + rx * 1.1, hy + ry * 0.9)
            shapes.append(
                _Shape(dh + 2e-3, "chord", (bbox, 180.0, 360.0), hat, "head", occludes=False)
            )

    # ---- bags
    if bag != "none":
        bagc = _rgb(attrs["bag_colour"])
        strapc = _shade(bagc, 0.8)
        if bag == "backpack":
            centre = np.array([0.0, 0.315, -0.108])
            poly = _box_poly(pr, centre, (0.082 * wf, 0.108, 0.048))
            shapes.append(_Shape(D(centre) + 0.002, "poly", poly, bagc, "bag"))
            flap = _box_poly(pr, centre + np.array([0.0, 0.05, -0.04]), (0.06 * wf, 0.03, 0.02))
            shapes.append(
                _Shape(D(centre) + 0.003, "poly", flap, _shade(bagc, 0.78), "bag", occludes=False)
            )
            for sgn in (1.0, -1.0):
                a = np.array([sgn * 0.06, 0.19, 0.06])
                b = np.array([sgn * 0.07, 0.37, 0.06])
                shapes.append(
                    _Shape(
                        D(a) + 0.003,
                        "poly",
                        _quad(P(a), P(b), 0.011 * scale, 0.011 * scale),
                        strapc,
                        "bag",
                        occludes=False,
                    )
                )
        elif bag == "handbag":
            wr = j["r_wrist"]
            centre = wr + np.array([-0.015, 0.07, 0.0])
            poly = _box_poly(pr, centre, (0.042, 0.046, 0.03))
            shapes.append(_Shape(D(centre) + 0.005, "poly", poly, bagc, "bag"))
            top = poly[0][1]
            wx, wy = P(wr)
            handle = [(wx - 0.018 * scale, top), (wx, wy), (wx + 0.018 * scale, top)]
            shapes.append(_Shape(D(centre) + 0.005, "line", handle, strapc, "bag", occludes=False))
        else:  # cross-body strap bag on the right hip
            for zc in (0.06, -0.06):
                a = np.array([0.09, 0.175, zc])
                b = np.array([-0.085, 0.47, zc])
                shapes.append(
                    _Shape(
                        zc * c + 0.003,
                        "poly",
                        _quad(P(a), P(b), 0.012 * scale, 0.012 * scale),
                        strapc,
                        "bag",
                        occludes=False,
                    )
                )
            centre = np.array([-0.1 * wf, 0.5, 0.045])
            poly = _box_poly(pr, centre, (0.05, 0.045, 0.022))
            shapes.append(_Shape(D(centre) + 0.004, "poly", poly, bagc, "bag"))

    # ---- keypoints (COCO-17) with their own depth and a facing term for the face
    head_pts = [
        (head + np.array([0.0, 0.012, 0.05]), np.array([0.0, 0.0, 1.0])),  # nose
        (head + np.array([0.018, -0.004, 0.042]), np.array([0.45, 0.0, 0.9])),  # left eye
        (head + np.array([-0.018, -0.004, 0.042]), np.array([-0.45, 0.0, 0.9])),  # right eye
        (head + np.array([0.05, 0.004, 0.0]), np.array([1.0, 0.0, 0.15])),  # left ear
        (head + np.array([-0.05, 0.004, 0.0]), np.array([-1.0, 0.0, 0.15])),  # right ear
    ]
    view = np.array([-s, 0.0, c])  # direction to the camera in body coordinates
    pts3 = [p for p, _ in head_pts]
    facing = [float(n @ view) for _, n in head_pts]
    for name in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle"):
        for side in ("l", "r"):
            pts3.append(j[f"{side}_{name}"])
            facing.append(1.0)
    kxy = np.array([P(p) for p in pts3], dtype=np.float64)
    kinfo = np.array([[D(p), f] for p, f in zip(pts3, facing)], dtype=np.float64)
    feet = (P((j["l_ankle"] + j["r_ankle"]) / 2)[0], top + float(j["ground"][1]) * scale)
    return shapes, kxy, kinfo, pr, feet


_KP_OWNERS = ["head"] * 5 + [
    f"{kind}_{side}" for kind in ("arm", "arm", "arm", "leg", "leg", "leg") for side in ("l", "r")
]
_KP_OWNERS_ARR = np.array(_KP_OWNERS)


def _inside(shape: _Shape, pts: np.ndarray) -> np.ndarray:
    """Boolean (N,) whether canvas points (N, 2) fall inside ``shape``."""
    x, y = pts[:, 0], pts[:, 1]
    if shape.kind == "capsule":
        (ax, ay), (bx, by), r0, r1 = shape.geom
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
        dist = np.hypot(x - ax - t * dx, y - ay - t * dy)
        return dist <= r0 + (r1 - r0) * t
    if shape.kind == "ellipse":
        x0, y0, x1, y1 = shape.geom
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 + 1e-9, (y1 - y0) / 2 + 1e-9
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    if shape.kind == "poly":
        poly = np.asarray(shape.geom, dtype=np.float64)
        # convex-polygon test: same sign of all edge cross products
        a = poly
        b = np.roll(poly, -1, axis=0)
        cross = (b[:, 0] - a[:, 0])[None] * (y[:, None] - a[None, :, 1]) - (b[:, 1] - a[:, 1])[
            None
        ] * (x[:, None] - a[None, :, 0])
        return np.all(cross >= -1e-9, axis=1) | np.all(cross <= 1e-9, axis=1)
    return np.zeros(len(pts), dtype=bool)


def _draw(draw: ImageDraw.ImageDraw, shape: _Shape, fill: Any = None) -> None:
    col = shape.colour if fill is None else fill
    g = shape.geom
    if shape.kind == "poly":
        draw.polygon(g, fill=col)
    elif shape.kind == "ellipse":
        draw.ellipse(g, fill=col)
    elif shape.kind == "capsule":
        p0, p1, r0, r1 = g
        draw.polygon(_quad(p0, p1, r0, r1), fill=col)
        draw.ellipse((p0[0] - r0, p0[1] - r0, p0[0] + r0, p0[1] + r0), fill=col)
        draw.ellipse((p1[0] - r1, p1[1] - r1, p1[0] + r1, p1[1] + r1), fill=col)
    elif shape.kind == "chord":
        bbox, a0, a1 = g
        draw.chord(bbox, a0, a1, fill=col)
    elif shape.kind == "line":
        draw.line(g, fill=col, width=2)


def _sorted(shapes: list[_Shape]) -> list[_Shape]:
    return [s for _, s in sorted(enumerate(shapes), key=lambda t: (t[1].depth, t[0]))]


def _self_occluded(
    shapes: list[_Shape], kxy: np.ndarray, kinfo: np.ndarray, eps: float
) -> np.ndarray:
    """(17,) True where a keypoint is hidden by a nearer body part or faces away."""
    hidden = kinfo[:, 1] < 0.1
    for shape in shapes:
        if not shape.occludes:
            continue
        cand = (kinfo[:, 0] + eps < shape.depth) & (_KP_OWNERS_ARR != shape.owner)
        if cand.any():
            hidden |= cand & _inside(shape, kxy)
    return hidden


@dataclass(frozen=True)
class Tracklet:
    """Per (person, camera) walk: shared viewpoint / placement, images vary around it."""

    yaw: float
    phase0: float
    dphase: float
    stride: float
    hfrac: float
    xoff: float
    ytop: float


def render_sample(
    attrs: dict[str, Any],
    camera: Camera,
    tracklet: Tracklet,
    k: int,
    rng: np.random.Generator,
    height: int,
    width: int,
    background: np.ndarray,
    mode: str = "normal",
    supersample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image.

    Args:
        attrs: identity cues (``sample_identity``).
        camera, tracklet, k: camera model, tracklet and image index inside the tracklet.
        rng: the image's own generator (occluder, jitter, noise).
        height, width: stored image size H x W.
        background: camera texture from ``_background`` at the canvas scale.
        mode: ``normal`` or ``junk`` (bad detection: mostly background or a body part).

    Returns:
        image uint8 (H, W, 3) and keypoints float (17, 3) ``[x, y, v]`` in image pixels.
    """
    ss = supersample
    ch, cw = height * ss, width * ss
    bh, bw = background.shape[:2]
    oy = int(rng.integers(0, bh - ch + 1))
    ox = int(rng.integers(0, bw - cw + 1))
    canvas = Image.fromarray(np.ascontiguousarray(background[oy : oy + ch, ox : ox + cw]))
    draw = ImageDraw.Draw(canvas)

    yaw = tracklet.yaw + float(rng.normal(0, 0.12))
    phase = tracklet.phase0 + k * tracklet.dphase + float(rng.normal(0, 0.15))
    hfrac = tracklet.hfrac * (1.0 + 0.6 * (attrs["height"] - 1.0)) + float(rng.normal(0, 0.02))
    xoff = tracklet.xoff + float(rng.normal(0, 0.025))
    ytop = tracklet.ytop + float(rng.normal(0, 0.015))
    draw_person = True
    if mode == "junk":
        r = rng.random()
        if r < 0.2:
            draw_person = False
        elif r < 0.6:  # zoomed-in part of the body
            hfrac = float(rng.uniform(1.4, 2.4))
            ytop = float(rng.uniform(-hfrac + 0.5, 0.0))
            xoff = float(rng.uniform(-0.3, 0.3))
        else:  # badly shifted box
            hfrac = float(rng.uniform(0.45, 0.9))
            xoff = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.35, 0.6))
            ytop = float(rng.uniform(-0.3, 0.5))
    elif rng.random() < 0.08:  # detector misalignment: head or feet cut
        ytop += float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.06, 0.16))

    kps = np.zeros((17, 3), dtype=np.float64)
    if draw_person:
        hpx = hfrac * ch
        cx = cw / 2 + xoff * cw
        shapes, kxy, kinfo, pr, feet = _person_shapes(
            attrs, yaw, phase, tracklet.stride, cx, ytop * ch, hpx
        )
        # soft ground shadow
        fx, fy = feet
        if 0 <= fy < ch:
            col = background[oy + int(fy), ox + int(np.clip(fx, 0, cw - 1))].astype(np.float64)
            sw = 0.11 * hpx
            draw.ellipse(
                (fx - sw, fy - 0.018 * hpx, fx + sw, fy + 0.018 * hpx),
                fill=tuple(int(v * 0.6) for v in col),
            )
        for shape in _sorted(shapes):
            # far parts a little darker, near parts a little brighter (cheap 3D cue)
            _draw(
                draw,
                shape,
                fill=_shade(shape.colour, 1.0 + 1.2 * max(-0.12, min(0.12, shape.depth))),
            )
        hidden = _self_occluded(shapes, kxy, kinfo, eps=0.025)

        # occluder in front of the person
        if mode == "normal" and rng.random() < camera.occlusion_prob:
            mask = Image.new("L", (cw, ch), 0)
            mdraw = ImageDraw.Draw(mask)
            kind = _choice(rng, ("box", "pole", "person"), [0.45, 0.25, 0.3])
            if kind == "box":
                x0 = float(rng.uniform(-0.3, 0.4)) * cw
                x1 = x0 + float(rng.uniform(0.55, 1.1)) * cw
                y0 = float(rng.uniform(0.55, 0.8)) * ch
                colour = tuple(int(v) for v in rng.integers(40, 200, 3))
                for d_, f in ((draw, colour), (mdraw, 255)):
                    d_.rectangle((x0, y0, x1, ch), fill=f)
                draw.rectangle((x0, y0, x1, y0 + 0.025 * ch), fill=_shade(colour, 1.3))
            elif kind == "pole":
                xc = float(rng.uniform(0.2, 0.8)) * cw
                hw = float(rng.uniform(0.05, 0.1)) * cw
                colour = tuple(int(v) for v in rng.integers(50, 150, 3))
                for d_, f in ((draw, colour), (mdraw, 255)):
                    d_.rectangle((xc - hw, 0, xc + hw, ch), fill=f)
                draw.rectangle((xc - hw, 0, xc - hw * 0.5, ch), fill=_shade(colour, 1.25))
            else:
                other = sample_identity(rng)
                side = float(rng.choice([-1.0, 1.0]))
                o_shapes, *_ = _person_shapes(
                    other,
                    float(rng.uniform(-math.pi, math.pi)),
                    float(rng.uniform(0, 2 * math.pi)),
                    float(rng.uniform(0.2, 0.45)),
                    cw / 2 + side * float(rng.uniform(0.45, 0.7)) * cw,
                    float(rng.uniform(-0.05, 0.1)) * ch,
                    float(rng.uniform(0.9, 1.05)) * ch,
                )
                for shape in _sorted(o_shapes):
                    _draw(draw, shape)
                    _draw(mdraw, shape, fill=255)
            m = np.asarray(mask)
            ix = np.clip(kxy[:, 0].astype(int), 0, cw - 1)
            iy = np.clip(kxy[:, 1].astype(int), 0, ch - 1)
            hidden |= m[iy, ix] > 0
        xy = kxy / ss
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        kps[:, :2] = np.where(inside[:, None], xy, 0.0)
        kps[:, 2] = np.where(inside, np.where(hidden, 1.0, 2.0), 0.0)

    img = canvas.reduce(ss)
    if camera.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(camera.blur * float(rng.uniform(0.7, 1.3))))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    gain = camera.gain * float(rng.uniform(0.9, 1.1))
    cast = np.asarray(camera.cast, np.float32) * gain
    ramp = 1.0 + camera.light_gradient * (np.linspace(-0.5, 0.5, height, dtype=np.float32))
    arr = arr * cast[None, None, :] * ramp[:, None, None]
    grey = arr.mean(axis=2, keepdims=True)
    arr = grey + camera.saturation * (arr - grey)
    arr = np.clip(arr, 0.0, 1.0) ** camera.gamma * 255.0
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * camera.noise
    out = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    return out, kps


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

    def make_group(n: int, split: str) -> list[int]:
        """Person indices of ``n`` identities in look-alike families."""
        idx: list[int] = []
        while len(idx) < n:
            size = int(min(n - len(idx), rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2])))
            members, varies = _make_family(rng, size)
            fid = len(families)
            families[str(fid)] = {"split": split, "varies": varies, "members": []}
            for attrs in members:
                attrs = dict(attrs)
                persons.append({"family": fid, "attrs": attrs})
                idx.append(len(persons) - 1)
        return idx

    train_idx = make_group(preset.num_train_ids, "train")
    test_idx = make_group(preset.num_test_ids, "test")
    pids = (rng.permutation(preset.num_train_ids + preset.num_test_ids) + 1).tolist()
    for person, pid in zip(train_idx + test_idx, pids):
        persons[person]["pid"] = int(pid)

    # distractor people: some are extra look-alikes of test families
    n_dis_people = max(1, math.ceil(preset.num_distractors / 3)) if preset.num_distractors else 0
    test_fams = sorted({persons[i]["family"] for i in test_idx})
    dis_idx = []
    for _ in range(n_dis_people):
        fid = int(rng.choice(test_fams))
        fam = families[str(fid)]
        attrs = None
        if fam["varies"] and rng.random() < 0.5:
            kin = [p["attrs"] for p in persons if p["family"] == fid]
            taken = {_cue_signature(a, fam["varies"]) for a in kin}
            for _try in range(20):  # a new member, never a copy of an existing one
                cand = dict(kin[0])
                for cue in fam["varies"]:
                    cand.update(_sample_cue(rng, cue, cand))
                if _cue_signature(cand, fam["varies"]) not in taken:
                    attrs = cand
                    break
        if attrs is not None:
            persons.append({"family": fid, "attrs": attrs, "pid": 0})
        else:
            persons.append({"family": None, "attrs": sample_identity(rng), "pid": 0})
        dis_idx.append(len(persons) - 1)

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


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _preview_cells(images: dict[int, list[Path]], max_cols: int) -> list[tuple[int, Path]]:
    """Round-robin over cameras: first image of every camera, then second ones, ..."""
    cells: list[tuple[int, Path]] = []
    depth = 0
    while len(cells) < max_cols:
        added = False
        for cam in sorted(images):
            if depth < len(images[cam]) and len(cells) < max_cols:
                cells.append((cam, images[cam][depth]))
                added = True
        if not added:
            break
        depth += 1
    return sorted(cells, key=lambda t: t[0])


def write_preview(
    root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    num_families: int = 2,
    max_members: int = 4,
    max_cols: int = 8,
    zoom: int = 2,
) -> Path:
    """Contact sheet of look-alike families: one row per family member, its images across
    cameras in the columns (every camera it appears in first, then more views).

    Reads ``root/meta.json`` and the image folders; picks the largest test families (train
    when there are none). Each cell is labelled ``pid/camera``; each row names the cues that
    vary inside the family. Returns the PNG path (default ``root/preview.png``).
    """
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: is {root} a dataset made by `reidkit synth`?"
        )
    meta = json.loads(meta_path.read_text())
    by_pid: dict[int, dict[int, list[Path]]] = {}
    for folder in ("query", "bounding_box_test", "bounding_box_train"):
        d = root / folder
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.jpg")):
            m = _NAME_RE.match(p.name)
            if m and int(m.group(1)) > 0:
                by_pid.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), []).append(p)
    fams = [
        (fid, f)
        for fid, f in meta["families"].items()
        if len(f["members"]) >= 2 and all(p in by_pid for p in f["members"])
    ]
    fams.sort(key=lambda t: (t[1]["split"] != "test", -len(t[1]["members"]), int(t[0])))
    fams = fams[:num_families]
    if not fams:
        raise ValueError(f"{root}: no look-alike family with images on disk to preview")
    h, w = int(meta["height"]) * zoom, int(meta["width"]) * zoom
    label_h, head_w, pad, title_h = 14, 150, 4, 18
    rows = [(fid, f, pid) for fid, f in fams for pid in f["members"][:max_members]]
    sheet_w = head_w + max_cols * (w + pad) + pad
    sheet_h = len(fams) * title_h + len(rows) * (h + label_h + pad) + pad
    sheet = Image.new("RGB", (sheet_w, sheet_h), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    y = pad
    last_fid = None
    for fid, fam, pid in rows:
        attrs = meta["identities"][f"{pid:04d}"]["attributes"]
        if fid != last_fid:
            draw.text(
                (pad, y + 2),
                f"family {fid} ({fam['split']}): {attrs['upper_colour']} {attrs['upper_pattern']} "
                f"top, {attrs['lower_colour']} {attrs['lower_type']}; members differ in: "
                f"{', '.join(fam['varies'])}",
                fill=(0, 0, 0),
                font=font,
            )
            y += title_h
            last_fid = fid
        cue_lines = [f"pid {pid:04d}"]
        for cue in fam["varies"]:
            cue_lines.append(f"{cue}: " + "/".join(str(attrs[k]) for k in CUE_KEYS[cue]))
        draw.multiline_text(
            (pad, y + 4), "\n".join(cue_lines), fill=(0, 0, 0), font=font, spacing=2
        )
        for col, (cam, p) in enumerate(_preview_cells(by_pid[pid], max_cols)):
            x = head_w + col * (w + pad)
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((w, h), Image.BILINEAR), (x, y))
            draw.text((x + 2, y + h + 1), f"{pid:04d}/c{cam}", fill=(40, 40, 40), font=font)
        y += h + label_h + pad
    out = Path(path) if path is not None else root / "preview.png"
    sheet.save(out)
    return out
