"""How many CPU threads reidkit's compute uses: never more than the process may run on.

torch starts with one intra-op thread per core of the *machine*. Inside a container, under
``taskset`` / a batch scheduler's CPU set or a cgroup CPU quota, the process may run on
fewer cores; OpenMP threads beyond them wait for each other at every parallel region,
and a 0.3 s evaluation can take seconds. So library entry points (evaluation, re-ranking,
query expansion) run with at most :func:`thread_limit` threads:

1. the value given to :func:`set_threads` (the CLI's ``reidkit --threads N``), if any;
2. else ``OMP_NUM_THREADS``, if set (the usual way to size a job's threads);
3. else the cores the process may use: ``os.sched_getaffinity`` and, on Linux, the cgroup
   CPU quota (``cpu.max``), whichever is smaller, less the cores other processes keep
   busy at that moment (the running-task count of ``/proc/loadavg``), at least one. On a
   shared machine this is what avoids oversubscription: two OpenMP threads on two cores
   of which another job holds one run several times slower than one thread.

The limit only lowers torch's thread count for the duration of a call (and restores it);
it never raises it: ``torch.set_num_threads(1)`` stays 1.

Where the work splits into independent pieces (ranking evaluation, re-ranking's row
blocks), :func:`parallel_map` runs the pieces on that many Python threads with torch
single-threaded inside each, instead of parallelising every small operation: with another
process on one of the cores, OpenMP's per-operation fork-join makes every operation wait
for the thread that lost its core, while here that thread just takes fewer pieces.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "usable_cores",
    "thread_limit",
    "set_threads",
    "limited_threads",
    "bounded_threads",
    "parallel_map",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
R = TypeVar("R")

_requested: int | None = None


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max`` = "quota period"), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, capped by a cgroup CPU quota)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def _busy_elsewhere(path: Path = Path("/proc/loadavg")) -> int | None:
    """Tasks running right now besides the caller (Linux ``/proc/loadavg``), or None."""
    try:
        running = int(path.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)


def thread_limit(samples: int = 1, interval: float = 0.1) -> int:
    """The most intra-op threads library calls use (see the module docstring).

    ``samples > 1``: count the other running tasks that many times, ``interval`` seconds
    apart, and use the median, for a choice that holds for minutes (``reidkit demo``):
    one snapshot can catch a short-lived process.
    """
    if _requested is not None:
        return _requested
    env = _env_threads()
    if env is not None:
        return env
    cores = usable_cores()
    counts = []
    for i in range(max(1, samples)):
        if i:
            time.sleep(interval)
        counts.append(_busy_elsewhere())
    if any(c is None for c in counts):
        return cores
    busy = sorted(counts)[len(counts) // 2]
    return max(1, min(cores, (os.cpu_count() or cores) - busy))


def set_threads(num_threads: int | None) -> int:
    """Use ``num_threads`` CPU threads from now on (``None``: back to automatic).

    Sets torch's thread count and the limit of :func:`bounded_threads`, so an explicit
    choice is followed even above the usable cores. Returns the limit now in force.
    """
    global _requested
    if num_threads is not None:
        if isinstance(num_threads, bool) or int(num_threads) < 1:
            raise ValueError(f"threads must be a positive integer, got {num_threads!r}")
        _requested = int(num_threads)
        torch.set_num_threads(_requested)
    else:
        _requested = None
    return thread_limit()


@contextmanager
def limited_threads() -> Iterator[int]:
    """Within the block, torch uses at most :func:`thread_limit` threads; yields the count."""
    limit = thread_limit()
    current = torch.get_num_threads()
    if current <= limit:
        yield current
        return
    torch.set_num_threads(limit)
    try:
        yield limit
    finally:
        torch.set_num_threads(current)


def bounded_threads(fn: F) -> F:
    """Decorator: run ``fn`` (a function or a generator function) under
    :func:`limited_threads`. For a generator the limit holds while it computes, not while
    the caller handles what it yielded."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            it = fn(*args, **kwargs)
            while True:
                with limited_threads():
                    try:
                        item = next(it)
                    except StopIteration as stop:
                        return stop.value
                yield item

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with limited_threads():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def parallel_map(
    fn: Callable[[T], R], items: Iterable[T], device: torch.device | str = "cpu"
) -> list[R]:
    """``[fn(x) for x in items]`` on ``torch.get_num_threads()`` Python threads, each
    running torch single-threaded; results in order, the first exception re-raised.

    For independent, cache-sized pieces of work on the CPU. Unlike torch's own per-op
    threads, the threads never wait for each other: when another process takes a core,
    the thread on it does fewer pieces instead of holding up every operation. Runs
    serially on other devices or with one thread.
    """
    items = list(items)
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1 or torch.device(device).type != "cpu":
        return [fn(x) for x in items]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="reidkit") as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(previous)
