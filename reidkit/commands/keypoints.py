"""``reidkit keypoints``: COCO-17 keypoints for a dataset from your own ONNX pose model.

    reidkit keypoints --onnx hrnet_w32_256x192.onnx --dataset market1501 --root data \\
        --out data/market1501-keypoints.json [--split train] [--batch-size 64] [--flip-test]

The model is a heatmap-style top-down COCO-17 model (HRNet-like): input (N, 3, 256, 192)
RGB normalised with the ImageNet mean/std, output (N, 17, 64, 48) heatmaps. Each crop is
letterboxed into the input (aspect kept, padding 1.25), heatmaps are decoded by argmax with
the quarter-pixel refinement and mapped back to the crop's pixels; a keypoint is visible
(2) when its peak reaches --threshold and it lies inside the crop, else 0.

The output (simple JSON, keyed by the path relative to the dataset folder) is what
``data.keypoints=FILE`` / ``build_dataset(..., keypoints=FILE)`` read; ``--format coco``
writes COCO results (per-keypoint confidences) instead. See docs/keypoints.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from reidkit.commands._common import add_command_parser, add_debug_argument

__all__ = ["add_parser"]

_SPLITS = ("train", "query", "gallery")


def _image_key(path: str, dataset_dir: str) -> str:
    if dataset_dir:
        rel = os.path.relpath(path, dataset_dir)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return os.path.abspath(path).replace(os.sep, "/")


def _run(args: argparse.Namespace) -> int:
    from reidkit.errors import require_extra

    require_extra("onnx", "reidkit keypoints (the ONNX pose model)", modules=("onnxruntime",))
    from reidkit.commands.datasets import _parse_options
    from reidkit.data.datasets import build_dataset
    from reidkit.data.keypoints import write_json_atomic
    from reidkit.data.pose import OnnxPoseModel, estimate_keypoints

    out = Path(args.out)
    model_path = Path(args.onnx)
    if out.exists() and out.resolve() == model_path.resolve():
        raise ValueError(f"--out {out} is the model file; choose another output path")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    model = OnnxPoseModel(
        model_path,
        device=args.device,
        input_size=tuple(args.input_size) if args.input_size else None,
        threads=args.threads,
    )
    options = _parse_options(args.option)
    options.setdefault("keypoints", None)  # never read keypoints while making them
    ds = build_dataset(args.dataset, args.root, **options)
    dataset_dir = getattr(ds, "dataset_dir", "") or ""
    splits = args.split or list(_SPLITS)
    paths: list[str] = []
    per_split: dict[str, int] = {}
    seen: set[str] = set()
    for split in splits:
        records = getattr(ds, split)
        per_split[split] = len(records)
        for r in records:
            if r.path not in seen:
                seen.add(r.path)
                paths.append(r.path)
    keys = [_image_key(p, dataset_dir) for p in paths]
    if len(set(keys)) != len(keys):  # cannot happen for paths under one folder
        keys = [os.path.abspath(p).replace(os.sep, "/") for p in paths]
    print(
        f"{model_path.name}: input {model.input_size[0]}x{model.input_size[1]}, providers "
        f"{', '.join(model.providers)}; {len(paths)} images of {ds.name} "
        f"({', '.join(f'{s} {n}' for s, n in per_split.items())})"
    )
    start = time.perf_counter()
    coords, scores, sizes = estimate_keypoints(
        model,
        paths,
        batch_size=args.batch_size,
        padding=args.padding,
        flip_test=args.flip_test,
        workers=args.workers,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    x, y = coords[..., 0], coords[..., 1]
    inside = (x >= 0) & (x <= sizes[:, None, 0]) & (y >= 0) & (y <= sizes[:, None, 1])
    visible = (scores >= args.threshold) & inside

    if args.format == "json":
        payload: object = {
            key: [
                [round(float(x[i, k]), 2), round(float(y[i, k]), 2), 2 if visible[i, k] else 0]
                for k in range(17)
            ]
            for i, key in enumerate(keys)
        }
    else:
        annotations = []
        for i in range(len(keys)):
            flat: list[float] = []
            for k in range(17):
                flat += [round(float(x[i, k]), 2), round(float(y[i, k]), 2)]
                flat.append(round(float(scores[i, k]) if inside[i, k] else 0.0, 4))
            confident = scores[i][visible[i]]
            score = float(confident.mean()) if confident.size else float(scores[i].mean())
            annotations.append(
                {"image_id": i, "category_id": 1, "keypoints": flat, "score": round(score, 4)}
            )
        payload = {
            "images": [{"id": i, "file_name": key} for i, key in enumerate(keys)],
            "annotations": annotations,
        }
    write_json_atomic(out, payload, overwrite=args.overwrite)
    rate = len(paths) / elapsed if elapsed > 0 else float("inf")
    print(
        f"wrote {out} ({args.format}): {len(paths)} images, {visible.mean():.1%} of keypoints "
        f"visible (score >= {args.threshold:g}, inside the crop); {elapsed:.1f}s "
        f"({rate:.1f} img/s)"
    )
    print(f"use it with: data.keypoints={out}  (or build_dataset(..., keypoints='{out}'))")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``reidkit keypoints``."""
    parser = add_command_parser(
        sub,
        "keypoints",
        help="COCO-17 keypoints for a dataset from an ONNX pose model",
        doc=__doc__,
    )
    parser.add_argument("--onnx", required=True, help="heatmap pose model (.onnx), COCO-17")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. market1501")
    parser.add_argument("--root", default="data", help="data root holding the dataset folder")
    parser.add_argument("--out", required=True, help="output keypoint file (.json)")
    parser.add_argument(
        "--split", nargs="+", choices=_SPLITS, help="splits to process (default: all three)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument(
        "--threshold", type=float, default=0.2, help="peak score at which a keypoint is visible"
    )
    parser.add_argument(
        "--padding", type=float, default=1.25, help="box enlargement around the crop (HRNet 1.25)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="model input size when the model does not fix it (default 256 192)",
    )
    parser.add_argument("--flip-test", action="store_true", help="average with mirrored input")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: default)")
    parser.add_argument("--workers", type=int, default=4, help="image loading threads")
    parser.add_argument(
        "--format",
        choices=("json", "coco"),
        default="json",
        help="json: file -> 17 x [x, y, v]; coco: COCO results with per-keypoint scores",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset option, repeatable (e.g. variant=detected)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_argument(parser)
    parser.set_defaults(func=_run)
