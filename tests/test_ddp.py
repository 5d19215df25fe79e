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

from reidkit.data.datasets import build_dataset
from reidkit.engine import evaluate_model
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

    import dataclasses
    built = []
    spec = base._METHODS["_engine_fake"]

    class Recorded(spec.cls):
        def __init__(self, cfg, n):
            super().__init__(cfg, n)
            built.append(self)

    base._METHODS["_engine_fake"] = dataclasses.replace(spec, cls=Recorded)

    rank = int(os.environ["RANK"])
    # 1. a gather of variable-length tensors across ranks, in a group of our own
    # (a file store: re-creating a group on torchrun's store after destroying one is flaky)
    world = int(os.environ["WORLD_SIZE"])
    init = "file://" + {out!r} + "/gather_store"
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = torch.full((rank + 2, 3), float(rank))
    torch.save(du.all_gather_variable(x), {out!r} + f"/gather{{rank}}.pt")
    du.barrier()  # nobody tears the group down while a peer still talks to it
    torch.distributed.destroy_process_group()

    # 2. training: train() initialises (and at the end destroys) the group from torchrun's env
    cfg = fake_config({data!r}, {out!r}, **{{"solver.max_epochs": 2, "test.eval_period": 1}})
    train(cfg, progress=False)
    assert not torch.distributed.is_initialized()
    torch.save({{k: v.clone() for k, v in built[0].state_dict().items()}}, {out!r} + f"/rank{{rank}}.pt")
    """
)


@pytest.mark.timeout(180)
def test_two_process_gloo_training(tmp_path):
    # 9 query / 27 gallery images: the two ranks extract shards of different sizes
    data = write_market_folder(tmp_path / "data", num_ids=9, noise=120.0)
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
    assert proc.returncode == 0, stdout[-2000:] + stderr[-12000:]
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final"]["mAP"] > 0
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 2 * 4  # the global batch is split, not the epoch
    seed_everything(0)  # the trainer's initialisation
    init = FakeMethod(fake_config(data, out), 9)
    for name, _ in init.named_parameters():  # (BN running stats are per rank without SyncBN)
        torch.testing.assert_close(
            a[name], b[name], atol=1e-6, rtol=0, msg=f"{name} differs across ranks"
        )
        torch.testing.assert_close(a[name], ckpt["model"][name])
    assert not torch.allclose(a["classifier.weight"], init.classifier.weight.detach())
    # the sharded, gathered evaluation equals a single-process one of the saved model
    model = FakeMethod(fake_config(data, out), 9)
    model.load_state_dict(ckpt["model"])
    single = evaluate_model(fake_config(data, out), model, build_dataset("market1501", data), "cpu")
    assert 0 < single.metrics["mAP"] < 1
    assert metrics["final"]["mAP"] == pytest.approx(single.metrics["mAP"], abs=1e-6)
    # the variable-length gather: rank 0 has 2 rows of 0, rank 1 has 3 rows of 1
    for r in (0, 1):
        g = torch.load(out / f"gather{r}.pt", weights_only=True)
        assert g[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    log = [line for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(log) == 2  # only rank 0 logs
