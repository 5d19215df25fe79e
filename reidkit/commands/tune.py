"""``reidkit tune``: sweep config values on a validation split of the training identities.

    reidkit tune -c CONFIG --param model.mgre.lam=0.1,0.5,1.0 [--param KEY=V1,V2 ...]
                 [--val-ids 100] [--seed 0] [--out DIR] [--eval-only] [key=value ...]

``--val-ids`` training identities (100 by default, as the MGRe paper's Fig. 6) are held
out; every combination of the ``--param`` values (a grid) is trained on the remaining
identities and evaluated once, at the end, on the held-out ones split into query and
gallery by camera (per identity one query image per camera; identities seen by a single
camera are gallery distractors). ``--eval-only`` trains once and evaluates every
combination with the same weights, for values that only change the test feature (e.g.
``model.mgre.feature_weights``). Values are parsed like ``key=value`` overrides; lists
separate at top-level commas (``--param "model.mgre.stages=[1],[2,3]"``).

Writes ``DIR/tune.json`` (split, values, metrics, run folders), ``DIR/tune.md`` (the
table) and ``DIR/tune.png`` (mAP / R1 against the first parameter, one line per value of
the others); ``DIR`` defaults to ``<output_dir>/tune``. Works for every method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    from reidkit.config import load_config
    from reidkit.engine.tune import format_sweep_table, parse_sweep_param, plot_sweep, sweep

    params = [parse_sweep_param(p) for p in args.param]
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "tune"
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(
            f"--out {out} is not empty (an earlier sweep?); pass --overwrite to replace its "
            "runs, or choose another --out"
        )
    result = sweep(
        args.config,
        params,
        out,
        overrides=args.overrides,
        val_ids=args.val_ids,
        seed=args.seed,
        eval_only=args.eval_only,
        progress=not args.no_progress,
    )
    table = format_sweep_table(result)
    print(table)
    best = result.best()
    shown = " ".join(f"{k}={v}" for k, v in best.values.items())
    print(f"best mAP: {shown} ({100 * best.metrics['mAP']:.1f})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result.to_json(), indent=2))
    (out / "tune.md").write_text(table + "\n")
    plot = plot_sweep(result, out / "tune.png", title=f"{cfg.model.name}: {args.config}")
    print(f"wrote {out / 'tune.json'}, {out / 'tune.md'}, {plot}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "tune", help="sweep config values on a validation split of train ids", doc=__doc__
    )
    _common.add_config_arguments(p, overrides_help="config overrides applied to every run")
    p.add_argument(
        "--param",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a config key and the values to try (repeat for a grid)",
    )
    p.add_argument(
        "--val-ids", type=int, default=100, help="training identities held out (default 100)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--out", default=None, help="output folder (default <output_dir>/tune)")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="train once, evaluate every combination (test-time values only)",
    )
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
