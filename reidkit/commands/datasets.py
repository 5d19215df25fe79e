"""``reidkit datasets``: inspect datasets.

reidkit datasets stats -c configs/market.yaml [data.root=/data]
reidkit datasets stats --name market1501 --root /data [--verify] [--option key=value]
reidkit datasets stats --name mars --root /data            (video datasets: tracklet table)
reidkit datasets list
"""

from __future__ import annotations

import argparse
import warnings

import yaml

__all__ = ["add_parser"]


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--option {item!r}: expected key=value, e.g. variant=detected")
        key, _, text = item.partition("=")
        out[key.strip()] = yaml.safe_load(text) if text else ""
    return out


def _stats(args: argparse.Namespace) -> int:
    from reidkit.data.datasets import build_dataset, dataset_from_config, format_stats
    from reidkit.data.datasets.video import (
        build_video_dataset,
        format_video_stats,
        is_video_dataset,
        video_dataset_from_config,
    )

    extra = _parse_options(args.option)
    if args.verify:
        extra["verify_images"] = True
    if args.skip_corrupt:
        extra["skip_corrupt"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.config is not None:
            if args.name or args.root:
                raise ValueError("give either -c CONFIG or --name/--root, not both")
            from reidkit.config import load_config

            cfg = load_config(args.config, args.overrides)
            if is_video_dataset(cfg.data.dataset):
                ds = video_dataset_from_config(cfg.data, **extra)
            else:
                ds = dataset_from_config(cfg.data, **extra)
        else:
            if not args.name:
                raise ValueError("give -c CONFIG, or --name NAME (with --root ROOT)")
            if args.overrides:
                raise ValueError(f"key=value overrides {args.overrides} need -c CONFIG")
            build = build_video_dataset if is_video_dataset(args.name) else build_dataset
            ds = build(args.name, args.root or "data", **extra)
    print(format_video_stats(ds) if hasattr(ds, "skipped_tracklets") else format_stats(ds))
    for w in caught:
        print(f"  warning: {w.message}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from reidkit.data.datasets import available_datasets
    from reidkit.data.datasets.video import available_video_datasets

    for name, options in available_datasets().items():
        opts = ", ".join(options) if options else "-"
        print(f"{name:14s} options: {opts}")
    for name, options in available_video_datasets().items():
        opts = ", ".join(options) if options else "-"
        print(f"{name:14s} options: {opts}  (video: tracklets)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``reidkit datasets {stats,list}``."""
    parser = sub.add_parser("datasets", help="dataset statistics and checks")
    dsub = parser.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)

    stats = dsub.add_parser(
        "stats", help="print # ids / # images / # cameras per split (torchreid-style table)"
    )
    stats.add_argument("-c", "--config", help="experiment config (uses its data section)")
    stats.add_argument("--name", help="dataset name (instead of -c), e.g. market1501")
    stats.add_argument("--root", help="data root holding the dataset folder (with --name)")
    stats.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset option, repeatable (e.g. variant=detected, version=v2, merge_val=false)",
    )
    stats.add_argument("--verify", action="store_true", help="open and verify every image")
    stats.add_argument(
        "--skip-corrupt", action="store_true", help="skip and count unreadable images"
    )
    stats.add_argument("--debug", action="store_true", help="show tracebacks")
    stats.add_argument("overrides", nargs="*", help="config overrides key.sub=value (with -c)")
    stats.set_defaults(func=_stats)

    lst = dsub.add_parser("list", help="registered dataset names and their options")
    lst.set_defaults(func=_list)
