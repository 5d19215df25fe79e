"""Rendering of the synthetic pedestrians: a 3D stick skeleton with a walking gait, body
parts drawn back to front, keypoints with visibility, occluders and camera effects.

Body parts are projected from a simple 3D skeleton (orthographic, yaw about the vertical
axis) and drawn back to front (painter's algorithm) as polygons and ellipses on a 2x
supersampled canvas, then reduced; camera effects are vectorised numpy
(:func:`reidkit.data.synth.camera.apply_camera`). Keypoints come from the same skeleton:
``v=2`` visible, ``v=1`` inside the image but hidden (self-occluded, facing away, or
behind an occluder), ``v=0`` outside the image (written as ``[0, 0, 0]`` like COCO).

:func:`render_sample` renders one still image of the image set; the video generator
(:mod:`reidkit.data.synth.video`) composes the same primitives (:func:`draw_person`,
:func:`keypoint_rows`, :func:`apply_camera`) frame by frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from reidkit.data.keypoints import COCO_KEYPOINT_NAMES

from .camera import Camera, apply_camera
from .identity import HAIR_COLOURS, PALETTE, SKIN_TONES, _choice, sample_identity

__all__ = [
    "COCO_KEYPOINT_NAMES",
    "ImageJitter",
    "Tracklet",
    "render_sample",
    "draw_person",
    "keypoint_rows",
]


@dataclass
class _Shape:
    depth: float
    kind: str  # poly | ellipse | capsule | chord | line
    geom: Any
    colour: tuple[int, int, int]
    owner: str = ""  # limb the shape belongs to ("" = none); used for keypoint occlusion
    occludes: bool = True


def _rgb(name: Any, table: dict[str, tuple[int, int, int]] = PALETTE) -> tuple[int, int, int]:
    """A palette colour by name, or an explicit ``[r, g, b]`` (the wide-colour knob)."""
    if isinstance(name, str):
        return table[name]
    r, g, b = name
    return (int(r), int(g), int(b))


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
        if attrs.get("lower_pattern") == "side_stripe" and attrs["lower_type"] == "trousers":
            # a stripe down the outer seam (tracksuit), in the top's accent colour
            sgn = 1.0 if side == "l" else -1.0
            out_ = np.array([sgn * 0.04 * wf, 0.0, 0.0])
            stripe = _rgb(attrs["upper_accent"])
            capsule(hip + out_, knee + out_, 0.009, 0.008, stripe, dl + 3e-4, owner)
            capsule(knee + out_, ankle + out_, 0.008, 0.007, stripe, dl + 3e-4, owner)
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
    if attrs["upper_pattern"] in _EXTRA_PATTERNS:
        shapes.extend(
            _texture_shapes(
                attrs["upper_pattern"],
                accent,
                (scx - swp * 0.98, sy + 0.02 * scale),
                (scx + swp * 0.98, sy + 0.02 * scale),
                (hcx + hwp * 0.98, bottom_y),
                (hcx - hwp * 0.98, bottom_y),
            )
        )
    elif attrs["upper_pattern"] == "stripes":
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


#: Top textures only the ``textures`` knob of the on-the-fly set draws (the on-disk presets
#: use plain, stripes and logo).
_EXTRA_PATTERNS = ("vstripes", "checks", "two_tone")


def _texture_shapes(
    pattern: str,
    accent: tuple[int, int, int],
    top_left: tuple[float, float],
    top_right: tuple[float, float],
    bottom_right: tuple[float, float],
    bottom_left: tuple[float, float],
) -> list[_Shape]:
    """Accent shapes of an extra top texture on the torso quad (canvas corners)."""

    def at(u: float, v: float) -> tuple[float, float]:
        # bilinear point of the quad: u across (left -> right), v down (top -> bottom)
        lx = top_left[0] + (bottom_left[0] - top_left[0]) * v
        ly = top_left[1] + (bottom_left[1] - top_left[1]) * v
        rx = top_right[0] + (bottom_right[0] - top_right[0]) * v
        ry = top_right[1] + (bottom_right[1] - top_right[1]) * v
        return (lx + (rx - lx) * u, ly + (ry - ly) * u)

    def cell(u0: float, u1: float, v0: float, v1: float) -> _Shape:
        poly = [at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)]
        return _Shape(1e-4, "poly", poly, accent, "torso", occludes=False)

    if pattern == "vstripes":
        return [cell(u, u + 0.12, 0.0, 1.0) for u in (0.1, 0.44, 0.78)]
    if pattern == "checks":
        return [
            cell(u, u + 0.2, v, v + 0.2)
            for i, u in enumerate((0.0, 0.2, 0.4, 0.6, 0.8))
            for j, v in enumerate((0.0, 0.2, 0.4, 0.6, 0.8))
            if (i + j) % 2 == 0
        ]
    if pattern == "two_tone":  # a yoke: the top third in the accent colour
        return [cell(0.0, 1.0, -0.08, 0.34)]
    raise ValueError(f"unknown top texture {pattern!r}; expected one of {_EXTRA_PATTERNS}")


@dataclass(frozen=True)
class ImageJitter:
    """Per-image variation around a tracklet (standard deviations in fractions of the
    box, radians and cycles): the defaults are the on-disk generator's; the variety knobs
    of the on-the-fly set widen them."""

    yaw: float = 0.12
    phase: float = 0.15
    height: float = 0.02
    xoff: float = 0.025
    ytop: float = 0.015
    misalign_p: float = 0.08  # rate of boxes that cut the head or feet
    misalign: tuple[float, float] = (0.06, 0.16)
    gain: tuple[float, float] = (0.9, 1.1)  # per-image brightness factor
    blur: tuple[float, float] = (0.7, 1.3)  # factor of the camera's blur


_DEFAULT_JITTER = ImageJitter()


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


def draw_person(
    draw: ImageDraw.ImageDraw,
    attrs: dict[str, Any],
    yaw: float,
    phase: float,
    stride: float,
    cx: float,
    top: float,
    height_px: float,
    ground: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one person (ground shadow, then body parts back to front) on a canvas.

    Args:
        draw: drawing context of the supersampled canvas (``ch x cw``).
        attrs: identity cues (:func:`sample_identity`).
        yaw, phase, stride: viewpoint (0 = facing the camera), walking phase and stride.
        cx, top, height_px: horizontal centre, head-top row and standing height in canvas
            pixels.
        ground: the canvas background (ch, cw, 3) uint8; the shadow darkens its colour
            under the feet.

    Returns:
        keypoints (17, 2) canvas xy and ``hidden`` (17,) bool (self-occluded or facing away).
    """
    ch, cw = ground.shape[:2]
    shapes, kxy, kinfo, _, feet = _person_shapes(attrs, yaw, phase, stride, cx, top, height_px)
    # soft ground shadow
    fx, fy = feet
    if 0 <= fy < ch:
        col = ground[int(fy), int(np.clip(fx, 0, cw - 1))].astype(np.float64)
        sw = 0.11 * height_px
        draw.ellipse(
            (fx - sw, fy - 0.018 * height_px, fx + sw, fy + 0.018 * height_px),
            fill=tuple(int(v * 0.6) for v in col),
        )
    for shape in _sorted(shapes):
        # far parts a little darker, near parts a little brighter (cheap 3D cue)
        _draw(
            draw, shape, fill=_shade(shape.colour, 1.0 + 1.2 * max(-0.12, min(0.12, shape.depth)))
        )
    return kxy, _self_occluded(shapes, kxy, kinfo, eps=0.025)


