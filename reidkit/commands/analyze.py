"""``reidkit analyze <tool>``: method-specific analyses of trained runs.

``reidkit analyze cge --run RUN [--baseline-run RUN] [--focal-run RUN] --out DIR``
writes the CGE paper's analyses (hardness pie, stripe-memory precision, loss CDF,
saliency grid, index.html) for a CGE run folder.

``reidkit analyze tkp --run RUN --baseline-run RUN --out DIR`` writes TKP's (image and
video features in one 2-D projection, the modality gap, the image network's class
activation maps; index.html) for a TKP run and one trained without the TKP terms.
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


def _run_tkp(args: argparse.Namespace) -> int:
    from reidkit.analysis.tkp import analyze_tkp_runs

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = analyze_tkp_runs(
        args.run,
        args.baseline_run,
        args.out,
        names=(args.name, args.baseline_name),
        checkpoint=args.checkpoint,
        device=device,
        projection=args.projection,
        max_ids=args.max_ids,
        num_cams=args.num_cams,
        progress=not args.no_progress,
    )
    print(
        "| model | same identity | other identities | ratio | frame to own tracklet | CAM on the person |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, g in summary["gap"].items():
        share = (summary.get("foreground_share") or {}).get(name)
        fg = "-" if share is None else f"{100 * share:.1f}%"
        print(
            f"| {name} | {g['same_id']:.3f} | {g['other_id']:.3f} | {g['ratio']:.3f} | "
            f"{g['paired']:.3f} | {fg} |"
        )
    print(f"wrote {args.out}/index.html")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="analyses of trained runs (cge, tkp)")
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

    tkp = tools.add_parser(
        "tkp", help="TKP: image / video feature projection, modality gap, image-network CAMs"
    )
    tkp.add_argument("--run", required=True, help="TKP run folder (with the TKP terms)")
    tkp.add_argument(
        "--baseline-run",
        required=True,
        help="TKP run without them (configs/tkp/*_joint.yaml or *_image_only.yaml)",
    )
    tkp.add_argument("--out", required=True, help="output folder")
    tkp.add_argument("--name", default="with TKP", help="label of --run")
    tkp.add_argument("--baseline-name", default="without TKP", help="label of --baseline-run")
    tkp.add_argument("--checkpoint", choices=["best", "last"], default="best")
    tkp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    tkp.add_argument(
        "--projection",
        choices=["auto", "pca", "tsne", "both"],
        default="auto",
        help="auto: PCA, plus t-SNE when scikit-learn is installed",
    )
    tkp.add_argument("--max-ids", type=int, default=20, help="identities in the projection")
    tkp.add_argument("--num-cams", type=int, default=8, help="rows of the CAM grid")
    tkp.add_argument("--no-progress", action="store_true", help="no progress bars")
    tkp.add_argument("--debug", action="store_true", help="show tracebacks")
    tkp.set_defaults(func=_run_tkp)
