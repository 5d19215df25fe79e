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

from reidkit.commands import _common
from reidkit.errors import one_line

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    from reidkit.data.synth import ensure_synth
    from reidkit.engine import NonFiniteLossError, train

    cfg = _common.load_config_from_args(args)
    if not args.resume:
        ensure_synth(cfg.data, progress=not args.no_progress)  # the synthetic set, once
    try:
        train(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after_epochs=args.stop_after,
            progress=not args.no_progress,
        )
    except NonFiniteLossError as exc:
        if args.debug:
            raise
        print(f"reidkit train: stopped: {one_line(exc)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"reidkit train: interrupted; the checkpoints in {cfg.output_dir}/checkpoints are "
            "intact: continue with --resume",
            file=sys.stderr,
        )
        return 130
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(sub, "train", help="train a model from a config", doc=__doc__)
    _common.add_config_arguments(
        p,
        config_help="YAML config (may use _base_)",
        overrides_help="config overrides, e.g. solver.lr=1e-4",
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
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
