"""``reidkit train``: train a config, writing a run folder.

    reidkit train -c configs/bot/market1501.yaml [key=value ...] [--resume] [--overwrite]
    torchrun --nproc_per_node 4 -m reidkit.cli train -c CONFIG      # DDP

The run folder is ``output_dir`` (override it with ``output_dir=runs/x``): the resolved
``config.yaml``, ``log.jsonl``, ``checkpoints/{last,best,epoch_NNN}.pt`` and, at the end,
``metrics.json``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    from reidkit.config import load_config
    from reidkit.engine import NonFiniteLossError, train

    cfg = load_config(args.config, args.overrides)
    try:
        train(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after_epochs=args.stop_after,
            progress=not args.no_progress,
        )
    except NonFiniteLossError as exc:
        print(f"reidkit train: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", required=True, help="YAML config (may use _base_)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.lr=1e-4"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from <output_dir>/checkpoints/last.pt"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start over in an output_dir that holds a run"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this call (continue later with --resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.set_defaults(func=run)
