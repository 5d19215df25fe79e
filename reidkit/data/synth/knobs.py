"""The knobs of the on-the-fly synthetic set (``data.dataset: synth_render``,
``data.render.*``): named presets and their typed, documented settings.

A config names a preset (``data.render.preset``) and may override any knob
(``data.render.num_ids=2000``, ``data.render.lighting=0.5``); the preset fills the knobs
the config leaves unset, so the resolved ``config.yaml`` of a run holds every knob and a
resume can compare them.

Two kinds of plan:

* ``plan: disk`` renders exactly the images the on-disk generator writes for
  ``disk_preset`` (``tiny`` / ``small`` / ``market``), same plan, same per-image seeds,
  same in-memory JPEG round trip, without writing them (``market`` pretrains on the
  Market-sized set of ``reidkit synth --preset market``);
* ``plan: index`` draws everything from ``(seed, index)`` (random access: a ``large`` set
  of hundreds of thousands of images costs no planning and no disk) and honours the
  variety knobs below.

Variety knobs are strengths: ``0`` is the on-disk generator's distribution (as narrow as
``tiny``/``small``/``market``), ``1`` the wide distribution of the ``large`` preset, up to
``2`` for wider still. docs/pretrain.md measures which of them matter.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "BACKGROUND_KINDS",
    "CAST_NAMES",
    "VIEWPOINT_NAMES",
    "VARIETY_KNOBS",
    "RENDER_PRESETS",
    "SynthRenderConfig",
]

#: Background textures a camera can show: the on-disk six, plus two procedural ones
#: (``clutter``: random blocks of colour, like shop windows and parked cars; ``smooth``: a
#: smooth random colour field) that only the variety knobs use.
BACKGROUND_KINDS = (
    "pavement",
    "wall",
    "park",
    "shopfront",
    "road",
    "brick",
    "clutter",
    "smooth",
)
#: Named camera colour casts (the six of the on-disk generator, in its order).
CAST_NAMES = ("neutral", "sodium", "overcast", "fluorescent", "magenta", "cool")
#: Walking-direction profiles of a camera (the six of the on-disk generator, in its order).
VIEWPOINT_NAMES = ("corridor", "crossing", "diagonal", "front", "back", "mixed")
#: The variety strengths (0 = the on-disk distributions).
VARIETY_KNOBS = (
    "body_shape",
    "clothing_colours",
    "textures",
    "background_variety",
    "lighting",
    "colour_response",
    "blur",
    "scale_jitter",
    "crop_jitter",
    "pose_variety",
)

BackgroundKind = Literal[
    "pavement", "wall", "park", "shopfront", "road", "brick", "clutter", "smooth"
]
CastName = Literal["neutral", "sodium", "overcast", "fluorescent", "magenta", "cool"]
ViewpointName = Literal["corridor", "crossing", "diagonal", "front", "back", "mixed"]

_WIDE = dict.fromkeys(VARIETY_KNOBS, 1.0)
_ALL_SETTINGS = {
    "backgrounds": list(BACKGROUND_KINDS),
    "casts": list(CAST_NAMES),
    "viewpoints": list(VIEWPOINT_NAMES),
}
# The domain gap of docs/pretrain.md: the source shows one group of backgrounds, colour
# casts and walking directions, the target the other group (and other identities).
_SOURCE_GROUP = {
    "backgrounds": ["pavement", "wall", "park"],
    "casts": ["neutral", "overcast", "magenta"],
    "viewpoints": ["corridor", "front", "back"],
}
_TARGET_GROUP = {
    "backgrounds": ["shopfront", "road", "brick"],
    "casts": ["sodium", "fluorescent", "cool"],
    "viewpoints": ["crossing", "diagonal", "mixed"],
}

#: Named presets: the knobs each one sets (unset knobs keep the field defaults).
RENDER_PRESETS: dict[str, dict[str, Any]] = {
    # exact on-the-fly copies of the on-disk presets
    "tiny": {"plan": "disk", "disk_preset": "tiny", "num_test_ids": 0},
    "small": {"plan": "disk", "disk_preset": "small", "num_test_ids": 0},
    # Market-sized training set (751 ids, 12,936 images); validated on 150 of its test ids
    "market": {"plan": "disk", "disk_preset": "market", "num_test_ids": 150},
    # thousands of identities, hundreds of thousands of images, every variety knob wide
    "large": {
        "num_ids": 4000,
        "images_per_id": (32, 96),
        "num_cams": 32,
        "num_test_ids": 200,
        **_ALL_SETTINGS,
        **_WIDE,
    },
    # unit tests: a few dozen images, wide
    "tiny-wide": {
        "num_ids": 12,
        "images_per_id": (4, 6),
        "num_cams": 4,
        "num_test_ids": 6,
        **_ALL_SETTINGS,
        **_WIDE,
    },
    # the domain gap of docs/pretrain.md (64x32, CPU-sized)
    "gap-source": {
        "num_ids": 100,
        "images_per_id": (8, 12),
        "num_cams": 8,
        "num_test_ids": 50,
        **_SOURCE_GROUP,
        **_WIDE,
    },
    "gap-source-narrow": {
        "num_ids": 100,
        "images_per_id": (8, 12),
        "num_cams": 8,
        "num_test_ids": 50,
        **_SOURCE_GROUP,
    },
    "gap-target": {
        "seed": 1,
        "num_ids": 100,
        "images_per_id": (5, 7),
        "num_cams": 6,
        "num_test_ids": 100,
        **_TARGET_GROUP,
    },
}


class SynthRenderConfig(BaseModel):
    """``data.render``: what the on-the-fly synthetic set renders.

    ``preset`` fills every knob the config does not set (see :data:`RENDER_PRESETS`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str = Field("market", description="named preset that fills the unset knobs")
    seed: int = Field(
        0,
        description="identities, cameras and images (the run's `seed` drives sampling and "
        "augmentation); a different seed is a different set of people",
    )
    plan: Literal["disk", "index"] = Field(
        "index",
        description="disk: exactly the images of the on-disk preset `disk_preset`; index: "
        "drawn from (seed, index), honouring the variety knobs",
    )
    disk_preset: str | None = Field(
        None, description="plan=disk: the on-disk preset (tiny, small, market)"
    )
    # ----------------------------------------------------------------- sizes
    num_ids: int = Field(751, ge=1, description="training identities (plan=index)")
    images_per_id: tuple[int, int] = Field(
        (8, 24), description="(min, max) training images per identity (plan=index)"
    )
    num_cams: int = Field(6, ge=2, le=256, description="cameras (plan=index)")
    num_test_ids: int = Field(
        100,
        ge=0,
        description="validation identities, disjoint from training: one query per camera "
        "they appear in and 1-3 gallery images per camera (plan=disk: the first N test ids "
        "of the on-disk plan, 0 = all of its query/gallery minus junk)",
    )
    height: int | None = Field(
        None, ge=32, description="rendered height (None: data.height, no resize)"
    )
    width: int | None = Field(None, ge=16, description="rendered width (None: data.width)")
    # ----------------------------------------------------------------- which settings
    backgrounds: list[BackgroundKind] = Field(
        default_factory=lambda: list(BACKGROUND_KINDS[:6]),
        min_length=1,
        description="background kinds the cameras draw from",
    )
    casts: list[CastName] = Field(
        default_factory=lambda: list(CAST_NAMES),
        min_length=1,
        description="colour casts the cameras draw from (colour_response perturbs them)",
    )
    viewpoints: list[ViewpointName] = Field(
        default_factory=lambda: list(VIEWPOINT_NAMES),
        min_length=1,
        description="walking-direction profiles the cameras draw from",
    )
    # ----------------------------------------------------------------- variety strengths
    body_shape: float = Field(
        0.0, ge=0, le=2, description="spread of body height / width (0: 0.9-1.08 / 0.86-1.2)"
    )
    clothing_colours: float = Field(
        0.0,
        ge=0,
        le=2,
        description="garment, bag, hat and shoe colours: perturbed palette colours and, "
        "with probability 0.4 x strength, any colour (0: the 18-colour palette)",
    )
    textures: float = Field(
        0.0,
        ge=0,
        le=2,
        description="probability 0.5 x strength that a family's top gets an extra texture "
        "(vertical stripes, checks, two-tone yoke), and the same for a stripe down the "
        "trousers' seam",
    )
    background_variety: float = Field(
        0.0,
        ge=0,
        le=2,
        description="1 + 4 x strength background textures per camera, more colourful, and "
        "the procedural kinds when listed in backgrounds (0: one muted texture per camera)",
    )
    lighting: float = Field(
        0.0,
        ge=0,
        le=2,
        description="camera gain, vertical light gradient and per-image brightness range",
    )
    colour_response: float = Field(
        0.0,
        ge=0,
        le=2,
        description="camera colour response: random perturbation of the cast, saturation "
        "and gamma ranges",
    )
    blur: float = Field(0.0, ge=0, le=2, description="camera defocus and per-image blur range")
    scale_jitter: float = Field(
        0.0, ge=0, le=2, description="person height in the box (camera and image)"
    )
    crop_jitter: float = Field(
        0.0,
        ge=0,
        le=2,
        description="horizontal / vertical offset in the box and rate of boxes that cut "
        "the head or feet",
    )
    pose_variety: float = Field(
        0.0, ge=0, le=2, description="viewpoint jitter around the camera's profile and stride"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", cls.model_fields["preset"].default)
        if name not in RENDER_PRESETS:
            import difflib

            close = difflib.get_close_matches(str(name), list(RENDER_PRESETS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"unknown render preset {name!r}{hint} (available: {', '.join(RENDER_PRESETS)})"
            )
        return {**RENDER_PRESETS[name], **data}

    @model_validator(mode="after")
    def _check(self) -> SynthRenderConfig:
        lo, hi = self.images_per_id
        if not 1 <= lo <= hi:
            raise ValueError(f"images_per_id must be (min, max) with 1 <= min <= max, got {lo, hi}")
        if self.plan == "disk":
            from .layout import PRESETS

            if self.disk_preset not in PRESETS:
                raise ValueError(
                    f"plan=disk needs disk_preset, one of {sorted(PRESETS)}; got "
                    f"{self.disk_preset!r}"
                )
            wide = [k for k in VARIETY_KNOBS if getattr(self, k) != 0]
            if wide:
                raise ValueError(
                    f"plan=disk renders the on-disk images exactly, so the variety knobs must "
                    f"stay 0 (set: {', '.join(wide)}); use plan=index (e.g. preset=large)"
                )
        return self

    @property
    def variety(self) -> dict[str, float]:
        """The variety strengths by name."""
        return {k: float(getattr(self, k)) for k in VARIETY_KNOBS}
