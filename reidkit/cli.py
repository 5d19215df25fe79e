"""The ``reidkit`` command line: each subcommand lives in ``reidkit/commands/<name>.py``
and exposes ``add_parser(subparsers)`` (which sets ``func`` via ``set_defaults``)."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import reidkit.commands as commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reidkit", description="Person re-identification toolkit")
    parser.add_argument(
        "--version", action="version", version=f"reidkit {__import__('reidkit').__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"reidkit.commands.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that wait for work sleep instead of spinning: on a shared or busy CPU a
    # spinning team of 2 threads was measured 5x slower per training step than 1 thread
    # (docs/evaluation.md); sleeping costs little when the machine is idle. Must be set
    # before torch is imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # User errors (bad config, missing files) are reported without a traceback.
        if getattr(args, "debug", False):
            raise
        print(f"reidkit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
