"""``reidkit analyze <tool>``: method-specific analyses of trained runs.

``reidkit analyze cge --run RUN [--baseline-run RUN] [--focal-run RUN] --out DIR``
writes the CGE paper's analyses (hardness pie, stripe-memory precision, loss CDF,
saliency grid, index.html) for a CGE run folder.
"""

from __future__ import annotations

import argparse


def _run_cge(args: argparse.Namespace) -> int:
    from reidkit.errors import require_extra

    require_extra("plot", "reidkit analyze cge (its figures)")  # before the analysis runs
    from reidkit.analysis.cge import LEVEL_NAMES, analyze_runs

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = analyze_runs(
        run=args.run,
        out_dir=args.out,
        baseline_run=args.baseline_run,
        focal_run=args.focal_run,
        checkpoint=args.checkpoint,
        device=device,
        focal_gamma=args.focal_gamma,
        num_saliency=args.num_saliency,
        max_samples=args.max_samples,
    )
    print(
        f"CGE analysis of {args.run} ({summary['num_samples']} training images, n={summary['num_stripes']})"
    )
    print(
        "hardness levels: "
        + ", ".join(f"{k} {100 * summary['hardness'][k]:.1f}%" for k in LEVEL_NAMES)
    )
    print("| memory | precision |\n|---|---|")
    for name, value in summary["stripe_precision"].items():
        print(f"| {name} | {100 * value:.1f}% |")
    print(f"wrote {args.out}/index.html")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="analyses of trained runs (cge)")
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    cge = tools.add_parser("cge", help="CGE: hardness levels, stripe precision, loss CDF, saliency")
    cge.add_argument("--run", required=True, help="CGE run folder (config.yaml + checkpoints/)")
    cge.add_argument("--baseline-run", default=None, help="baseline run folder (BoT/AGW)")
    cge.add_argument(
        "--focal-run", default=None, help="run trained with focal loss (loss.focal_gamma)"
    )
    cge.add_argument("--out", required=True, help="output folder")
    cge.add_argument("--checkpoint", choices=["best", "last"], default="best")
    cge.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    cge.add_argument("--focal-gamma", type=float, default=1.0, help="gamma without --focal-run")
    cge.add_argument("--num-saliency", type=int, default=6, help="rows of the saliency grid")
    cge.add_argument("--max-samples", type=int, default=None, help="first N training images only")
    cge.add_argument("--debug", action="store_true", help="show tracebacks")
    cge.set_defaults(func=_run_cge)
