"""Training-loader throughput (images/s): per-sample transforms vs batched on CPU / CUDA.

Writes a temporary folder of Market-1501-sized JPEGs (128x64), then, for each output size
(``--sizes``, default 256x128 and 384x128, the BoT training pipeline: resize, flip,
pad 10 + crop, normalise, random erasing; ``--color-jitter`` adds colour jitter):

1. **decoding** only: Pillow vs simplejpeg (when installed), one process;
2. **transforms** only (images decoded beforehand, one process, torch threads
   ``--threads``): a naive torchvision-style pipeline (PIL ops, ``random``), reidkit's
   per-sample pipeline (``Compose.apply`` with per-sample generators), and the batched
   pipeline (per-sample draws + :class:`BatchTransform` on the batch) on the CPU and, when
   present, on CUDA (host-to-device copy of the uint8 batch included, synchronised);
3. the whole **training loader** (decode + transforms + collate, ``--num-workers``): the
   per-sample loader against ``device_transforms=True`` (workers decode; ``prepare``
   runs the batch on the CPU or CUDA, counted in the time).

Timings alternate between the variants (fair under a varying machine load) and report
the median of ``--rounds``. ``--json PATH`` writes the figures.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_loader.py --num-images 512 --num-workers 0 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from reidkit.config import Config
from reidkit.data import decode
from reidkit.data.batch_transforms import BatchTransform
from reidkit.data.loader import build_train_loader, worker_init_fn
from reidkit.data.records import ImageRecord
from reidkit.data.samplers import PKSampler
from reidkit.data.transforms import build_train_transforms
from reidkit.threads import usable_cores


class NaiveTrainTransform:
    """torchvision-style Resize, Flip, Pad, RandomCrop, ToTensor, Normalize, RandomErasing."""

    def __init__(self, cfg) -> None:
        self.h, self.w, self.pad = cfg.height, cfg.width, cfg.pad
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)
        self.fill = cfg.mean
        self.cfg = cfg

    def __call__(self, img: Image.Image) -> torch.Tensor:
        c = self.cfg
        img = img.resize((self.w, self.h), Image.BILINEAR)
        if random.random() < c.hflip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageOps.expand(img, border=self.pad, fill=0)
        i = random.randint(0, img.height - self.h)
        j = random.randint(0, img.width - self.w)
        img = img.crop((j, i, j + self.w, i + self.h))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        x = (x - self.mean) / self.std
        if random.random() < c.random_erasing_p:
            for _ in range(100):
                area = x.shape[1] * x.shape[2]
                target = random.uniform(c.random_erasing_sl, c.random_erasing_sh) * area
                aspect = random.uniform(c.random_erasing_r1, 1 / c.random_erasing_r1)
                eh = int(round(math.sqrt(target * aspect)))
                ew = int(round(math.sqrt(target / aspect)))
                if ew < x.shape[2] and eh < x.shape[1]:
                    x1 = random.randint(0, x.shape[1] - eh)
                    y1 = random.randint(0, x.shape[2] - ew)
                    for ch in range(3):
                        x[ch, x1 : x1 + eh, y1 : y1 + ew] = self.fill[ch]
                    break
        return x


class NaiveDataset(Dataset):
    def __init__(self, records, transform) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        r = self.records[index]
        img = Image.open(r.path).convert("RGB")
        return self.transform(img), r.pid, r.camid, r.path, index


def naive_collate(items):
    imgs, pids, camids, paths, index = zip(*items)
    return {
        "images": torch.stack(imgs),
        "pids": torch.tensor(pids),
        "camids": torch.tensor(camids),
        "paths": list(paths),
        "index": torch.tensor(index),
    }


def write_images(folder: Path, n: int, num_ids: int) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
    records = []
    for k in range(n):
        # smooth-ish content (upsampled noise + per-image tint) so JPEG sizes are realistic
        arr = np.asarray(Image.fromarray(base).resize((64, 128), Image.BILINEAR), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-40, 40, 3) + rng.integers(-8, 8, arr.shape), 0, 255)
        path = folder / f"{k % num_ids:04d}_c{k % 6 + 1}s1_{k:06d}_00.jpg"
        Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
        records.append(ImageRecord(str(path), k % num_ids, k % 6))
    return records


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Alternate the measurements (fair under a varying machine load); medians."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            runs[k].append(fn(r))
    return {k: statistics.median(v) for k, v in runs.items()}


# ------------------------------------------------------------------------------ decoding
def bench_decoders(records, rounds: int) -> dict[str, float]:
    paths = [r.path for r in records]
    decoders = ["pillow"] + (["simplejpeg"] if decode._simplejpeg is not None else [])

    def run(name):
        def fn(_r):
            t = time.perf_counter()
            for p in paths:
                decode.decode_image(p, decoder=name)
            return len(paths) / (time.perf_counter() - t)

        return fn

    return interleaved({d: run(d) for d in decoders}, rounds)


# ---------------------------------------------------------------------------- transforms
def bench_transforms(cfg, decoded, batch_size: int, rounds: int) -> dict[str, float]:
    """Images/s of the transforms alone on ``decoded`` uint8 images (one process)."""
    pipeline = build_train_transforms(cfg)
    naive = NaiveTrainTransform(cfg)
    pils = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in decoded]
    bt = BatchTransform(pipeline)
    n = len(decoded)

    def naive_fn(_r):
        t = time.perf_counter()
        for im in pils:
            naive(im)
        return n / (time.perf_counter() - t)

    def per_sample(_r):
        t = time.perf_counter()
        for s, x in enumerate(decoded):
            pipeline.apply(x, None, torch.Generator().manual_seed(s))
        return n / (time.perf_counter() - t)

    def batched(device):
        def fn(_r):
            _sync(device)
            t = time.perf_counter()
            for b in range(0, n, batch_size):
                chunk = decoded[b : b + batch_size]
                drawn = [
                    bt.sample(tuple(x.shape[-2:]), None, torch.Generator().manual_seed(b + k))
                    for k, x in enumerate(chunk)
                ]
                params = torch.stack([d[0] for d in drawn])
                images = torch.stack(chunk)
                if device == "cuda":
                    images, params = images.pin_memory(), params.pin_memory()
                bt(images.to(device, non_blocking=True), params.to(device, non_blocking=True))
            _sync(device)
            return n / (time.perf_counter() - t)

        return fn

    fns = {
        "naive (torchvision-style)": naive_fn,
        "per-sample": per_sample,
        "batched cpu": batched("cpu"),
    }
    if torch.cuda.is_available():
        fns["batched cuda"] = batched("cuda")
    for fn in fns.values():  # warm-up
        fn(-1)
    return interleaved(fns, rounds)


# -------------------------------------------------------------------------------- loader
def time_epoch(loader, epoch: int, device: str | None = None) -> float:
    """Images per second of one training epoch (``device``: including ``prepare``)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    n = 0
    _sync(device or "cpu")
    start = time.perf_counter()
    for batch in loader:
        if device is not None:
            batch = loader.prepare(batch, device)
        n += batch["images"].shape[0]
    _sync(device or "cpu")
    return n / (time.perf_counter() - start)


