"""``reidkit pretrain``: train a backbone on synthetic persons and export it.

    reidkit pretrain --backbone resnet50 [--preset market|large] [--epochs N]
        --out weights.safetensors [key=value ...] [--resume] [--init imagenet.pth]
    torchrun --nproc_per_node 4 -m reidkit.cli pretrain ...               # DDP

Trains BoT (ID + triplet, strong augmentation; ``configs/pretrain/synth.yaml``) on the
synthetic set rendered on the fly (no disk), then writes the backbone alone in the key
layout of the real checkpoints (torchvision keys for ResNets), atomically, with a JSON card
beside it (``weights.json``: backbone, preset, seeds, epochs, images seen, input size,
synthetic validation metrics, reidkit version). Use it with ``model.pretrained=
weights.safetensors`` in any config. ``--init imagenet.pth`` starts from ImageNet weights
(ImageNet -> synthetic -> target). The run folder (checkpoints, log) is ``--run-dir``
(default: next to --out, ``<stem>.run``). See docs/pretrain.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run"]


def _epochs_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs like 1,3,10; got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from reidkit.commands.demo import find_config
    from reidkit.engine import NonFiniteLossError
    from reidkit.engine.pretrain import card_path, pretrain

    out = Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(f"{out.stem}.run")
    extra = [f"output_dir={run_dir}"]
    if args.backbone:
        extra.append(f"model.backbone={args.backbone}")
    if args.preset:
        extra.append(f"data.render.preset={args.preset}")
    if args.epochs is not None:
        extra.append(f"solver.max_epochs={args.epochs}")
    if args.init:
        init = Path(args.init)
        if not init.is_file():
            raise FileNotFoundError(f"--init: weights file not found: {init}")
        extra.append(f"model.pretrained={init}")
    config = Path(args.config) if args.config else find_config("pretrain/synth.yaml")
    cfg = _common.load_config_from_args(args, extra, config=config)
    try:
        card = pretrain(
            cfg,
            out,
            export_epochs=args.export_epochs or (),
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after_epochs=args.stop_after,
            progress=not args.no_progress,
        )
    except NonFiniteLossError as exc:
        print(f"reidkit pretrain: stopped: {exc}", file=sys.stderr)
        return 3
    if card is not None:
        val = card.get("validation") or {}
        score = (
            f"; synthetic validation mAP {100 * val['mAP']:.1f}, rank-1 {100 * val['rank1']:.1f}"
            if "mAP" in val
            else ""
        )
        print(
            f"wrote {out} ({card['backbone']}, {card['epochs']} epochs, "
            f"{card['images_seen']:,} images seen{score}) and {card_path(out)}\n"
            f"use it with: model.pretrained={out}"
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from reidkit.data.synth.knobs import RENDER_PRESETS

    p = _common.add_command_parser(
        sub, "pretrain", help="pretrain a backbone on synthetic persons", doc=__doc__
    )
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help="training config (default configs/pretrain/synth.yaml)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--backbone", default=None, help="model.backbone (default resnet50)")
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(RENDER_PRESETS),
        help="data.render.preset: the synthetic set (default market)",
    )
    p.add_argument("--epochs", type=int, default=None, help="solver.max_epochs (default 10)")
    p.add_argument("--out", required=True, help="the backbone file to write (.safetensors)")
    p.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="start from these weights (e.g. ImageNet .pth/.safetensors): model.pretrained",
    )
    p.add_argument(
        "--run-dir", default=None, help="run folder (default: <out stem>.run next to --out)"
    )
    p.add_argument(
        "--export-epochs",
        type=_epochs_list,
        default=None,
        metavar="E1,E2",
        help="also write the backbone after these epochs (<stem>.e003.safetensors)",
    )
    _common.add_run_control_arguments(
        p,
        resume_help="continue the run in --run-dir",
        overwrite_help="start over (replaces --out and the run)",
    )
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
