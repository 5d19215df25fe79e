"""``reidkit eval``: evaluate trained weights on a config's dataset.

    reidkit eval -c CONFIG --weights runs/x/checkpoints/best.pt [--rerank] [--save-features DIR]
                 [--occlude 0.5]
    reidkit eval -c configs/video/mars.yaml --weights W --mode all          # video datasets
    reidkit eval -c configs/video/ilidsvid.yaml --weights 'runs/ilids/split{split}/checkpoints/best.pt' --all-splits

Prints the CMC / mAP / mINP table. ``--save-features DIR`` writes ``DIR/query.safetensors``
and ``DIR/gallery.safetensors`` (+ ``.json`` sidecars with the image paths), loadable with
``reidkit.engine.FeatureSet.load``. Works under torchrun too (extraction is sharded).

Video (tracklet) datasets: ``--mode v2v|i2v|v2i|i2i|all`` (default ``test.video_mode``: the
method's own mode; ``all`` prints the four-mode table); ``--save-features`` then writes one
pair of files per mode (``DIR/<mode>_query.safetensors``...). Datasets with 10 train/test
splits (iLIDS-VID, PRID2011): ``--all-splits`` (or ``--splits 0 3``) evaluates every split
with its own weights (``{split}`` in ``--weights`` is replaced by the split number) and
prints the mean and standard deviation over the splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run"]


def _load(args: argparse.Namespace):
    cfg = _common.load_config_from_args(args)
    if args.mode:  # the flag wins over the config and its overrides
        cfg.test.video_mode = args.mode
    return cfg


def _check_video_only(args: argparse.Namespace, dataset) -> None:
    from reidkit.engine.video_eval import is_video_dataset

    if args.mode and not is_video_dataset(dataset):
        raise ValueError(
            f"--mode {args.mode}: evaluation modes are for video (tracklet) datasets; "
            f"'{dataset.name}' is an image dataset"
        )


def _print_result(result, dataset, args: argparse.Namespace) -> None:
    for note in result.notes:
        print(note)
    tags = [
        "re-ranked" if result.rerank else "",
        f"occluded p={args.occlude:g}" if args.occlude else "",
    ]
    title = " ".join([result.label(), *[t for t in tags if t]])
    print(result.table(title=title))


def _save_features(result, out: Path) -> None:
    modes = getattr(result, "modes", None)
    if modes:
        for mode, r in modes.items():
            q = r.query.save(out / f"{mode}_query")
            g = r.gallery.save(out / f"{mode}_gallery")
            print(f"{mode} features: {q} ({len(r.query)}), {g} ({len(r.gallery)})")
        return
    q = result.query.save(out / "query")
    g = result.gallery.save(out / "gallery")
    print(f"features: {q} ({len(result.query)}), {g} ({len(result.gallery)})")


def _run_splits(args: argparse.Namespace) -> int:
    """Every requested split with its own weights; mean and spread over splits."""
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import evaluate_model, load_model
    from reidkit.engine.distributed import resolve_device
    from reidkit.engine.video_eval import (
        format_split_summary,
        is_video_dataset,
        resolve_video_modes,
        summarize_splits,
    )

    if args.occlude or args.save_features:
        raise ValueError("--all-splits / --splits: --occlude and --save-features are per split")
    base = _load(args)
    device = resolve_device(base.device)
    first = dataset_from_config(base.data)
    if not is_video_dataset(first) or getattr(first, "num_splits", 1) < 2:
        raise ValueError(
            f"--all-splits / --splits: '{first.name}' has a single train/test split; the "
            "10-split datasets are ilidsvid and prid2011"
        )
    splits = list(range(first.num_splits)) if args.splits is None else list(args.splits)
    if "{split}" not in args.weights and len(splits) > 1:
        raise ValueError(
            "--weights must contain '{split}' (replaced by the split number), e.g. "
            "'runs/ilidsvid/split{split}/checkpoints/best.pt': every split has its own model"
        )
    per_split, modes = [], None
    for s in splits:
        cfg = base.model_copy(deep=True)
        cfg.data.video_split = s
        weights = _common.resolve_weights_file(args.weights.replace("{split}", str(s)))
        dataset = first if s == first.split_id else dataset_from_config(cfg.data)
        model = load_model(cfg, weights, num_classes=args.num_classes, device=device)
        result = evaluate_model(cfg, model, dataset, device, rerank=args.rerank or None)
        modes = modes or resolve_video_modes(cfg.test.video_mode, model)
        per_split.append(result.metrics)
        row = ", ".join(
            f"{m.upper()} mAP {100 * result.metrics[f'{m}_mAP']:.1f} "
            f"R1 {100 * result.metrics[f'{m}_rank1']:.1f}"
            for m in modes
        )
        print(f"split {s}: {row}")
    summary = summarize_splits(per_split)
    print(format_split_summary(summary, modes or [], title=first.name))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"splits": splits, "per_split": per_split, "summary": summary}, indent=2)
        )
    return 0


def run(args: argparse.Namespace) -> int:
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import distributed as dist_utils
    from reidkit.engine import evaluate_model, load_model

    if not 0.0 <= args.occlude <= 1.0:
        raise ValueError(f"--occlude must be a probability in [0, 1], got {args.occlude}")
    if args.all_splits or args.splits is not None:
        return _run_splits(args)
    cfg = _load(args)
    weights = _common.weights_from_args(args)
    if args.json:
        _common.check_output(args.json, "--json", weights, args.config)
    info, device = dist_utils.init_from_env(cfg.device)
    ok = False
    try:
        # the weights first: a wrong file is reported before the dataset is read
        model = load_model(cfg, weights, num_classes=args.num_classes, device=device)
        dataset = dataset_from_config(cfg.data)
        _check_video_only(args, dataset)
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
        _print_result(result, dataset, args)
        if args.save_features:
            _save_features(result, Path(args.save_features))
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
    p.add_argument(
        "--mode",
        choices=["v2v", "i2v", "v2i", "i2i", "all", "auto"],
        default=None,
        help="video datasets: query -> gallery mode (all: the four-mode table); default "
        "test.video_mode",
    )
    p.add_argument(
        "--all-splits",
        action="store_true",
        help="10-split datasets: evaluate every split ('{split}' in --weights) and report "
        "mean and spread",
    )
    p.add_argument(
        "--splits", type=int, nargs="+", default=None, metavar="S", help="these splits only"
    )
    _common.add_num_classes_argument(p)
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
