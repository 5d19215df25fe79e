"""The ``reidkit`` command line: each subcommand lives in ``reidkit/commands/<name>.py``
and exposes ``add_parser(subparsers)`` (which sets ``func`` via ``set_defaults``)."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

# OpenMP threads that wait for work sleep instead of spinning: on a busy 2-core CPU a
# spinning team of 2 threads was measured 5x slower per training step than 1 thread,
# a sleeping one as fast (docs/speed.md); sleeping costs little when the machine is idle.
# Must be set before torch (and its OpenMP runtime) is loaded; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import reidkit.commands as commands  # noqa: E402
from reidkit.errors import UserError, one_line  # noqa: E402
from reidkit.threads import set_threads, thread_limit  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reidkit", description="Person re-identification toolkit")
    parser.add_argument(
        "--version", action="version", version=f"reidkit {__import__('reidkit').__version__}"
    )
    parser.add_argument(
        "--threads",
        dest="global_threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch compute (before COMMAND, e.g. 'reidkit --threads 2 eval "
        "...'). Default: OMP_NUM_THREADS if set, else the cores this process may use "
        "(CPU affinity / cgroup quota), never more",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"reidkit.commands.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides given after an option flag (argparse stops filling the
        # positional list at the first flag): append them to the command's overrides
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.global_threads is not None:
        if args.global_threads < 1:
            parser.error(f"--threads must be >= 1, got {args.global_threads}")
        set_threads(args.global_threads)
    else:
        # three snapshots of the load, not one: the choice holds for the whole command
        limit = thread_limit(samples=3, interval=0.05)
        if torch.get_num_threads() > limit:  # e.g. a container given fewer cores than the host
            torch.set_num_threads(limit)
    debug = getattr(args, "debug", False)
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which exited: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UserError, ValueError, OSError) as exc:
        # User errors (bad config, missing or unreadable files, a full disk, a missing
        # optional package) are one line, without a traceback; --debug shows it.
        if debug:
            raise
        print(f"reidkit {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"reidkit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each (``reidkit: warning: ...``), without the source line."""
    text = " ".join(str(message).split())
    print(f"reidkit: warning: {text}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
