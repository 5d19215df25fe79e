"""``reidkit demo``: the whole pipeline on the embedded synthetic set in a few minutes.

Generates the ``small`` synthetic set at ``data/synth-small`` if it is missing, trains the
BoT baseline (ResNet-18 from scratch, 64x32 input; ``configs/synth/bot_demo.yaml``) with a
progress bar and ETA, evaluates it, prints the CMC / mAP / mINP table and writes the HTML
ranking report of the trained model (``<output-dir>/report/report.html``).

Measured on a fresh clone of a 2-core machine while another job was training (load
1.3-2.5): ``time make demo`` took 4 min 4 s including the install (training: 2 min 25 s
on 2 threads) and reached mAP 29.3 / R1 22.7 / R10 71.3 / mINP 17.7 (README, docs/synth.md). Shorter or
longer: ``reidkit demo solver.max_epochs=4`` (quicker, lower mAP) or
``reidkit demo solver.max_epochs=30 solver.milestones=[24]``; any ``key=value`` override
of the config applies.

Threads: the loader runs in the main process (``data.num_workers=0``: on 2 cores a loader
worker only competes with the compute threads) and torch uses the cores this process may
run on that other processes leave free (``reidkit.threads.thread_limit``);
``OMP_NUM_THREADS`` or ``--threads`` override that.
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

    from reidkit.commands.report import write_report
    from reidkit.engine import train

    t0 = time.time()
    config = Path(args.config) if args.config else find_config("synth/bot_demo.yaml")
    cfg = _common.load_config_from_args(
        args, [f"data.root={args.data_root}", f"output_dir={args.output_dir}"], config=config
    )
    from reidkit.data.synth import ensure_synth

    # meta.json is written last: without it the folder is missing or incomplete
    ensure_synth(cfg.data, progress=not args.no_progress, regenerate_incomplete=True)
    from reidkit import threads as threads_module
    from reidkit.threads import set_threads, thread_limit

    threads = args.threads
    explicit = threads_module._requested is not None  # `reidkit --threads N demo`
    if threads is None and not explicit and "OMP_NUM_THREADS" not in os.environ:
        # the cores this process may use that other processes leave free right now, less
        # the loader workers (on a busy machine one thread beats two fighting for a core)
        threads = max(1, thread_limit(samples=9) - cfg.data.num_workers)
    if threads:
        set_threads(threads)
    print(
        f"training {config} -> {cfg.output_dir} ({torch.get_num_threads()} threads, "
        f"{cfg.data.num_workers} loader workers)",
        flush=True,
    )
    run_dir = train(cfg, overwrite=True, progress=not args.no_progress)
    weights = run_dir / "checkpoints" / "best.pt"
    report = write_report(
        cfg,
        weights,
        run_dir / "report",
        progress=not args.no_progress,
        print_table=False,  # training just printed the table
    )
    print(f"demo finished in {time.time() - t0:.0f} s; run folder: {run_dir.resolve()}")
    print(f"ranking report: {report.resolve()}")
    print(f"  evaluate again: reidkit eval -c {run_dir / 'config.yaml'} --weights {weights}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub,
        "demo",
        help="train + evaluate BoT on the synthetic set, write the ranking report",
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
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the free cores)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