def bench_loaders(cfg, records, workers: int, batch_size: int, rounds: int) -> dict[str, float]:
    cfg.data.num_workers = workers
    per_sample = build_train_loader(cfg, records)
    on_device = build_train_loader(cfg, records, device_transforms=True)
    sampler = PKSampler([r.pid for r in records], batch_size, 4, seed=0)
    naive = DataLoader(
        NaiveDataset(records, NaiveTrainTransform(cfg.data)),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        collate_fn=naive_collate,
        worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0,
    )
    fns = {
        "naive (torchvision-style)": lambda r: time_epoch(naive, r + 1),
        "per-sample": lambda r: time_epoch(per_sample, r + 1),
        "batched cpu": lambda r: time_epoch(on_device, r + 1, "cpu"),
    }
    if torch.cuda.is_available():
        fns["batched cuda"] = lambda r: time_epoch(on_device, r + 1, "cuda")
    for fn in fns.values():  # warm-up (starts the persistent workers)
        fn(-1)
    return interleaved(fns, rounds)


def _line(title: str, res: dict[str, float], ref: str = "per-sample") -> str:
    cells = " | ".join(
        f"{k} {v:8.0f}" + (f" (x{v / res[ref]:.2f})" if k != ref and ref in res else "")
        for k, v in res.items()
    )
    return f"  {title:34s} {cells}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--num-ids", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sizes", nargs="+", default=["256x128", "384x128"], help="HxW outputs")
    ap.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--color-jitter", type=float, default=0.0)
    ap.add_argument("--skip-loader", action="store_true", help="only decoders and transforms")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "usable_cores": usable_cores(),
        "load_average": os.getloadavg()[0],
        "torch_threads": args.threads,
        "batch_size": args.batch_size,
        "jpeg_decoder": decode.JPEG_DECODER,
    }
    with tempfile.TemporaryDirectory() as tmp:
        records = write_images(Path(tmp), args.num_images, args.num_ids)
        print(
            f"{len(records)} JPEGs 128x64, batch {args.batch_size}, torch threads {args.threads},"
            f" usable cores {usable_cores()}, load average {os.getloadavg()[0]:.1f}, "
            f"CUDA: {figures['device']}"
        )
        dec = bench_decoders(records, args.rounds)
        figures["decode"] = dec
        print(_line("decoding (img/s)", dec, "pillow"))
        decoded = [decode.decode_image(r.path) for r in records]
        for size in args.sizes:
            h, w = (int(v) for v in size.lower().split("x"))
            cfg = Config()
            cfg.data.height, cfg.data.width = h, w
            cfg.data.batch_size, cfg.data.num_instances = args.batch_size, 4
            cfg.data.color_jitter = args.color_jitter
            print(f" output {h}x{w}")
            tr = bench_transforms(cfg.data, decoded, args.batch_size, args.rounds)
            figures[f"transforms_{size}"] = tr
            print(_line("transforms only, 1 process", tr))
            if args.skip_loader:
                continue
            for workers in args.num_workers:
                res = bench_loaders(cfg, records, workers, args.batch_size, args.rounds)
                figures[f"loader_{size}_workers{workers}"] = res
                print(_line(f"train loader, num_workers={workers}", res))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
