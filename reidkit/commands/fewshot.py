"""``reidkit fewshot``: few-shot classification with CAN (cross attention network).

    reidkit fewshot train -c configs/fewshot/mini_5w1s.yaml [key=value ...] [--resume]
    reidkit fewshot eval  -c configs/fewshot/mini_5w1s.yaml [--weights FILE] [key=value ...]

``train`` writes a run folder (``output_dir``): ``config.yaml``, ``log.jsonl``,
``checkpoints/{last,best}.pt`` and, at the end, ``metrics.json`` with the test accuracy
+- 95 % confidence interval of CAN and CAN+T. ``eval`` scores ``eval.episodes`` seeded
episodes of ``eval.split`` with the run's ``checkpoints/last.pt`` (or ``--weights``, which
also accepts a checkpoint of the authors' code) and writes ``eval_<split>.json`` next to it.
Set ``model.name=proto`` for the prototype baseline (same network, no cross attention).
See docs/fewshot.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser"]


def _load(args: argparse.Namespace):
    from reidkit.fewshot.config import load_fewshot_config

    return load_fewshot_config(args.config, list(args.overrides))


def _train(args: argparse.Namespace) -> int:
    from reidkit.fewshot.engine import FewShotNonFiniteLossError, train_fewshot

    cfg = _load(args)
    try:
        train_fewshot(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after_epochs=args.stop_after,
            progress=not args.no_progress,
        )
    except FewShotNonFiniteLossError as exc:
        print(f"reidkit fewshot train: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


def _eval(args: argparse.Namespace) -> int:
    from reidkit.engine.distributed import resolve_device
    from reidkit.fewshot.datasets import load_fewshot_dataset
    from reidkit.fewshot.engine import evaluate_fewshot, format_result, load_fewshot_weights

    cfg = _load(args)
    run = Path(cfg.output_dir)
    weights = Path(args.weights) if args.weights else run / "checkpoints" / "last.pt"
    if args.weights:
        weights = _common.resolve_weights_file(weights)
    elif not weights.is_file():
        raise FileNotFoundError(
            f"no weights: {weights} does not exist (train first, or pass --weights FILE)"
        )
    device = resolve_device(cfg.device)
    model = load_fewshot_weights(cfg, weights, device)
    dataset = load_fewshot_dataset(cfg.data)
    result = evaluate_fewshot(
        model, dataset.split(cfg.eval.split), cfg, progress=not args.no_progress, device=device
    )
    result["weights"] = str(weights)
    print(format_result(result))
    if args.out:
        out = Path(args.out)
    else:  # next to the run the weights belong to
        folder = weights.parent.parent if weights.parent.name == "checkpoints" else run
        out = folder / f"eval_{cfg.eval.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "fewshot", help="few-shot classification (CAN): train / eval", doc=__doc__
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    t = actions.add_parser("train", help="episodic training (writes a run folder)")
    _common.add_config_arguments(
        t,
        config_help="few-shot YAML config (configs/fewshot/*.yaml)",
        overrides_help="config overrides, e.g. episode.shot=5 model.name=proto",
    )
    t.add_argument("--resume", action="store_true", help="continue from checkpoints/last.pt")
    t.add_argument("--overwrite", action="store_true", help="start over in an existing run")
    t.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N epochs")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(t)
    t.set_defaults(func=_train)

    e = actions.add_parser("eval", help="accuracy +- 95%% CI over seeded test episodes")
    _common.add_config_arguments(
        e,
        config_help="few-shot YAML config",
        overrides_help="config overrides, e.g. eval.episodes=600 eval.split=val",
    )
    e.add_argument(
        "--weights",
        default=None,
        help=f"{_common.WEIGHTS_HELP}; default <output_dir>/checkpoints/last.pt",
    )
    e.add_argument(
        "--out", default=None, help="result JSON (default: eval_<split>.json in the run)"
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(e)
    e.set_defaults(func=_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
