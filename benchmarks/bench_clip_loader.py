"""Clip-loading throughput (frames / second): reidkit's clip loader vs a naive per-frame
PIL pipeline, in the same run.

Writes a temporary MARS-like set of JPEG tracklets (frames 256x128, as MARS stores them;
lengths 8-64), then times whole epochs of

1. the training loader: P x K tracklets, TKP clips (4 frames, stride 8), flip + pad/crop +
   random erasing at 256x128. reidkit decodes each frame once, stacks the clip and runs
   every transform once on the (T, 3, H, W) tensor (one draw per clip). The reference is
   what torchreid's ``VideoDataset`` does: for each frame, PIL open, PIL resize, PIL flip,
   ``ImageOps.expand`` pad, PIL crop, ``ToTensor``, per-channel normalise, BoT's erasing
   loop (one random draw per frame), then ``torch.stack``;
2. the same with ``defer_normalize=True`` (workers ship uint8; ``prepare`` normalises and
   erases the batch, here on the CPU, counted in the time);
3. the test loader: every frame, in 32-frame chunks, resize + normalise only.

Both pipelines use the same sampler, batch size and ``num_workers``; timings alternate
between the two (median of rounds), which is fair under a varying machine load.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_clip_loader.py --num-workers 0 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import NaiveTrainTransform  # noqa: E402

from reidkit.config import Config  # noqa: E402
from reidkit.data.clips import (  # noqa: E402
    ClipOptions,
    build_clip_test_loader,
    build_clip_train_loader,
    chunk_clip,
)
from reidkit.data.loader import worker_init_fn  # noqa: E402
from reidkit.data.records import TrackletRecord  # noqa: E402
from reidkit.data.samplers import PKSampler  # noqa: E402


def write_tracklets(
    folder: Path, num_ids: int, per_id: int, h: int, w: int
) -> list[TrackletRecord]:
    """JPEG tracklets with smooth content (realistic file sizes), lengths 8-64."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.int16)
    records = []
    for k in range(num_ids * per_id):
        pid, cam = k // per_id, k % per_id
        n = int(np.exp(rng.uniform(np.log(8), np.log(65))))
        tint = rng.integers(-40, 40, 3)
        paths = []
        for f in range(n):
            arr = np.clip(smooth + tint + rng.integers(-8, 8, smooth.shape), 0, 255)
            path = folder / f"{pid:04d}C{cam + 1}T{k:04d}F{f + 1:03d}.jpg"
            Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
            paths.append(str(path))
        records.append(TrackletRecord(tuple(paths), pid, cam))
    return records


class NaiveClipDataset(Dataset):
    """torchreid-style: choose frames (TKP's rule, Python ``random``), then load and
    transform each frame on its own with PIL and stack."""

    def __init__(self, records, transform, seq_len: int, stride: int, chunk_len: int = 0):
        self.records, self.transform = records, transform
        self.seq_len, self.stride = seq_len, stride
        self.items = (
            [(i, s, e) for i, r in enumerate(records) for s, e in chunk_clip(len(r), chunk_len)]
            if chunk_len
            else None
        )

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.records)

    def _indices(self, n: int) -> list[int]:
        t, stride = self.seq_len, self.stride
        if n >= t * stride:
            begin = random.randint(0, n - (t - 1) * stride - 1)
            return list(range(begin, begin + (t - 1) * stride + 1, stride))
        return sorted(np.random.choice(n, size=t, replace=n < t).tolist())

    def __getitem__(self, index: int):
        if self.items is not None:
            ti, start, stop = self.items[index]
            idx = list(range(start, stop))
        else:
            ti = index
            idx = self._indices(len(self.records[ti]))
        r = self.records[ti]
        frames = [self.transform(Image.open(r.paths[i]).convert("RGB")) for i in idx]
        return torch.stack(frames), r.pid, r.camid, ti


def naive_collate(items):
    clips, pids, camids, index = zip(*items)
    length = max(c.shape[0] for c in clips)
    mask = torch.zeros(len(clips), length, dtype=torch.bool)
    padded = []
    for b, c in enumerate(clips):
        mask[b, : c.shape[0]] = True
        if c.shape[0] < length:
            c = torch.cat([c, c[-1:].expand(length - c.shape[0], -1, -1, -1)])
        padded.append(c)
    return {
        "clips": torch.stack(padded),
        "clip_mask": mask,
        "pids": torch.tensor(pids),
        "camids": torch.tensor(camids),
        "index": torch.tensor(index),
    }


