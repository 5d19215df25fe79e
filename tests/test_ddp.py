"""Two gloo processes on CPU (launched with torch.distributed.run, like torchrun): the run
finishes, rank 0 writes the metrics, and DDP kept the parameters identical across ranks
although each rank trained on its own shard of the PK batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_fakes import FakeMethod, fake_config, write_market_folder

from reidkit.engine.trainer import seed_everything

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [{tests!r}, {repo!r}]
    from engine_fakes import fake_config
    import reidkit.methods as methods
    import reidkit.methods.base as base
    from reidkit.engine import train
    from reidkit.engine import distributed as du

    built = []
    real = base._METHODS["_engine_fake"]
    base._METHODS["_engine_fake"] = lambda cfg, n: built.append(real(cfg, n)) or built[-1]

    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")  # train() reuses an existing group
    cfg = fake_config({data!r}, {out!r}, **{{"solver.max_epochs": 2, "test.eval_period": 1}})
    train(cfg, progress=False)
    torch.save({{k: v.clone() for k, v in built[0].state_dict().items()}}, {out!r} + f"/rank{{rank}}.pt")

    # a gather of variable-length tensors across ranks
    x = torch.full((rank + 2, 3), float(rank))
    g = du.all_gather_variable(x)
    torch.save(g, {out!r} + f"/gather{{rank}}.pt")
    torch.distributed.destroy_process_group()
    """
)


@pytest.mark.timeout(180)
def test_two_process_gloo_training(tmp_path):
    data = write_market_folder(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), repo=str(REPO), data=str(data), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # own session, so a hang can be cleaned up with the workers torchrun started
    proc = subprocess.Popen(
        [*cmd, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("2-process training timed out:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final"]["mAP"] > 0
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 2 * 4  # the global batch is split, not the epoch
    seed_everything(0)  # the trainer's initialisation
    init = FakeMethod(fake_config(data, out), 8)
    for name, _ in init.named_parameters():  # (BN running stats are per rank without SyncBN)
        torch.testing.assert_close(
            a[name], b[name], atol=1e-6, rtol=0, msg=f"{name} differs across ranks"
        )
        torch.testing.assert_close(a[name], ckpt["model"][name])
    assert not torch.allclose(a["classifier.weight"], init.classifier.weight.detach())
    # the variable-length gather: rank 0 has 2 rows of 0, rank 1 has 3 rows of 1
    for r in (0, 1):
        g = torch.load(out / f"gather{r}.pt", weights_only=True)
        assert g[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    log = [line for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(log) == 2  # only rank 0 logs
