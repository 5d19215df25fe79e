"""Training-loader throughput: reidkit's pipeline vs a naive torchvision-style reference.

Writes a temporary folder of Market-1501-sized JPEGs (128x64), then measures images/second

1. of the per-sample training transforms alone (images decoded beforehand, one process), and
2. of the whole training DataLoader (decode + augment + collate) with the same sampler,
   batch size and ``num_workers`` for both pipelines, and
3. of the loader with ``defer_normalize=True`` (workers ship uint8; normalisation and
   erasing run batched in ``loader.prepare``, here on the CPU, counted in the time).

The reference is what a torchvision pipeline does, op by op: PIL resize, PIL flip,
``ImageOps.expand`` pad, PIL crop, ``ToTensor`` (uint8 -> float / 255), per-channel
normalise, then BoT's random-erasing loop with Python's ``random``. Both pipelines produce
the same distribution of images.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_loader.py --num-images 512 --num-workers 0 2
"""

from __future__ import annotations

import argparse
import math
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
from reidkit.data.loader import build_train_loader, worker_init_fn
from reidkit.data.records import ImageRecord
from reidkit.data.samplers import PKSampler
from reidkit.data.transforms import build_train_transforms


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


def time_transforms(fn, images) -> float:
    """Images per second of one pass of ``fn`` over the decoded images."""
    start = time.perf_counter()
    for s, im in enumerate(images):
        fn(im, s)
    return len(images) / (time.perf_counter() - start)


def time_epoch(loader, epoch: int, prepare: bool = False) -> float:
    """Images per second of one training epoch of ``loader`` (``prepare``: including
    ``loader.prepare(batch, "cpu")``, the normalisation of a deferred loader)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    n = 0
    start = time.perf_counter()
    for batch in loader:
        if prepare:
            batch = loader.prepare(batch, "cpu")
        n += batch["images"].shape[0]
    return n / (time.perf_counter() - start)


def interleaved(fn_a, fn_b, rounds: int) -> tuple[float, float]:
    """Alternate the two measurements (fair under a varying machine load); medians."""
    a, b = [], []
    for r in range(rounds):
        a.append(fn_a(r))
        b.append(fn_b(r))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--num-ids", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config()
    cfg.data.batch_size = args.batch_size
    cfg.data.num_instances = 4
    with tempfile.TemporaryDirectory() as tmp:
        records = write_images(Path(tmp), args.num_images, args.num_ids)
        print(
            f"{len(records)} JPEGs 128x64 -> {cfg.data.height}x{cfg.data.width}, batch {args.batch_size}"
        )

        ours = build_train_transforms(cfg.data)
        naive = NaiveTrainTransform(cfg.data)
        decoded = [Image.open(r.path).convert("RGB") for r in records[:128]]
        time_transforms(
            lambda im, s: ours(im, torch.Generator().manual_seed(s)), decoded
        )  # warm-up
        ours_ips, naive_ips = interleaved(
            lambda r: time_transforms(
                lambda im, s: ours(im, torch.Generator().manual_seed(s)), decoded
            ),
            lambda r: time_transforms(lambda im, s: naive(im), decoded),
            args.rounds,
        )
        print(
            f"transforms only (1 process): reidkit {ours_ips:8.0f} img/s | naive {naive_ips:8.0f} img/s"
            f" | speed-up x{ours_ips / naive_ips:.2f}"
        )

        for workers in args.num_workers:
            cfg.data.num_workers = workers
            loader = build_train_loader(cfg, records)
            sampler = PKSampler([r.pid for r in records], args.batch_size, 4, seed=0)
            ref = DataLoader(
                NaiveDataset(records, naive),
                batch_size=args.batch_size,
                sampler=sampler,
                drop_last=True,
                num_workers=workers,
                collate_fn=naive_collate,
                worker_init_fn=worker_init_fn,
                persistent_workers=workers > 0,
            )
            time_epoch(loader, 0), time_epoch(ref, 0)  # warm-up (starts persistent workers)
            a, b = interleaved(
                lambda r, ld=loader: time_epoch(ld, r + 1),
                lambda r, ld=ref: time_epoch(ld, r + 1),
                args.rounds,
            )
            print(
                f"train loader, num_workers={workers}: reidkit {a:8.0f} img/s | naive {b:8.0f} img/s"
                f" | speed-up x{a / b:.2f}"
            )
            deferred = build_train_loader(cfg, records, defer_normalize=True)
            time_epoch(deferred, 0, prepare=True)
            c, b = interleaved(
                lambda r, ld=deferred: time_epoch(ld, r + 1, prepare=True),
                lambda r, ld=ref: time_epoch(ld, r + 1),
                args.rounds,
            )
            print(
                f"  defer_normalize=True (uint8 from workers, prepare() on CPU): reidkit {c:8.0f} img/s"
                f" | naive {b:8.0f} img/s | speed-up x{c / b:.2f}"
            )
            del loader, ref, deferred


if __name__ == "__main__":
    main()
