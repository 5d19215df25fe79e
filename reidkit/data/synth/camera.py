"""Cameras of the synthetic set: appearance models, background textures and the camera
effects applied to every rendered image.

Cameras differ in illumination, colour cast, saturation, background, blur, noise, JPEG
quality and viewpoint distribution (front/back/side decides which cues are visible: a
backpack is seen from the back, a logo only from the front).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .identity import PALETTE, UPPER_COLOURS, _choice

__all__ = ["Camera", "apply_camera"]

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


def _background(cam: Camera, seed: int, h: int, w: int, variant: int | None = None) -> np.ndarray:
    """Camera background texture, uint8 (h, w, 3); crops of it are used per image.

    ``variant`` (the on-the-fly set's ``background_variety``) selects one of several
    textures of the camera; ``None`` is the on-disk generator's single texture.
    """
    key = [seed, 0xBAC6, cam.index] + ([] if variant is None else [0x7A2, variant])
    rng = np.random.default_rng(key)
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
    elif kind == "clutter":  # blocks of colour: shop windows, doors, parked cars, signs
        out[:] = cols[0]
        for _ in range(int(rng.integers(6, 14))):
            x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.9) * h
            bw_, bh_ = rng.uniform(0.1, 0.5) * w, rng.uniform(0.05, 0.35) * h
            colour = rng.uniform(25, 235, 3).astype(np.float32)
            block = (xx >= x0) & (xx < x0 + bw_) & (yy >= y0) & (yy < y0 + bh_)
            out[block] = 0.5 * colour + 0.5 * cols[int(rng.integers(0, 4))]
    elif kind == "smooth":  # a smooth field: shared shading, mild colour variation
        shade = 0.6 + 0.8 * _lowfreq(rng, h, w, 16)
        for ch_ in range(3):
            tint = 0.85 + 0.3 * _lowfreq(rng, h, w, 24)
            out[..., ch_] = cols[1][ch_] * shade * tint
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


def apply_camera(
    img: Image.Image,
    camera: Camera,
    rng: np.random.Generator,
    gain_range: tuple[float, float] = (0.9, 1.1),
    blur_range: tuple[float, float] = (0.7, 1.3),
    gain_scale: float = 1.0,
) -> np.ndarray:
    """Camera effects on a rendered RGB image at the stored size: blur, gain and colour
    cast, vertical light gradient, saturation, gamma and sensor noise.

    The draws (in this order: blur factor when the camera blurs, gain factor, noise) come
    from ``rng``; two calls with generators in the same state give identical noise, which
    the video generator uses to render a frame with and without its occluder.

    Returns:
        uint8 array (H, W, 3).
    """
    height = img.height
    if camera.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(camera.blur * float(rng.uniform(*blur_range))))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    gain = camera.gain * gain_scale * float(rng.uniform(*gain_range))
    cast = np.asarray(camera.cast, np.float32) * gain
    ramp = 1.0 + camera.light_gradient * (np.linspace(-0.5, 0.5, height, dtype=np.float32))
    arr = arr * cast[None, None, :] * ramp[:, None, None]
    grey = arr.mean(axis=2, keepdims=True)
    arr = grey + camera.saturation * (arr - grey)
    arr = np.clip(arr, 0.0, 1.0) ** camera.gamma * 255.0
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * camera.noise
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)
