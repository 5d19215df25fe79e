"""``reidkit fewshot``: few-shot classification with CAN (cross attention network).

    reidkit fewshot train -c configs/fewshot/mini_5w1s.yaml [key=value ...] [--resume]
    reidkit fewshot eval  -c configs/fewshot/mini_5w1s.yaml [--weights FILE] [key=value ...]
    reidkit fewshot compare RUN_A RUN_B        # paired difference on the same episodes

``train`` writes a run folder (``output_dir``): ``config.yaml``, ``log.jsonl``,
``checkpoints/{last,best}.pt`` and, at the end, ``metrics.json`` with the test accuracy
+- 95 % confidence interval of CAN and CAN+T. ``eval`` scores ``eval.episodes`` seeded
episodes of ``eval.split`` with the run's ``checkpoints/last.pt`` (or ``--weights``, which
also accepts a checkpoint of the authors' code) and writes ``eval_<split>.json`` next to it.
Per-episode accuracies go to ``<split>_episodes.npz`` (train) / ``eval_<split>_episodes.npz``
(eval); ``compare`` reads them and prints the paired difference of two runs +- 95 % CI.
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
    from reidkit.fewshot.engine import (
        evaluate_fewshot,
        format_result,
        load_fewshot_weights,
        save_episode_accuracies,
    )

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
    episodes = save_episode_accuracies(result, out.with_name(out.stem + "_episodes.npz"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out} and {episodes}")
    return 0


def _episode_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    for name in (f"eval_{split}_episodes.npz", f"{split}_episodes.npz"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"{path}: no per-episode accuracies (eval_{split}_episodes.npz or {split}_episodes.npz; "
        "written by `reidkit fewshot train` and `reidkit fewshot eval`)"
    )


def _compare(args: argparse.Namespace) -> int:
    import numpy as np

    from reidkit.fewshot.metrics import mean_confidence_interval, paired_difference

    files = [_episode_file(Path(p), args.split) for p in (args.a, args.b)]
    data = [dict(np.load(f, allow_pickle=False)) for f in files]
    settings = [(d["settings"].tolist(), int(d["seed"])) for d in data]
    if settings[0] != settings[1]:
        raise ValueError(
            f"{files[0]} and {files[1]} are not the same episodes ((split, way, shot, queries), "
            f"seed: {settings[0]} vs {settings[1]})"
        )
    split, way, shot, queries = settings[0][0]
    print(f"{way}-way {shot}-shot, {queries} queries/class, {split} split, seed {settings[0][1]}")
    print(f"  A = {files[0]}\n  B = {files[1]}")
    for key in ("accuracy", "transductive"):
        if key not in data[0] or key not in data[1]:
            continue
        label = "inductive" if key == "accuracy" else "transductive (+T)"
        a, b = data[0][key], data[1][key]
        ma, ca = mean_confidence_interval(a)
        mb, cb = mean_confidence_interval(b)
        d, cd = paired_difference(a, b)
        print(
            f"  {label:18s} A {ma:6.2f} +- {ca:.2f}   B {mb:6.2f} +- {cb:.2f}   "
            f"A - B {d:+6.2f} +- {cd:.2f} (paired, {a.size} episodes)"
        )
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
    _common.add_run_control_arguments(
        t,
        resume_help="continue from checkpoints/last.pt",
        overwrite_help="start over in an existing run",
    )
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

    c = actions.add_parser(
        "compare", help="paired accuracy difference of two runs on the same episodes"
    )
    c.add_argument("a", help="run folder or *_episodes.npz (A)")
    c.add_argument("b", help="run folder or *_episodes.npz (B)")
    c.add_argument("--split", default="test", help="split of the evaluations (default test)")
    _common.add_debug_argument(c)
    c.set_defaults(func=_compare)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