class NaiveTestTransform:
    def __init__(self, cfg) -> None:
        self.h, self.w = cfg.height, cfg.width
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.w, self.h), Image.BILINEAR)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std


def time_epoch(loader, epoch: int, prepare: bool = False) -> float:
    """Frames per second of one pass (real frames: ``clip_mask`` True)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    n = 0
    start = time.perf_counter()
    for batch in loader:
        if prepare:
            batch = loader.prepare(batch, "cpu")
        n += int(batch["clip_mask"].sum())
    return n / (time.perf_counter() - start)


def interleaved(fn_a, fn_b, rounds: int) -> tuple[float, float]:
    a, b = [], []
    for r in range(rounds):
        a.append(fn_a(r))
        b.append(fn_b(r))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-ids", type=int, default=24)
    ap.add_argument("--tracklets-per-id", type=int, default=4)
    ap.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config()
    cfg.data.height, cfg.data.width = args.height, args.width
    cfg.data.batch_size, cfg.data.num_instances = 16, 4  # TKP: P=4 x K=4
    cfg.data.test_batch_size = 128  # frames: 4 chunks of 32
    clip = ClipOptions(seq_len=4, sampling="tkp", stride=8, chunk_len=32)
    with tempfile.TemporaryDirectory() as tmp:
        records = write_tracklets(
            Path(tmp), args.num_ids, args.tracklets_per_id, args.height, args.width
        )
        frames = sum(len(r) for r in records)
        print(
            f"{len(records)} tracklets / {frames} JPEG frames {args.height}x{args.width} "
            f"(lengths {min(map(len, records))}-{max(map(len, records))}); train clips "
            f"{clip.seq_len} frames (tkp, stride {clip.stride}), P x K = 4 x 4; test chunks "
            f"of {clip.chunk_len}"
        )
        for workers in args.num_workers:
            cfg.data.num_workers = workers
            kw = dict(
                num_workers=workers,
                collate_fn=naive_collate,
                worker_init_fn=worker_init_fn,
                persistent_workers=workers > 0,
            )
            ours = build_clip_train_loader(cfg, records, clip)
            ref = DataLoader(
                NaiveClipDataset(records, NaiveTrainTransform(cfg.data), 4, 8),
                batch_size=16,
                sampler=PKSampler([r.pid for r in records], 16, 4, seed=0),
                drop_last=True,
                **kw,
            )
            time_epoch(ours, 0), time_epoch(ref, 0)  # warm-up (starts persistent workers)
            a, b = interleaved(
                lambda r, ld=ours: time_epoch(ld, r + 1),
                lambda r, ld=ref: time_epoch(ld, r + 1),
                args.rounds,
            )
            print(
                f"train clips, num_workers={workers}: reidkit {a:7.0f} frames/s | naive "
                f"per-frame PIL {b:7.0f} frames/s | speed-up x{a / b:.2f}"
            )
            deferred = build_clip_train_loader(cfg, records, clip, defer_normalize=True)
            time_epoch(deferred, 0, prepare=True)
            c, b = interleaved(
                lambda r, ld=deferred: time_epoch(ld, r + 1, prepare=True),
                lambda r, ld=ref: time_epoch(ld, r + 1),
                args.rounds,
            )
            print(
                f"  defer_normalize=True (uint8 from workers, prepare() on CPU): reidkit "
                f"{c:7.0f} frames/s | naive {b:7.0f} frames/s | speed-up x{c / b:.2f}"
            )
            test_ours = build_clip_test_loader(cfg, records, clip)
            test_ref = DataLoader(
                NaiveClipDataset(records, NaiveTestTransform(cfg.data), 4, 8, chunk_len=32),
                batch_size=test_ours.batch_size,
                shuffle=False,
                **kw,
            )
            time_epoch(test_ours, 0), time_epoch(test_ref, 0)
            a, b = interleaved(
                lambda r, ld=test_ours: time_epoch(ld, r),
                lambda r, ld=test_ref: time_epoch(ld, r),
                args.rounds,
            )
            print(
                f"test chunks, num_workers={workers}: reidkit {a:7.0f} frames/s | naive "
                f"{b:7.0f} frames/s | speed-up x{a / b:.2f}"
            )
            del ours, ref, deferred, test_ours, test_ref


if __name__ == "__main__":
    main()
