"""Cost of the image checks run before training (``reidkit.data.images``).

Writes a temporary folder of Market-1501-sized JPEGs (128x64, quality 90) and times, over
the same thread pool the dataset parsers use:

1. ``stat`` only (the old start-up check: exists, non-empty);
2. the start-up check: ``stat`` + the first 16 and last 32 bytes of each file (a JPEG must
   end with its EOI marker, a PNG with IEND); only files that fail are decoded;
3. ``--verify``: every image decoded by Pillow (``verify()`` + ``load()``).

and reports the ratios against ``stat`` alone, plus what the start-up check would cost on
Market-1501 (32,668 images) at the measured rate. Run twice for a warm page cache.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_image_check.py --num-images 5000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from reidkit.data.images import find_bad_images

MARKET_IMAGES = 32668


def _stat_all(paths: list[str], workers: int) -> None:
    chunk = max(1, len(paths) // (workers * 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(os.stat, paths, chunksize=chunk))


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=8, help="threads (the parsers' default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        base = (rng.random((128, 64, 3)) * 255).astype(np.uint8)
        paths = []
        for i in range(args.num_images):
            path = Path(tmp) / f"{i:06d}.jpg"
            Image.fromarray(np.roll(base, i, axis=0)).save(path, quality=90)
            paths.append(str(path))
        _stat_all(paths, args.workers)  # warm the page cache
        stat_s = _time(lambda: _stat_all(paths, args.workers), args.repeats)
        cheap_s = _time(lambda: find_bad_images(paths, False, args.workers), args.repeats)
        verify_s = _time(lambda: find_bad_images(paths, True, args.workers), args.repeats)

    n = args.num_images
    print(f"{n} JPEGs 128x64, {args.workers} threads, median of {args.repeats}:")
    for name, sec in (
        ("stat only (old start-up check)", stat_s),
        ("start-up check (stat + end bytes)", cheap_s),
        ("--verify (full decode)", verify_s),
    ):
        market = sec / n * MARKET_IMAGES
        print(
            f"  {name:36s} {sec:7.3f} s  {1e6 * sec / n:7.1f} us/image  "
            f"x{sec / stat_s:5.1f} of stat  (Market-1501: {market:5.1f} s)"
        )


if __name__ == "__main__":
    main()
