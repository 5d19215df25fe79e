"""``reidkit synth``: render the synthetic pedestrian dataset (Market-1501 layout) or the
synthetic video set (MARS layout, ``--video``).

    reidkit synth --preset tiny|small|market --out DIR [--seed S] [--workers N] [--preview]
    reidkit synth --video --preset tiny-video|small-video --out DIR [...]
    reidkit synth --preview-only DIR

See ``docs/synth.md``, ``docs/video.md`` and :mod:`reidkit.data.synth`.
"""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reidkit.data.synth import (
        PRESETS,
        VIDEO_PRESETS,
        format_summary,
        format_video_summary,
        generate,
        generate_video,
        write_preview,
        write_video_preview,
    )

    if args.preview_only is not None:
        video = (Path(args.preview_only) / "occlusion.json").is_file()
        path = (write_video_preview if video else write_preview)(args.preview_only)
        print(f"wrote {path}")
        return 0
    preset = args.preset or ("tiny-video" if args.video else "tiny")
    if preset in VIDEO_PRESETS:
        args.video = True  # a video preset implies --video
    elif args.video:
        print(
            f"reidkit synth: error: --video needs a video preset ({', '.join(VIDEO_PRESETS)}); "
            f"got --preset {preset}",
            file=sys.stderr,
        )
        return 2
    if args.out is None:
        print(
            "reidkit synth: error: --out DIR is required (or use --preview-only DIR)",
            file=sys.stderr,
        )
        return 2
    if preset not in PRESETS and preset not in VIDEO_PRESETS:  # argparse checks it too
        raise ValueError(
            f"unknown preset {preset!r}; choose one of {sorted(PRESETS) + sorted(VIDEO_PRESETS)}"
        )
    make = generate_video if args.video else generate
    try:
        summary = make(
            args.out,
            preset=preset,
            seed=args.seed,
            workers=args.workers,
            height=args.height,
            width=args.width,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            preview=args.preview,
        )
    except FileExistsError as exc:
        print(f"reidkit synth: error: {exc}", file=sys.stderr)
        return 1
    print((format_video_summary if args.video else format_summary)(summary))
    if args.preview:
        print(f"wrote {summary['root']}/preview.png")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from reidkit.data.synth import PRESETS, VIDEO_PRESETS

    sizes = ", ".join(f"{name}: {p.num_images} images" for name, p in PRESETS.items())
    parser = sub.add_parser(
        "synth",
        help="render the synthetic pedestrian dataset (Market-1501 layout) or video set (MARS)",
        description=(
            "Render a synthetic person re-ID dataset in the Market-1501 layout "
            f"({sizes}), or with --video tracklets in the MARS layout with passing occluders "
            f"and their ground truth (presets {', '.join(VIDEO_PRESETS)}). Output is "
            "byte-identical for the same seed, whatever --workers."
        ),
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS) + sorted(VIDEO_PRESETS),
        help="dataset size (default tiny, or tiny-video with --video)",
    )
    parser.add_argument(
        "--video",
        action="store_true",
        help="render video tracklets in the MARS layout (docs/video.md)",
    )
    parser.add_argument("--out", default=None, help="output folder (the dataset folder itself)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="render processes (default: all CPU cores)"
    )
    parser.add_argument(
        "--height", type=int, default=128, help="image / frame height (default 128)"
    )
    parser.add_argument("--width", type=int, default=64, help="image / frame width (default 64)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in --out"
    )
    parser.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
    parser.add_argument(
        "--preview-only",
        metavar="DIR",
        default=None,
        help="only (re)write DIR/preview.png for an existing synthetic dataset (image or video)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(func=_run)
