"""Argument parsing and config loading shared by the CLI subcommands.

Every config-driven subcommand (``train``, ``eval``, ``report``, ``flops``, ``export``,
``demo``) takes a YAML config, ``key=value`` overrides and often a ``--weights`` file;
the helpers here declare those arguments the same way everywhere and turn the parsed
namespace into a :class:`reidkit.config.Config`.

The module name starts with an underscore and has no ``add_parser``, so
:func:`reidkit.cli.build_parser` does not register it as a subcommand.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reidkit.config import Config

__all__ = [
    "add_command_parser",
    "add_config_arguments",
    "add_debug_argument",
    "add_num_classes_argument",
    "load_config_from_args",
    "resolve_weights_file",
]

WEIGHTS_HELP = "checkpoint (.pt) or weights (.pth/.safetensors)"


def add_command_parser(
    sub: argparse._SubParsersAction, name: str, *, help: str, doc: str | None
) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` shows the module docstring ``doc`` verbatim."""
    return sub.add_parser(
        name,
        help=help,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_config_arguments(
    parser: argparse.ArgumentParser,
    weights: bool = False,
    *,
    config_help: str = "YAML config of the model and dataset",
    overrides_help: str = "config overrides",
    weights_help: str = WEIGHTS_HELP,
) -> None:
    """Add ``-c/--config`` (required), the positional ``key=value`` overrides and, with
    ``weights=True``, a required ``--weights`` option.

    The parsed namespace has ``config`` (str), ``overrides`` (list of str) and, with
    ``weights``, ``weights`` (str); :func:`load_config_from_args` reads the first two.
    """
    parser.add_argument("-c", "--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    if weights:
        parser.add_argument("--weights", required=True, help=weights_help)


def add_num_classes_argument(
    parser: argparse.ArgumentParser,
    default: int | None = None,
    help: str = "identities of the weights' classifier",
) -> None:
    """Add ``--num-classes N`` (the classifier size the weights were trained with)."""
    parser.add_argument("--num-classes", type=int, default=default, help=help)


def add_debug_argument(
    parser: argparse.ArgumentParser, help: str = "show tracebacks for user errors"
) -> None:
    """Add ``--debug``: :func:`reidkit.cli.main` then re-raises user errors with a traceback."""
    parser.add_argument("--debug", action="store_true", help=help)


def load_config_from_args(
    args: argparse.Namespace,
    extra_overrides: Iterable[str] = (),
    config: str | Path | None = None,
) -> Config:
    """``load_config(args.config, [*extra_overrides, *args.overrides])``.

    ``extra_overrides`` come first, so the user's own ``key=value`` overrides win over
    them; ``config`` replaces ``args.config`` (e.g. a command's default config file).
    """
    from reidkit.config import load_config

    path = args.config if config is None else config
    return load_config(path, [*extra_overrides, *args.overrides])


def resolve_weights_file(weights: str | Path, option: str = "--weights") -> Path:
    """``weights`` as a :class:`~pathlib.Path`, or ``FileNotFoundError`` naming ``option``
    when it is not a file (with a hint when it is a folder, e.g. a run folder)."""
    path = Path(weights)
    if not path.is_file():
        hint = " (a folder; pass e.g. checkpoints/best.pt inside it)" if path.is_dir() else ""
        raise FileNotFoundError(f"{option}: file not found: {path}{hint}")
    return path
