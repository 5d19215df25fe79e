"""``reidkit train``: train a config, writing a run folder.

    reidkit train -c configs/bot/market1501.yaml [key=value ...] [--resume] [--overwrite]
    torchrun --nproc_per_node 4 -m reidkit.cli train -c CONFIG      # DDP

The run folder is ``output_dir`` (override it with ``output_dir=runs/x``): the resolved
``config.yaml``, ``log.jsonl``, ``checkpoints/{last,best,epoch_NNN}.pt`` and, at the end,
``metrics.json``.

Datasets with 10 train/test splits (iLIDS-VID, PRID2011): ``--all-splits`` (or
``--splits 0 1 2``) trains one model per split into ``<output_dir>/split<S>`` and writes
``<output_dir>/splits.json`` with the final metrics of every split, their mean and
standard deviation (evaluate them again with ``reidkit eval --all-splits --weights
'<output_dir>/split{split}/checkpoints/best.pt'``).
"""

from __future__ import annotations

import argparse
import sys

from reidkit.commands import _common
from reidkit.errors import one_line

__all__ = ["add_parser", "run"]


def _run_splits(args: argparse.Namespace, cfg) -> int:
    import json
    from pathlib import Path

    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import train
    from reidkit.engine.video_eval import format_split_summary, summarize_splits

    dataset = dataset_from_config(cfg.data)
    num = getattr(dataset, "num_splits", 1)
    if num < 2:
        raise ValueError(
            f"--all-splits / --splits: '{dataset.name}' has a single train/test split; the "
            "10-split datasets are ilidsvid and prid2011"
        )
    splits = list(range(num)) if args.splits is None else list(args.splits)
    bad = [s for s in splits if not 0 <= s < num]
    if bad:
        raise ValueError(f"--splits {bad}: '{dataset.name}' has splits 0..{num - 1}")
    root = Path(cfg.output_dir)
    per_split = []
    for s in splits:
        split_cfg = cfg.model_copy(deep=True)
        split_cfg.data.video_split = s
        split_cfg.output_dir = str(root / f"split{s}")
        out = train(
            split_cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        metrics = json.loads((Path(out) / "metrics.json").read_text())
        per_split.append({k: v for k, v in (metrics.get("final") or {}).items() if k != "epoch"})
    summary = summarize_splits(per_split)
    modes = [k[: -len("_mAP")] for k in per_split[0] if k.endswith("_mAP")] or []
    if modes:
        print(format_split_summary(summary, modes, title=dataset.name))
    root.mkdir(parents=True, exist_ok=True)
    (root / "splits.json").write_text(
        json.dumps({"splits": splits, "per_split": per_split, "summary": summary}, indent=2)
    )
    print(f"splits summary: {root / 'splits.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from reidkit.data.synth import ensure_synth
    from reidkit.engine import NonFiniteLossError, train

    cfg = _common.load_config_from_args(args)
    if not args.resume:
        ensure_synth(cfg.data, progress=not args.no_progress)  # the synthetic set, once
    if args.all_splits or args.splits is not None:
        if args.stop_after is not None:
            raise ValueError("--stop-after applies to one run, not to --all-splits")
        try:
            return _run_splits(args, cfg)
        except NonFiniteLossError as exc:
            print(f"reidkit train: stopped: {exc}", file=sys.stderr)
            return 3
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
    _common.add_run_control_arguments(
        p,
        resume_help="continue from <output_dir>/checkpoints/last.pt",
        overwrite_help="start over in an output_dir that holds a run",
    )
    p.add_argument(
        "--all-splits",
        action="store_true",
        help="10-split datasets: one run per split in <output_dir>/split<S>, then mean and "
        "spread (splits.json)",
    )
    p.add_argument(
        "--splits", type=int, nargs="+", default=None, metavar="S", help="these splits only"
    )
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
