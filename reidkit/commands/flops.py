"""``reidkit flops``: parameters, GFLOPs and latency of a config's model.

    reidkit flops -c configs/bot/market1501.yaml [key=value ...] [--device cuda] [--batch-sizes 1 32]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one eval-mode forward
of a single ``3 x data.height x data.width`` image (multiply-adds count as 2 FLOPs; only
convolutions and matrix products, attention included, are counted). Latency is the median
over ``--runs`` timed forwards after ``--warmup`` untimed ones; the fastest run is reported
too (on a machine shared with other work it is the better estimate of the model's own
cost).

Video methods (``clips`` in the method's ``requires``): the test forward of one clip of
``--frames`` frames (default ``data.seq_len``; ``encode`` of a clip batch, through the
method's video network) is counted, reported per clip and per frame, and latency batches
are clips; the image forward (one frame: the I2V query, through the method's image
network for TKP) is counted too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from reidkit.commands import _common

__all__ = [
    "add_parser",
    "run",
    "count_flops",
    "is_video_method",
    "measure_latency",
    "time_forwards",
]


def is_video_method(model) -> bool:
    """True for methods trained on clips (``"clips"`` in ``requires``)."""
    return "clips" in set(getattr(model, "requires", ()))


def _test_forward(model, x):
    """The test-time computation: ``encode`` for reidkit methods (a clip batch for a
    ``(B, T, 3, H, W)`` input), ``forward`` otherwise."""
    import torch

    if hasattr(model, "encode"):
        if x.dim() == 5:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            return model.encode({"clips": x, "clip_mask": mask}, "gallery")
        return model.encode({"images": x}, "query")
    return model(x)


def count_flops(model, image_shape: tuple[int, ...], device) -> int:
    """FLOPs of one eval-mode forward of a single image ``(3, H, W)`` or, for a
    ``(T, 3, H, W)`` shape, of a single clip of ``T`` frames."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *image_shape, device=device)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _test_forward(model, x)
    return int(counter.get_total_flops())


def measure_latency(
    model, image_shape, batch_size: int, device, warmup: int = 2, runs: int = 5, amp: str = "off"
) -> float:
    """Median seconds per forward of a ``batch_size`` batch."""
    return statistics.median(
        time_forwards(model, image_shape, batch_size, device, warmup, runs, amp)
    )


def time_forwards(
    model, image_shape, batch_size: int, device, warmup: int = 2, runs: int = 5, amp: str = "off"
) -> list[float]:
    """Seconds of each of ``runs`` timed forwards of a ``batch_size`` batch (after
    ``warmup`` untimed ones)."""
    import torch

    from reidkit.engine.extract import autocast_context

    x = torch.randn(batch_size, *image_shape, device=device)
    model.eval()
    times = []
    with torch.no_grad(), autocast_context(torch.device(device), amp):
        for i in range(warmup + runs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            _test_forward(model, x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return times


def run(args: argparse.Namespace) -> int:
    import torch

    from reidkit.engine.distributed import resolve_device
    from reidkit.methods import build_method

    cfg = _common.load_config_from_args(args)
    device = resolve_device(args.device or cfg.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_method(cfg, args.num_classes).to(device).eval()
    image_shape = (3, cfg.data.height, cfg.data.width)
    video = is_video_method(model)
    frames = args.frames or cfg.data.seq_len
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    shape = (frames, *image_shape) if video else image_shape
    unit = "clip" if video else "image"
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = count_flops(model, shape, device)
    image_flops = count_flops(model, image_shape, device) if video else flops
    latency = {}
    for bs in args.batch_sizes:
        times = time_forwards(model, shape, bs, device, args.warmup, args.runs, cfg.amp)
        sec, fastest = statistics.median(times), min(times)
        latency[bs] = {
            "ms_per_batch": 1000 * sec,
            f"ms_per_{unit}": 1000 * sec / bs,
            f"ms_per_{unit}_min": 1000 * fastest / bs,
        }
    size = "x".join(map(str, shape))
    print(f"model: {cfg.model.name} ({cfg.model.backbone}), input {size}, device {device}")
    print(f"parameters: {n_params / 1e6:.3f} M ({n_train / 1e6:.3f} M trainable)")
    if video:
        print(
            f"GFLOPs per clip of {frames} frames: {flops / 1e9:.3f} "
            f"({flops / frames / 1e9:.3f} per frame; = {flops / 2e9:.3f} G multiply-adds)"
        )
        print(f"GFLOPs per image (the I2V query): {image_flops / 1e9:.3f}")
    else:
        print(f"GFLOPs per image: {flops / 1e9:.3f} (= {flops / 2e9:.3f} G multiply-adds)")
    for bs, lat in latency.items():
        print(
            f"latency batch {bs:>3}: {lat[f'ms_per_{unit}']:.2f} ms/{unit} "
            f"({lat['ms_per_batch']:.1f} ms/batch; fastest run "
            f"{lat[f'ms_per_{unit}_min']:.2f} ms/{unit})"
        )
    if args.json:
        info = {
            "model": cfg.model.name,
            "backbone": cfg.model.backbone,
            "input": list(shape),
            "device": str(device),
            "parameters": n_params,
            "trainable_parameters": n_train,
            "flops": flops,
            "gflops": flops / 1e9,
            "latency": {str(k): v for k, v in latency.items()},
        }
        if video:
            info.update(frames=frames, flops_per_frame=flops / frames, image_flops=image_flops)
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "flops", help="parameters, GFLOPs and latency of a model", doc=__doc__
    )
    _common.add_config_arguments(p, config_help="YAML config of the model")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: the config's device)"
    )
    _common.add_num_classes_argument(
        p, default=751, help="classifier size (not in the eval forward)"
    )
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 32], help="latency batch sizes"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards")
    p.add_argument("--runs", type=int, default=5, help="timed forwards (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--frames", type=int, default=None, help="video methods: frames per clip (data.seq_len)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