def hidden_by_mask(kxy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(17,) True where canvas keypoints ``kxy`` (17, 2) fall on a non-zero ``mask`` pixel
    (an occluder mask at canvas resolution, (ch, cw))."""
    ch, cw = mask.shape
    ix = np.clip(kxy[:, 0].astype(int), 0, cw - 1)
    iy = np.clip(kxy[:, 1].astype(int), 0, ch - 1)
    return mask[iy, ix] > 0


def keypoint_rows(
    kxy: np.ndarray, hidden: np.ndarray, supersample: int, height: int, width: int
) -> np.ndarray:
    """COCO ``[x, y, v]`` rows (17, 3) in stored-image pixels from canvas keypoints:
    ``v=2`` visible, ``v=1`` hidden, ``v=0`` (and xy 0) outside the image."""
    kps = np.zeros((17, 3), dtype=np.float64)
    xy = kxy / supersample
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    kps[:, :2] = np.where(inside[:, None], xy, 0.0)
    kps[:, 2] = np.where(inside, np.where(hidden, 1.0, 2.0), 0.0)
    return kps


def _draw_still_occluder(
    rng: np.random.Generator,
    draw: ImageDraw.ImageDraw,
    mdraw: ImageDraw.ImageDraw,
    cw: int,
    ch: int,
) -> None:
    """A partial occluder of a still image (box/bench, pole or another person), drawn on
    the canvas and (255) on its mask."""
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
    jitter: ImageJitter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image.

    Args:
        attrs: identity cues (``sample_identity``).
        camera, tracklet, k: camera model, tracklet and image index inside the tracklet.
        rng: the image's own generator (occluder, jitter, noise).
        height, width: stored image size H x W.
        background: camera texture from ``_background`` at the canvas scale.
        mode: ``normal`` or ``junk`` (bad detection: mostly background or a body part).
        jitter: per-image variation (default: the on-disk generator's :class:`ImageJitter`;
            the same random draws in the same order whatever the values).

    Returns:
        image uint8 (H, W, 3) and keypoints float (17, 3) ``[x, y, v]`` in image pixels.
    """
    ss = supersample
    ch, cw = height * ss, width * ss
    bh, bw = background.shape[:2]
    oy = int(rng.integers(0, bh - ch + 1))
    ox = int(rng.integers(0, bw - cw + 1))
    ground = np.ascontiguousarray(background[oy : oy + ch, ox : ox + cw])
    canvas = Image.fromarray(ground)
    draw = ImageDraw.Draw(canvas)

    jit = jitter or _DEFAULT_JITTER
    yaw = tracklet.yaw + float(rng.normal(0, jit.yaw))
    phase = tracklet.phase0 + k * tracklet.dphase + float(rng.normal(0, jit.phase))
    hfrac = tracklet.hfrac * (1.0 + 0.6 * (attrs["height"] - 1.0)) + float(
        rng.normal(0, jit.height)
    )
    xoff = tracklet.xoff + float(rng.normal(0, jit.xoff))
    ytop = tracklet.ytop + float(rng.normal(0, jit.ytop))
    draw_it = True
    if mode == "junk":
        r = rng.random()
        if r < 0.2:
            draw_it = False
        elif r < 0.6:  # zoomed-in part of the body
            hfrac = float(rng.uniform(1.4, 2.4))
            ytop = float(rng.uniform(-hfrac + 0.5, 0.0))
            xoff = float(rng.uniform(-0.3, 0.3))
        else:  # badly shifted box
            hfrac = float(rng.uniform(0.45, 0.9))
            xoff = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.35, 0.6))
            ytop = float(rng.uniform(-0.3, 0.5))
    elif rng.random() < jit.misalign_p:  # detector misalignment: head or feet cut
        ytop += float(rng.choice([-1.0, 1.0])) * float(rng.uniform(*jit.misalign))

    kps = np.zeros((17, 3), dtype=np.float64)
    if draw_it:
        kxy, hidden = draw_person(
            draw,
            attrs,
            yaw,
            phase,
            tracklet.stride,
            cw / 2 + xoff * cw,
            ytop * ch,
            hfrac * ch,
            ground,
        )
        # occluder in front of the person
        if mode == "normal" and rng.random() < camera.occlusion_prob:
            mask = Image.new("L", (cw, ch), 0)
            _draw_still_occluder(rng, draw, ImageDraw.Draw(mask), cw, ch)
            hidden |= hidden_by_mask(kxy, np.asarray(mask))
        kps = keypoint_rows(kxy, hidden, ss, height, width)
    return apply_camera(canvas.reduce(ss), camera, rng, jit.gain, jit.blur), kps


