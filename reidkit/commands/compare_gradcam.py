"""``reidkit compare-gradcam``: Grad-CAM of several trained runs side by side on the same
images (the SCR supplementary's Fig. 3: a plain ResNet-50, an SE-Net and a Residual
Attention Network).

    reidkit compare-gradcam --runs runs/synth/backbones/resnet50 \\
        runs/synth/backbones/se_resnet50 runs/synth/backbones/resattnet56 \\
        --split query --num 6 --out fig3.png [--json fig3.json]
    reidkit compare-gradcam --runs RUN_A RUN_B --images a.jpg b.jpg --out grid.png
    reidkit compare-gradcam -c CONFIG --runs RUN_A RUN_B --split train --target label ...

A run is a folder written by ``reidkit train`` (``config.yaml`` + ``checkpoints/``;
``--checkpoint best`` by default, ``last`` when there is no ``best.pt``). Each model is
explained at ``--layer`` (default: its last stage, the map its head pools; for the
Residual Attention Network the stage's final BN-ReLU) for ``--target``: ``pred`` (each
model's own predicted identity, the default), ``label`` (the image's training identity;
``--split train`` only) or ``K`` (class K of the classifiers; the runs must have been
trained on the same set, so K is the same identity for all). The grid has one row per
image (file name and the class each model explains) and one column per run (``--labels``,
default each run's backbone name). Also printed (and saved with ``--json``): the mean
top-k IoU of the runs' maps (``--overlap-k``, default 20 % of the cells) when they have
the same size.

Images come from ``--images`` (files, resized and normalised as each run's test images)
or from the dataset of ``-c CONFIG`` (default: the first run's config): ``--split
query|gallery|train --num N`` (N images spread evenly over the split). ``key=value``
overrides apply to every run's config (and to ``-c``), e.g. ``data.root=/data``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from reidkit.commands import _common

if TYPE_CHECKING:
    import torch

__all__ = ["add_parser", "run"]


def _topk(text: str) -> float | int:
    """``--overlap-k``: a fraction of the cells (``0.2``) or a count (``3``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a count, got {text!r}") from None
    return int(value) if value >= 1 and value == int(value) else value


def _target_classes(args: argparse.Namespace, records: list):
    """``None`` (predicted), an int, or a ``(B,)`` tensor of training labels."""
    import torch

    if args.target == "pred":
        return None
    if args.target == "label":
        if args.split != "train":
            raise ValueError(
                "--target label needs --split train (query and gallery identities are not "
                "classes of the classifier); use --target pred"
            )
        return torch.tensor([r.pid for r in records], dtype=torch.long)
    try:
        k = int(args.target)
    except ValueError:
        raise ValueError(
            f"--target must be pred, label or a class index, got {args.target!r}"
        ) from None
    if k < 0:
        raise ValueError(f"--target class index must be >= 0, got {k}")
    return k


def overlap_of_nonzero_maps(
    maps: torch.Tensor, empty: torch.Tensor, k: float | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean top-``k`` IoU of every pair of ``N`` map sets ``(N, B, h, w)`` over the images
    where both maps have a positive cell (``empty (N, B)`` bool marks all-zero maps, whose
    top-k cells would be arbitrary ties). Returns ``(N, N)`` means (NaN where no image
    counts) and ``(N, N)`` image counts."""
    from reidkit.viz.overlap import pairwise_mask_iou, topk_masks

    iou = pairwise_mask_iou(topk_masks(maps.float(), k))  # (N, N, B)
    valid = (~empty[:, None] & ~empty[None]).float()  # (N, N, B)
    counts = valid.sum(dim=-1)
    return (iou * valid).sum(dim=-1) / counts, counts.long()


def _cell(value: float, width: int) -> str:
    return f"{'n/a':>{width}}" if value != value else f"{value:>{width}.3f}"


def run(args: argparse.Namespace) -> int:
    import torch

    from reidkit.config import load_config
    from reidkit.engine.distributed import resolve_device
    from reidkit.viz.compare_cam import (
        compare_grad_cam,
        comparison_rows,
        last_stage_layer,
        load_run,
    )
    from reidkit.viz.grid import enlarge_images, save_image_grid, to_uint8_images

    if len(args.runs) < 1:
        raise ValueError("--runs: give at least one run folder")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    if args.layer is not None and len(args.layer) not in (1, len(args.runs)):
        raise ValueError(f"--layer: give one layer or one per run ({len(args.runs)})")
    if bool(args.images) == bool(args.split):
        raise ValueError("give either --images FILE... or --split query|gallery|train")
    if args.max_rows < 1 or args.batch_size < 1:
        raise ValueError("--max-rows and --batch-size must be >= 1")
    first_cfg = None
    if args.config is None:
        cfg_path = Path(args.runs[0]) / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--runs {args.runs[0]}: no config.yaml (not a run folder)")
    else:
        cfg_path = Path(args.config)
    first_cfg = load_config(cfg_path, list(args.overrides))
    device = resolve_device(args.device or "cpu")
    loaded = [load_run(r, args.checkpoint, args.overrides, device) for r in args.runs]
    labels = args.labels or [lr.cfg.model.backbone for lr in loaded]
    layers = (args.layer * len(loaded)) if args.layer and len(args.layer) == 1 else args.layer
    layers = layers or [last_stage_layer(lr.model) for lr in loaded]

    if args.images:
        paths, records = list(args.images), []
    else:
        records, _ = _common.spread_records(first_cfg.data, args.split, args.num)
        paths = [r.path for r in records]
    names = [Path(p).name for p in paths]
    classes = _target_classes(args, records)
    # each run sees the images as it was trained (its own size and normalisation)
    cache: dict[tuple, torch.Tensor] = {}
    batches = []
    for lr in loaded:
        d = lr.cfg.data
        key = (d.height, d.width, tuple(d.mean), tuple(d.std))
        if key not in cache:
            cache[key] = _common.read_images(d, paths)
        batches.append(cache[key])

    maps = [[] for _ in loaded]
    explained = [[] for _ in loaded]
    for s in range(0, len(paths), args.batch_size):
        sl = slice(s, min(s + args.batch_size, len(paths)))
        cls = classes[sl] if isinstance(classes, torch.Tensor) else classes
        cams, used = compare_grad_cam(
            [lr.model for lr in loaded],
            [b[sl].to(device) for b in batches],
            layers,
            cls.to(device) if isinstance(cls, torch.Tensor) else cls,
        )
        for i, (cam, c) in enumerate(zip(cams, used)):
            maps[i].append(cam.maps.cpu())
            explained[i].append(c)
    maps = [torch.cat(m) for m in maps]
    explained = [torch.cat(c) for c in explained]

    shown = slice(0, min(args.max_rows, len(paths)))
    shown_cfg = first_cfg.data
    pixels = to_uint8_images(
        _common.read_images(shown_cfg, paths[shown.start : shown.stop]),
        shown_cfg.mean,
        shown_cfg.std,
    )
    pixels = enlarge_images(pixels, args.min_width)
    rows = comparison_rows(pixels, [m[shown] for m in maps])
    # an all-zero map (no cell with positive evidence for the class after Grad-CAM's ReLU)
    # draws as plain blue, like a map that is low everywhere: mark it so it is not misread
    empty = [m.flatten(1).amax(dim=1) <= 0 for m in maps]
    row_labels = [
        f"{Path(names[b]).stem}\nclass "
        + " / ".join(f"{int(c[b])}{'*' if e[b] else ''}" for c, e in zip(explained, empty))
        for b in range(len(pixels))
    ]
    any_shown_empty = any(bool(e[shown].any()) for e in empty)
    first_col = "image\n(* all-zero map)" if any_shown_empty else "image"
    out = save_image_grid(rows, args.out, row_labels=row_labels, col_labels=[first_col, *labels])
    print(f"Grad-CAM ({args.target} class logit) of {len(loaded)} runs on {len(paths)} images:")
    for label, layer, m, e in zip(labels, layers, maps, empty):
        print(
            f"  {label}: {layer} ({m.shape[-2]}x{m.shape[-1]} map); all-zero maps: "
            f"{int(e.sum())}/{len(e)}"
        )
    if any_shown_empty:
        print("  (* in a row label: that run's map is all zero, drawn plain blue)")
    print(f"wrote {out}")
    report = {
        "runs": [str(lr.folder) for lr in loaded],
        "weights": [str(lr.weights) for lr in loaded],
        "labels": labels,
        "layers": layers,
        "target": args.target,
        "images": names,
        "classes": {lab: c.tolist() for lab, c in zip(labels, explained)},
        "map_size": {lab: list(m.shape[-2:]) for lab, m in zip(labels, maps)},
        "all_zero_maps": {lab: e.nonzero().flatten().tolist() for lab, e in zip(labels, empty)},
    }
    if len(loaded) > 1 and len({tuple(m.shape) for m in maps}) == 1:
        mat, counts = overlap_of_nonzero_maps(torch.stack(maps), torch.stack(empty), args.overlap_k)
        width = max(len(s) for s in labels)
        print(
            f"mean top-{args.overlap_k:g} IoU of the maps over {len(paths)} images (per pair, "
            "images where both maps are non-zero; n/a: none):"
        )
        print(" " * width + "  " + "  ".join(f"{s:>{width}}" for s in labels))
        for s, row in zip(labels, mat.tolist()):
            print(f"{s:>{width}}  " + "  ".join(_cell(v, width) for v in row))
        report["overlap_k"] = args.overlap_k
        report["overlap"] = [[None if v != v else v for v in row] for row in mat.tolist()]
        report["overlap_images"] = counts.tolist()
    elif len(loaded) > 1:
        print("(maps of different sizes: no overlap matrix; pass --layer to compare)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub,
        "compare-gradcam",
        help="Grad-CAM of several trained runs side by side (SCR supplementary Fig. 3)",
        doc=__doc__,
    )
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run folders")
    p.add_argument("-c", "--config", default=None, help="config of the images (default: 1st run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every config")
    p.add_argument("--labels", nargs="+", default=None, help="column labels, one per run")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument(
        "--layer", nargs="+", default=None, help="dotted layer name: one, or one per run"
    )
    p.add_argument(
        "--target", default="pred", help="pred (default), label (--split train) or class K"
    )
    p.add_argument("--images", nargs="+", metavar="FILE", help="image files")
    p.add_argument(
        "--split", choices=["query", "gallery", "train"], help="take images from the dataset"
    )
    p.add_argument("--num", type=int, default=6, help="images taken from --split (default 6)")
    p.add_argument("--out", required=True, help="output picture (.png, .jpg, .webp)")
    p.add_argument("--json", default=None, help="also write classes, layers and overlaps here")
    p.add_argument("--max-rows", type=int, default=16, help="rows drawn (default 16)")
    p.add_argument("--min-width", type=int, default=96, help="enlarge images to this width")
    p.add_argument("--batch-size", type=int, default=32, help="images per Grad-CAM pass")
    p.add_argument(
        "--overlap-k",
        type=_topk,
        default=0.2,
        help="top-k cells for the overlap: a fraction (default 0.2) or a count",
    )
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
