"""Wider distributions for the on-the-fly synthetic set (the variety knobs of
:class:`~reidkit.data.synth.knobs.SynthRenderConfig`).

Every function takes the knob strengths and draws from the generator it is given; at
strength 0 the ranges are the on-disk generator's (:func:`reidkit.data.synth.camera.
_make_cameras`, :func:`reidkit.data.synth.layout._new_tracklet`, ``render_sample``'s
per-image jitter). Nothing here is used by the on-disk presets, which stay byte-identical.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from typing import Any

import numpy as np

from .camera import _CASTS, _YAW_DIRS, _YAW_PROFILES, Camera
from .identity import HAIR_COLOURS, PALETTE, SKIN_TONES
from .knobs import CAST_NAMES, VIEWPOINT_NAMES, SynthRenderConfig
from .rendering import _EXTRA_PATTERNS, ImageJitter, Tracklet

__all__ = [
    "vary_family",
    "varied_camera",
    "background_variant_camera",
    "num_background_variants",
    "varied_tracklet",
    "image_jitter",
]

# attribute -> colour table of its names
_COLOUR_KEYS = {
    "upper_colour": PALETTE,
    "lower_colour": PALETTE,
    "upper_accent": PALETTE,
    "shoes_colour": PALETTE,
    "hat_colour": PALETTE,
    "bag_colour": PALETTE,
    "hair_colour": HAIR_COLOURS,
    "skin": SKIN_TONES,
}
# how far a perturbed colour may move (per-channel std at strength 1)
_COLOUR_STD = {"hair_colour": 14.0, "skin": 10.0}


def _spread(centre: float, half: float, strength: float, rng: np.random.Generator) -> float:
    """Uniform in ``centre +- half * (1 + strength)``."""
    return float(rng.uniform(centre - half * (1 + strength), centre + half * (1 + strength)))


def _random_colour(rng: np.random.Generator) -> list[int]:
    h, s, v = rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.12, 1.0)
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)]


def vary_family(
    rng: np.random.Generator, members: list[dict[str, Any]], knobs: SynthRenderConfig
) -> list[dict[str, Any]]:
    """Apply body shape, colour and texture variety to the members of one look-alike
    family. One set of changes is drawn per family and applied to every member, so
    members still differ only in their family's varying cues (a shifted colour keeps two
    different cue colours different)."""
    out = [dict(m) for m in members]
    if knobs.body_shape > 0:
        height = round(_spread(0.99, 0.09, knobs.body_shape, rng), 3)
        width = round(_spread(1.03, 0.17, 1.5 * knobs.body_shape, rng), 3)
        for m in out:
            m["height"], m["width"] = height, max(0.5, width)
    if knobs.clothing_colours > 0:
        s = knobs.clothing_colours
        for key, table in _COLOUR_KEYS.items():
            std = _COLOUR_STD.get(key, 28.0) * s
            replace = key not in _COLOUR_STD and rng.random() < 0.4 * s
            new_colour = _random_colour(rng)
            shift = rng.normal(0.0, std, 3)
            gain = math.exp(float(rng.normal(0.0, 0.15 * s)))
            for m in out:
                name = m.get(key)
                if name is None or name == "none":
                    continue
                if replace and key != "upper_accent":
                    m[key] = list(new_colour)
                    continue
                base = np.asarray(table[name] if isinstance(name, str) else name, np.float64)
                m[key] = [int(v) for v in np.clip(base * gain + shift, 0, 255).round()]
    if knobs.textures > 0:
        p = min(1.0, 0.5 * knobs.textures)
        if rng.random() < p:
            pattern = str(_EXTRA_PATTERNS[int(rng.integers(len(_EXTRA_PATTERNS)))])
            for m in out:
                m["upper_pattern"] = pattern
        if rng.random() < p:
            for m in out:
                m["lower_pattern"] = "side_stripe"
    return out


def varied_camera(rng: np.random.Generator, index: int, knobs: SynthRenderConfig) -> Camera:
    """Camera ``index`` of the on-the-fly set: the kinds of background, cast and walking
    directions come from the knobs' lists; the variety knobs widen the ranges."""
    L, C, B, S = knobs.lighting, knobs.colour_response, knobs.blur, knobs.scale_jitter
    base = np.array(
        [rng.uniform(90, 200), rng.uniform(90, 190), rng.uniform(80, 190)], dtype=np.float64
    )
    grey_mix = 0.6 * max(0.0, 1.0 - 0.5 * knobs.background_variety)
    colours = tuple(
        tuple(
            int(v)
            for v in np.clip(
                (1 - grey_mix) * base * rng.uniform(0.6, 1.25, 3) + grey_mix * base.mean(),
                20,
                235,
            )
        )
        for _ in range(4)
    )
    background = knobs.backgrounds[int(rng.integers(len(knobs.backgrounds)))]
    cast_name = knobs.casts[int(rng.integers(len(knobs.casts)))]
    cast = np.asarray(_CASTS[CAST_NAMES.index(cast_name)], np.float64)
    if C > 0:
        cast = cast * np.exp(rng.normal(0.0, 0.08 * C, 3))
    viewpoint = knobs.viewpoints[int(rng.integers(len(knobs.viewpoints)))]
    blur_max = 0.7 * (1 + 0.6 * B)
    blur = float(rng.choice([0.0, 0.3, 0.5, 0.7])) if B == 0 else float(rng.uniform(0, blur_max))
    return Camera(
        index=index,
        background=background,
        bg_colours=colours,
        gain=round(_spread(0.97, 0.25, 0.6 * L, rng), 3),
        cast=tuple(round(float(c), 3) for c in cast),  # type: ignore[arg-type]
        saturation=round(max(0.0, _spread(0.875, 0.225, C, rng)), 3),
        gamma=round(_spread(1.015, 0.165, C, rng), 3),
        light_gradient=round(_spread(0.0, 0.25, L, rng), 3),
        blur=round(blur, 3),
        noise=round(float(rng.uniform(2.0, 8.0 * (1 + 0.5 * B))), 3),
        jpeg_quality=int(rng.integers(max(40, int(72 - 25 * B)), 96)),
        yaw_profile=_YAW_PROFILES[VIEWPOINT_NAMES.index(viewpoint)],
        occlusion_prob=round(float(rng.uniform(0.06, 0.22)), 3),
        scale=round(min(1.05, _spread(0.885, 0.045, 2 * S, rng)), 3),
    )


