"""``reidkit synth``: render the synthetic pedestrian dataset (Market-1501 layout).

    reidkit synth --preset tiny|small|market --out DIR [--seed S] [--workers N] [--preview]
    reidkit synth --preview-only DIR

See ``docs/synth.md`` and :mod:`reidkit.data.synth`.
"""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from reidkit.data.synth import PRESETS, format_summary, generate, write_preview

    if args.preview_only is not None:
        path = write_preview(args.preview_only)
        print(f"wrote {path}")
        return 0
    if args.out is None:
        print(
            "reidkit synth: error: --out DIR is required (or use --preview-only DIR)",
            file=sys.stderr,
        )
        return 2
    if args.preset not in PRESETS:  # argparse choices already check; keep a clear message
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    try:
        summary = generate(
            args.out,
            preset=args.preset,
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
    print(format_summary(summary))
    if args.preview:
        print(f"wrote {summary['root']}/preview.png")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from reidkit.data.synth import PRESETS

    sizes = ", ".join(f"{name}: {p.num_images} images" for name, p in PRESETS.items())
    parser = sub.add_parser(
        "synth",
        help="render the synthetic pedestrian dataset (Market-1501 layout, keypoints)",
        description=(
            "Render a synthetic person re-ID dataset in the Market-1501 layout "
            f"({sizes}). Output is byte-identical for the same seed, whatever --workers."
        ),
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="dataset size")
    parser.add_argument("--out", default=None, help="output folder (the dataset folder itself)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="render processes (default: all CPU cores)"
    )
    parser.add_argument("--height", type=int, default=128, help="image height (default 128)")
    parser.add_argument("--width", type=int, default=64, help="image width (default 64)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already in --out"
    )
    parser.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
    parser.add_argument(
        "--preview-only",
        metavar="DIR",
        default=None,
        help="only (re)write DIR/preview.png for an existing synthetic dataset",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(func=_run)