# ------------------------------------------------------------------ passing occluders
#: Kinds of occluder that pass in front of a walking person in the video set.
OCCLUDER_KINDS = ("pole", "pedestrian", "car", "bag")


def draw_occluder(
    draw: ImageDraw.ImageDraw,
    mdraw: ImageDraw.ImageDraw,
    kind: str,
    params: dict[str, Any],
    cx: float,
    t: float,
    cw: int,
    ch: int,
) -> None:
    """Draw one occluder of the video set at horizontal centre ``cx`` (canvas pixels) on
    the canvas (``draw``) and, in 255, on its mask (``mdraw``).

    Args:
        kind: one of :data:`OCCLUDER_KINDS`.
        params: its appearance, drawn once per event (fractions of ``cw`` / ``ch``):
            pole ``width, colour``; pedestrian ``attrs, height, top, yaw, phase0, dphase,
            stride``; car ``length, height, colour``; bag ``width, height, yc, colour``.
        t: frames since the event started (animates a pedestrian's gait).
        cw, ch: canvas size.
    """
    both = ((draw, None), (mdraw, 255))
    if kind == "pole":
        hw = params["width"] * cw / 2
        colour = tuple(params["colour"])
        for d_, f in both:
            d_.rectangle((cx - hw, 0, cx + hw, ch), fill=f or colour)
        draw.rectangle((cx - hw, 0, cx - hw * 0.45, ch), fill=_shade(colour, 1.3))
        draw.rectangle((cx + hw * 0.6, 0, cx + hw, ch), fill=_shade(colour, 0.75))
    elif kind == "pedestrian":
        shapes, *_ = _person_shapes(
            params["attrs"],
            params["yaw"],
            params["phase0"] + params["dphase"] * t,
            params["stride"],
            cx,
            params["top"] * ch,
            params["height"] * ch,
        )
        for shape in _sorted(shapes):
            _draw(draw, shape)
            _draw(mdraw, shape, fill=255)
    elif kind == "car":
        length, height = params["length"] * cw, params["height"] * ch
        x0, x1 = cx - length / 2, cx + length / 2
        y0 = ch - height
        colour = tuple(params["colour"])
        body = (x0, y0 + 0.35 * height, x1, ch + 0.1 * height)
        cabin = [
            (x0 + 0.22 * length, y0 + 0.36 * height),
            (x0 + 0.32 * length, y0),
            (x1 - 0.3 * length, y0),
            (x1 - 0.18 * length, y0 + 0.36 * height),
        ]
        for d_, f in both:
            d_.rounded_rectangle(body, radius=0.12 * height, fill=f or colour)
            d_.polygon(cabin, fill=f or colour)
        glass = (52, 64, 78)
        inset = 0.06 * height
        draw.polygon(
            [
                (cabin[0][0] + 2 * inset, cabin[0][1]),
                (cabin[1][0] + inset, cabin[1][1] + inset),
                (cabin[2][0] - inset, cabin[2][1] + inset),
                (cabin[3][0] - 2 * inset, cabin[3][1]),
            ],
            fill=glass,
        )
        draw.line(
            [(x0, y0 + 0.55 * height), (x1, y0 + 0.55 * height)],
            fill=_shade(colour, 0.7),
            width=max(1, int(0.02 * height)),
        )
        r = 0.17 * height
        for wx in (x0 + 0.2 * length, x1 - 0.2 * length):
            for d_, f in both:
                d_.ellipse((wx - r, ch - 1.2 * r, wx + r, ch + 0.8 * r), fill=f or (24, 24, 26))
    elif kind == "bag":
        w, h = params["width"] * cw, params["height"] * ch
        yc = params["yc"] * ch
        colour = tuple(params["colour"])
        box = (cx - w / 2, yc - h / 2, cx + w / 2, yc + h / 2)
        # a handle arch (two posts and a bar) on top: the background shows through it
        top, post = yc - h / 2, 0.06 * w
        handle = [
            (cx - 0.2 * w, top - 0.2 * h, cx - 0.2 * w + post, top),
            (cx + 0.2 * w - post, top - 0.2 * h, cx + 0.2 * w, top),
            (cx - 0.2 * w, top - 0.2 * h, cx + 0.2 * w, top - 0.2 * h + post),
        ]
        for d_, f in both:
            d_.rounded_rectangle(box, radius=0.12 * min(w, h), fill=f or colour)
            for rect in handle:
                d_.rectangle(rect, fill=f or _shade(colour, 0.6))
        draw.line(
            [(box[0], yc), (box[2], yc)], fill=_shade(colour, 0.8), width=max(1, int(0.04 * h))
        )
    else:
        raise ValueError(f"unknown occluder kind {kind!r}; expected one of {OCCLUDER_KINDS}")
