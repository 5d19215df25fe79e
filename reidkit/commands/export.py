"""``reidkit export``: export trained weights' test feature to ONNX, and check it.

    reidkit export -c CONFIG --weights runs/x/checkpoints/best.pt --out model.onnx
                   [--opset 17] [--dynamic-batch] [key=value ...]

The graph maps ``images`` (B, 3, H, W) float32 (RGB resized to data.height x data.width,
then (x/255 - mean) / std) to ``features`` (B, D) float32: the config's test.feature,
flip-averaged when test.flip, L2-normalised when test.normalize, the same numbers as
``reidkit eval``. The file is checked with onnx.checker, run with onnxruntime on random
batches (1 and 3 with --dynamic-batch) and compared to PyTorch; a relative difference
above --rtol is an error (exit status 1). Needs ``pip install 'reidkit[onnx]'``.
"""

from __future__ import annotations

import argparse
import sys

from reidkit.commands import _common
from reidkit.errors import one_line

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    from reidkit.errors import require_extra

    # before any work: onnx writes the file, onnxruntime checks it
    require_extra("onnx", "reidkit export", modules=("onnx",) if args.no_verify else None)
    import torch

    from reidkit.export import ONNXMismatchError, export_from_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _common.load_config_from_args(args)
    weights = _common.weights_from_args(args)
    _common.check_output(args.out, "--out", weights, args.config)
    try:
        result = export_from_config(
            cfg,
            weights,
            args.out,
            opset=args.opset,
            dynamic_batch=args.dynamic_batch,
            batch_size=args.batch_size,
            exporter=args.exporter,
            verify=not args.no_verify,
            rtol=args.rtol,
            num_classes=args.num_classes,
        )
    except (ONNXMismatchError, ImportError) as exc:
        if args.debug:
            raise
        print(f"reidkit export: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(result.summary())
    if result.opset != args.opset:
        print(
            f"note: opset {args.opset} was requested; the {result.exporter} exporter wrote opset {result.opset}"
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "export", help="export weights to ONNX (checked with onnxruntime)", doc=__doc__
    )
    _common.add_config_arguments(
        p,
        weights=True,
        config_help="YAML config of the model",
    )
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="dynamic batch axis (else fixed --batch-size)"
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="batch of the static graph (default 1)"
    )
    p.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="torch.onnx exporter: dynamo needs onnxscript and writes opset >= 18; auto uses it "
        "when installed and --opset >= 18, else the legacy TorchScript tracer",
    )
    p.add_argument(
        "--rtol", type=float, default=1e-4, help="max relative onnxruntime/torch difference"
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the onnx.checker / onnxruntime check"
    )
    _common.add_num_classes_argument(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
