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
import os
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
    "check_output",
    "note_skipped_images",
    "load_config_from_args",
    "resolve_weights_file",
    "weights_from_args",
]

WEIGHTS_HELP = (
    "checkpoint (.pt), weights (.pth/.safetensors) or run folder (its best.pt, else last.pt); "
    "default: the run folder given as -c"
)


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
    ``weights``, ``weights`` (str or None); :func:`load_config_from_args` reads the first
    two and :func:`weights_from_args` the weights (a run folder given as ``-c`` provides
    them when ``--weights`` is left out).
    """
    parser.add_argument("-c", "--config", required=True, help=config_help + " or run folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    if weights:
        parser.add_argument("--weights", default=None, help=weights_help)


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
    """The weights file ``weights`` names: a file as it is, a run folder's
    ``checkpoints/best.pt`` (else ``last.pt``); ``FileNotFoundError`` naming ``option``."""
    from reidkit.engine.checkpoint import resolve_weights

    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(
            f"{option}: file not found: {path} (expected a checkpoint .pt, a .pth / "
            ".safetensors weights file or a run folder)"
        )
    try:
        return resolve_weights(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{option}: {exc}") from None


def weights_from_args(args: argparse.Namespace, option: str = "--weights") -> Path:
    """The weights of ``--weights`` (file or run folder) or, without it, of the run folder
    given as ``-c``; prints which checkpoint is used (``weights: PATH (...)``)."""
    given = getattr(args, "weights", None)
    if given is None:
        config = Path(args.config)
        if not config.is_dir():
            raise ValueError(
                f"{option} is required when -c is a YAML file ({config}); pass {option} "
                "CHECKPOINT or a run folder, or give the run folder as -c"
            )
        given = config
    path = resolve_weights_file(given, option)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"weights: {path}{_weights_note(Path(given), path)}", flush=True)
    return path


def _weights_note(given: Path, path: Path) -> str:
    if not given.is_dir():
        return ""
    if path.name == "best.pt":
        return f" (best mAP checkpoint of {given})"
    return f" (last checkpoint of {given}: it has no best.pt yet)"


def check_output(out: str | Path, option: str, *inputs: str | Path | None) -> None:
    """Refuse an output path that is one of the command's input files (outputs never
    overwrite inputs): ``ValueError`` naming ``option``."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        path = Path(item).expanduser().resolve()
        if path.is_dir() and (path / "config.yaml").is_file():
            path = path / "config.yaml"
        if target == path:
            raise ValueError(
                f"{option} {out} is an input of this command ({item}); choose another "
                "output path (outputs never overwrite inputs)"
            )


def note_skipped_images(dataset) -> None:
    """Say how many unreadable images ``data.skip_corrupt`` left out of ``dataset``."""
    skipped = getattr(dataset, "skipped", None) or []
    if skipped:
        print(
            f"data.skip_corrupt: {len(skipped)} unreadable image(s) left out of "
            f"{dataset.name} (first: {skipped[0].path}: {skipped[0].reason})"
        )


def read_images(data_cfg, paths: Iterable[str]):
    """Image files as the test loader gives them: ``(N, 3, H, W)`` float, normalised.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable file, named (``--images``).
    """
    import torch
    from PIL import Image

    from reidkit.data.transforms import build_test_transforms

    tf = build_test_transforms(data_cfg)
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"--images: file not found: {path}")
        try:
            with Image.open(path) as img:
                out.append(tf(img.convert("RGB")).float())
        except OSError as exc:
            raise ValueError(f"--images: {path}: not a readable image ({exc})") from None
    return torch.stack(out)


def spread_records(data_cfg, split: str, num: int) -> tuple[list, object]:
    """``num`` records spread evenly over a split (``--split``/``--num``), and the dataset."""
    import numpy as np

    from reidkit.data.datasets import dataset_from_config

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    dataset = dataset_from_config(data_cfg)
    require_image_files(dataset, f"--split {split}")
    records = getattr(dataset, split)
    if not records:
        raise ValueError(f"--split {split}: the dataset's {split} split is empty")
    idx = np.unique(np.linspace(0, len(records) - 1, min(num, len(records))).round().astype(int))
    return [records[i] for i in idx], dataset


def add_run_control_arguments(
    p: argparse.ArgumentParser, resume_help: str, overwrite_help: str
) -> None:
    """``--resume``, ``--overwrite``, ``--stop-after N`` and ``--no-progress`` of the
    training commands."""
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this call (continue later with --resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def require_image_files(dataset, what: str) -> None:
    """Refuse, early, a set whose images are rendered on the fly (``synth_render``): the
    commands that read image files by path (report, viz, mismatches) need them on disk."""
    if any(hasattr(getattr(dataset, s, None), "load_image") for s in ("train", "query", "gallery")):
        raise ValueError(
            f"{what}: data.dataset={getattr(dataset, 'name', 'synth_render')!r} renders its "
            "images on the fly and has no image files; write the set to disk with "
            "`reidkit synth --preset NAME --out DIR` and use data.dataset=synth"
        )
