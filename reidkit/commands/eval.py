"""``reidkit eval``: evaluate trained weights on a config's dataset.

    reidkit eval -c CONFIG --weights runs/x/checkpoints/best.pt [--rerank] [--save-features DIR]
                 [--occlude 0.5]

Prints the CMC / mAP / mINP table. ``--save-features DIR`` writes ``DIR/query.safetensors``
and ``DIR/gallery.safetensors`` (+ ``.json`` sidecars with the image paths), loadable with
``reidkit.engine.FeatureSet.load``. Works under torchrun too (extraction is sharded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import distributed as dist_utils
    from reidkit.engine import evaluate_model, load_model

    if not 0.0 <= args.occlude <= 1.0:
        raise ValueError(f"--occlude must be a probability in [0, 1], got {args.occlude}")
    cfg = _common.load_config_from_args(args)
    weights = _common.weights_from_args(args)
    if args.json:
        _common.check_output(args.json, "--json", weights, args.config)
    info, device = dist_utils.init_from_env(cfg.device)
    ok = False
    try:
        # the weights first: a wrong file is reported before the dataset is read
        model = load_model(cfg, weights, num_classes=args.num_classes, device=device)
        dataset = dataset_from_config(cfg.data)
        if info.is_main:
            _common.note_skipped_images(dataset)
        if cfg.channels_last:
            model.to(memory_format=__import__("torch").channels_last)
        result = evaluate_model(
            cfg,
            model,
            dataset,
            device,
            rerank=args.rerank or None,
            progress=info.is_main,
            occlusion_p=args.occlude,
        )
        ok = True
        if result is None:  # rank > 0 under torchrun
            return 0
        for note in result.notes:
            print(note)
        occluded = f" occluded p={args.occlude:g}" if args.occlude else ""
        print(result.table(title=result.label() + occluded))
        if args.save_features:
            out = Path(args.save_features)
            q = result.query.save(out / "query")
            g = result.gallery.save(out / "gallery")
            print(f"features: {q} ({len(result.query)}), {g} ({len(result.gallery)})")
        if args.json:
            Path(args.json).write_text(json.dumps(result.metrics, indent=2))
    finally:
        dist_utils.cleanup(info, sync=ok)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "eval", help="evaluate weights (CMC / mAP / mINP)", doc=__doc__
    )
    _common.add_config_arguments(p, weights=True)
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (test.rerank_*)")
    p.add_argument("--save-features", metavar="DIR", help="write query/gallery features here")
    p.add_argument(
        "--occlude",
        type=float,
        default=0.0,
        metavar="P",
        help="occlusion test: erase a random box of each query and gallery image with "
        "probability P (seeded random erasing, as MGRe's Table 6); default 0",
    )
    _common.add_num_classes_argument(p)
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
