"""Synthetic re-ID problems with real datasets' label structure (for benchmarks)."""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MB; sees torch's allocations."""
    with open("/proc/self/status") as f:
        m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024 if m else float("nan")


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024 if m else float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns False if not possible."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def market_like_labels(
    num_query=3368,
    num_gallery=19732,
    num_ids=750,
    num_cams=6,
    num_distractors=2798,
    num_junk=3819,
    seed=0,
):
    """Labels with Market-1501's structure: ~4.5 queries per id, each id in the gallery
    from several cameras, pid 0 distractors and pid -1 junk images.

    Returns q_pids, q_camids, g_pids, g_camids (numpy int64).
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(1, num_ids + 1)
    q_pids = np.concatenate([ids, rng.choice(ids, num_query - num_ids)])
    q_camids = rng.integers(0, num_cams, num_query)
    n_true = num_gallery - num_distractors - num_junk
    g_pids = np.concatenate(
        [
            np.repeat(ids, 2),
            rng.choice(ids, n_true - 2 * num_ids),
            np.zeros(num_distractors, np.int64),
            -np.ones(num_junk, np.int64),
        ]
    )
    g_camids = rng.integers(0, num_cams, num_gallery)
    perm = rng.permutation(num_gallery)
    return q_pids, q_camids, g_pids[perm], g_camids[perm]


def features_for(pids, dim, noise, seed=0, centers=None, dtype=torch.float32):
    """Unit features = identity center + Gaussian noise (pid <= 0: random directions).

    ``noise`` sets the difficulty: with dim 128, 1.2 gives mAP ~ 95 %, 1.6 ~ 45 %.
    """
    g = torch.Generator().manual_seed(seed)
    if centers is None:
        n = int(np.max(pids)) + 2
        centers = torch.randn(n, dim, generator=g)
        centers = centers / centers.norm(dim=1, keepdim=True)
    p = torch.as_tensor(pids)
    base = torch.where(
        (p > 0)[:, None], centers[p.clamp_min(0)], torch.randn(len(p), dim, generator=g)
    )
    x = (
        base / base.norm(dim=1, keepdim=True)
        + noise * torch.randn(len(p), dim, generator=g) / dim**0.5
    )
    return (x / x.norm(dim=1, keepdim=True)).to(dtype), centers


def query_gallery_features(q_pids, g_pids, dim, noise, dtype=torch.float32):
    """``(qf (Q, dim), gf (G, dim))`` from :func:`features_for` with shared identity centres
    (queries drawn with seed 1, gallery with seed 2)."""
    qf, centers = features_for(q_pids, dim, noise, seed=1, dtype=dtype)
    gf, _ = features_for(g_pids, dim, noise, seed=2, centers=centers, dtype=dtype)
    return qf, gf


def msmt_like_labels(num_query=11659, num_gallery=82161, num_ids=3060, num_cams=15, seed=0):
    """Labels with MSMT17's test-set sizes (3,060 ids, 15 cameras)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, num_ids + 1)
    q_pids = np.concatenate([ids, rng.choice(ids, num_query - num_ids)])
    g_pids = np.concatenate([np.repeat(ids, 2), rng.choice(ids, num_gallery - 2 * num_ids)])
    return (
        q_pids,
        rng.integers(0, num_cams, num_query),
        g_pids[rng.permutation(num_gallery)],
        rng.integers(0, num_cams, num_gallery),
    )


def timeit(fn, repeat=3):
    """Best wall time of ``repeat`` calls and the last result."""
    import time

    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(fn, repeat=1):
    """(seconds, peak RSS increase in MB over the RSS at the start, result) of one call.

    ``repeat > 1`` calls ``fn`` that many times and reports the best time; the memory and
    the result are those of the first call.
    """
    import gc
    import time

    gc.collect()
    reset_peak_rss()
    base = current_rss_mb()
    t = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t
    mem = peak_rss_mb() - base
    for _ in range(repeat - 1):
        sec = min(sec, measure(fn)[0])
    return sec, mem, out


def benchmark_parser(doc):
    """An ``ArgumentParser`` that shows the benchmark's module docstring ``doc`` verbatim."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh (spawned) process, so peak-RSS readings are clean.

    ``fn`` must be a module-level function returning a picklable value.
    """
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def busy_loop(core: int):
    """Start a process spinning on ``core`` (another job on a shared machine); the caller
    kills it (``proc.kill(); proc.wait()``)."""
    import subprocess
    import sys

    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])
