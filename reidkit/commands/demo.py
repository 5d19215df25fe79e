"""``reidkit demo``: the whole pipeline on the embedded synthetic set in a few minutes.

Generates the ``small`` synthetic set at ``data/synth-small`` if it is missing, trains the
BoT baseline (ResNet-18, 64x32 input, 20 epochs; ``configs/synth/bot_demo.yaml``), evaluates it and
prints the metrics table and where the run folder is.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run", "find_config"]


def find_config(relative: str) -> Path:
    """A file of the repository's ``configs/`` folder (next to the package, or in the cwd)."""
    import reidkit

    for base in (Path(reidkit.__file__).resolve().parent.parent, Path.cwd()):
        path = base / "configs" / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"configs/{relative} not found next to the reidkit package or in {Path.cwd()}"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from reidkit.engine import train

    t0 = time.time()
    config = Path(args.config) if args.config else find_config("synth/bot_demo.yaml")
    cfg = _common.load_config_from_args(
        args, [f"data.root={args.data_root}", f"output_dir={args.output_dir}"], config=config
    )
    from reidkit.data.synth import ensure_synth

    # meta.json is written last: without it the folder is missing or incomplete
    ensure_synth(cfg.data, progress=not args.no_progress, regenerate_incomplete=True)
    if (
        cfg.device in ("auto", "cpu")
        and not torch.cuda.is_available()
        and "OMP_NUM_THREADS" not in os.environ
    ):
        # compute threads + loader workers <= cores: oversubscribing a small CPU is much slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.data.num_workers))
    print(f"training {config} -> {cfg.output_dir}", flush=True)
    run_dir = train(cfg, overwrite=True, progress=not args.no_progress)
    print(f"demo finished in {time.time() - t0:.0f} s; run folder: {run_dir.resolve()}")
    print(
        f"  evaluate again: reidkit eval -c {run_dir / 'config.yaml'} --weights {run_dir / 'checkpoints' / 'best.pt'}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub,
        "demo",
        help="train + evaluate BoT on the synthetic set (a few minutes on CPU)",
        doc=__doc__,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--config", default=None, help="config to run (default configs/synth/bot_demo.yaml)"
    )
    p.add_argument(
        "--data-root", default="data", help="where data/synth-small lives or is generated"
    )
    p.add_argument("--output-dir", default="runs/demo", help="run folder (overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
