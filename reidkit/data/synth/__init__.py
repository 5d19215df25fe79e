"""Synthetic pedestrian re-ID data, rendered with numpy + Pillow.

Two generators share the identities, cameras and renderer:

* :func:`generate` (``reidkit synth --preset tiny|small|market``): still images in the
  Market-1501 layout (:mod:`.layout`);
* :func:`generate_video` (``reidkit synth --video --preset tiny-video|small-video``):
  tracklets of people walking across each camera in the MARS layout, with occluders that
  pass through and, for every occluded frame, the frame without the occluder and the
  occluder mask (:mod:`.video`).

Modules, bottom up:

* :mod:`.identity`: palettes, cue values, look-alike families (``sample_identity``);
* :mod:`.camera`: camera appearance models, backgrounds, camera effects (``Camera``);
* :mod:`.rendering`: skeleton, body parts, keypoints, occluders (``render_sample``);
* :mod:`.layout`: presets, plan and writer of the image set (``generate``);
* :mod:`.video`: presets, plan and writer of the video set (``generate_video``);
* :mod:`.preview`: contact sheets (``write_preview``, ``write_video_preview``);
* :mod:`.knobs`, :mod:`.variety`, :mod:`.online`: the set rendered on the fly in the
  loader workers (``data.dataset: synth_render``; ``SynthRenderSource``), with presets up
  to hundreds of thousands of images and wider distributions (docs/pretrain.md).

Everything is deterministic for a seed and independent of the number of worker
processes; see docs/synth.md and docs/video.md.
"""

from __future__ import annotations

from .camera import Camera, apply_camera
from .identity import CUE_KEYS, FAMILY_VARYING_CUES, sample_identity
from .knobs import RENDER_PRESETS, VARIETY_KNOBS, SynthRenderConfig
from .layout import (
    PRESETS,
    SPLIT_FOLDERS,
    SynthPreset,
    ensure_synth,
    format_summary,
    generate,
)
from .layout import _sample_counts as _sample_counts  # noqa: F401  (tests, tools)
from .layout import _split_over as _split_over  # noqa: F401
from .online import RenderedRecords, SynthRenderSource
from .preview import write_preview, write_video_preview
from .rendering import COCO_KEYPOINT_NAMES, OCCLUDER_KINDS, Tracklet, render_sample
from .video import (
    VIDEO_PRESETS,
    VideoPreset,
    format_video_summary,
    generate_video,
    mars_frame_name,
    render_tracklet,
)

__all__ = [
    "RENDER_PRESETS",
    "VARIETY_KNOBS",
    "SynthRenderConfig",
    "SynthRenderSource",
    "RenderedRecords",
    "PRESETS",
    "SynthPreset",
    "COCO_KEYPOINT_NAMES",
    "SPLIT_FOLDERS",
    "generate",
    "ensure_synth",
    "format_summary",
    "write_preview",
    "VIDEO_PRESETS",
    "VideoPreset",
    "OCCLUDER_KINDS",
    "generate_video",
    "format_video_summary",
    "write_video_preview",
    "mars_frame_name",
    "render_tracklet",
    "sample_identity",
    "render_sample",
    "apply_camera",
    "Camera",
    "Tracklet",
    "CUE_KEYS",
    "FAMILY_VARYING_CUES",
]