def num_background_variants(knobs: SynthRenderConfig) -> int:
    """Background textures per camera: ``1 + round(4 x background_variety)``."""
    return 1 + int(round(4 * knobs.background_variety))


def background_variant_camera(
    rng: np.random.Generator, cam: Camera, knobs: SynthRenderConfig
) -> Camera:
    """The camera as it draws background variant ``v > 0``: other scene colours and, with
    probability ``background_variety / 2``, another kind from ``knobs.backgrounds``."""
    kind = cam.background
    if rng.random() < 0.5 * knobs.background_variety:
        kind = knobs.backgrounds[int(rng.integers(len(knobs.backgrounds)))]
    colours = tuple(
        tuple(int(v) for v in np.clip(np.asarray(c) * rng.uniform(0.6, 1.4, 3), 15, 240))
        for c in cam.bg_colours
    )
    return dataclasses.replace(cam, background=kind, bg_colours=colours)


def varied_tracklet(rng: np.random.Generator, cam: Camera, knobs: SynthRenderConfig) -> Tracklet:
    """A (person, camera) walk, like the on-disk ``_new_tracklet`` with wider ranges."""
    P, S, X = knobs.pose_variety, knobs.scale_jitter, knobs.crop_jitter
    yaw = float(_YAW_DIRS[rng.choice(8, p=np.asarray(cam.yaw_profile) / sum(cam.yaw_profile))])
    if rng.random() < 0.08:
        stride = 0.06
    else:
        stride = float(rng.uniform(0.24 - 0.12 * P, 0.46 + 0.14 * P))
    hfrac = cam.scale * float(rng.uniform(1 - 0.06 * (1 + S), 1 + 0.05 * (1 + S)))
    return Tracklet(
        yaw=yaw + float(rng.normal(0, 0.15 * (1 + 2 * P))),
        phase0=float(rng.uniform(0, 2 * math.pi)),
        dphase=float(rng.uniform(0.7, 1.6)),
        stride=stride,
        hfrac=hfrac,
        xoff=float(rng.normal(0, 0.05 * (1 + 1.5 * X))),
        ytop=float(np.clip((1.0 - hfrac) * rng.uniform(0.2, 0.8), -0.05 * X, 0.2 + 0.1 * X)),
    )


def image_jitter(knobs: SynthRenderConfig) -> ImageJitter:
    """Per-image variation of the on-the-fly set (``ImageJitter()`` at strength 0)."""
    P, S, X, L, B = (
        knobs.pose_variety,
        knobs.scale_jitter,
        knobs.crop_jitter,
        knobs.lighting,
        knobs.blur,
    )
    return ImageJitter(
        yaw=0.12 * (1 + 2 * P),
        phase=0.15 * (1 + P),
        height=0.02 * (1 + 2 * S),
        xoff=0.025 * (1 + 2 * X),
        ytop=0.015 * (1 + 2 * X),
        misalign_p=min(0.5, 0.08 * (1 + X)),
        misalign=(0.06, 0.16 + 0.1 * X),
        gain=(max(0.2, 0.9 - 0.1 * L), 1.1 + 0.1 * L),
        blur=(max(0.0, 0.7 - 0.3 * B), 1.3 + 0.4 * B),
    )
