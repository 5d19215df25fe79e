"""The thread limit of library entry points: affinity, OMP_NUM_THREADS, cgroup quota, --threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reidkit.threads as threads
from reidkit.cli import main
from reidkit.metrics import evaluate_rank, iter_re_ranking_features

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    threads.set_threads(None)
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _idle_machine(monkeypatch):
    """The tests decide how busy the machine looks (the real one is shared)."""
    monkeypatch.setattr(threads, "_busy_elsewhere", lambda: 0)


def test_limit_follows_env_then_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 3)
    monkeypatch.setattr(threads, "_busy_elsewhere", lambda: 0)  # not the real machine's load
    monkeypatch.setattr(threads, "_requested", None)  # an earlier CLI test's --threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.thread_limit() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.thread_limit() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "garbage")
    assert threads.thread_limit() == 3
    assert threads.set_threads(5) == 5  # an explicit choice wins, even above the cores
    assert torch.get_num_threads() == 5
    assert threads.set_threads(None) == 3
    with pytest.raises(ValueError, match="positive"):
        threads.set_threads(0)


def test_cores_busy_with_other_processes_are_left_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_requested", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    for busy, expected in ((0, 4), (1, 3), (3, 1), (12, 1)):
        monkeypatch.setattr(threads, "_busy_elsewhere", lambda b=busy: b)
        assert threads.thread_limit() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # an explicit size is followed
    assert threads.thread_limit() == 4
    (tmp_path / "loadavg").write_text("7.95 7.81 6.74 9/523 12345\n")
    monkeypatch.undo()
    assert threads._busy_elsewhere(tmp_path / "loadavg") == 8
    assert threads._busy_elsewhere(tmp_path / "missing") is None


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_cpus(tmp_path) is None
    assert threads._cgroup_cpus(tmp_path / "missing") is None
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_entry_points_lower_torch_threads_and_restore(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    seen = []
    real = torch.Tensor.contiguous

    def spy(self, *a, **kw):
        seen.append(torch.get_num_threads())
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    d = np.random.default_rng(0).random((4, 10))
    evaluate_rank(d, [1, 2, 1, 2], [1, 2] * 5)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2  # restored afterwards
    # generators: limited while computing, restored while the caller holds a block
    blocks = iter_re_ranking_features(torch.randn(5, 4), torch.randn(30, 4), k1=4, k2=2)
    for _ in blocks:
        assert torch.get_num_threads() == 2
    # never raised: a lower setting stays
    torch.set_num_threads(1)
    with threads.limited_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1


def test_affinity_is_followed_in_a_fresh_process():
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux CPU affinity and two usable cores")
    cpu = min(os.sched_getaffinity(0))
    code = (
        f"import os, torch; os.sched_setaffinity(0, {{{cpu}}}); torch.set_num_threads(2)\n"
        "import reidkit.threads as t\n"
        "with t.limited_threads() as n: print(t.usable_cores(), n)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["1", "1"]


def test_cli_threads_option(capsys):
    assert main(["--threads", "1", "datasets", "list"]) == 0
    assert torch.get_num_threads() == 1 and threads.thread_limit() == 1
    with pytest.raises(SystemExit):
        main(["--threads", "0", "datasets", "list"])
    assert "--threads N" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out


def test_parallel_pieces_give_the_serial_results(monkeypatch):
    from bench_reference import ref

    from reidkit.metrics import re_ranking

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rng = np.random.default_rng(4)
    d = rng.random((40, 300))
    qp, gp = rng.integers(0, 5, 40), rng.integers(0, 5, 300)
    qc, gc = rng.integers(0, 2, 40), rng.integers(0, 2, 300)
    torch.set_num_threads(2)
    r = evaluate_rank(d, qp, gp, qc, gc, chunk_size=3)  # 14 pieces on 2 threads
    expected = ref.naive_eval(d, qp, gp, qc, gc)
    np.testing.assert_allclose(r.all_AP, expected[3], atol=1e-12)
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    dist = torch.cdist(x, x)
    qg, qq, gg = dist[:15, 15:], dist[:15, :15], dist[15:, 15:]
    monkeypatch.setattr("reidkit.metrics.rerank._BLOCK_ELEMENTS", 200)  # many blocks
    par = re_ranking(qg, qq, gg, k1=6, k2=3)
    torch.set_num_threads(1)
    assert torch.equal(par, re_ranking(qg, qq, gg, k1=6, k2=3))
    # parallel_map: order kept, first error raised, torch threads restored
    torch.set_num_threads(2)
    assert threads.parallel_map(lambda v: v * v, range(7)) == [v * v for v in range(7)]

    def boom(v):
        if v in (3, 5):
            raise ValueError(f"bad {v}")
        return v

    with pytest.raises(ValueError, match="bad 3"):
        threads.parallel_map(boom, range(7))
    assert torch.get_num_threads() == 2


def test_sampled_limit_takes_the_median_of_the_counts(monkeypatch):
    """A long run decides from several snapshots: one short-lived process does not pin it
    to one thread, a sustained one does."""
    monkeypatch.setattr(threads, "_requested", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    for seen, expected in (([1, 0, 0, 0, 0], 2), ([1, 1, 1, 0, 1], 1), ([0, None, 0], 2)):
        counts = iter(seen)
        monkeypatch.setattr(threads, "_busy_elsewhere", lambda c=counts: next(c, 0))
        assert threads.thread_limit(samples=len(seen)) == expected
