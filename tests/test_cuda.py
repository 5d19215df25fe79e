"""CUDA: the device-agnostic code gives the CPU results, and AMP training steps work.

Skipped without a GPU, unless ``REIDKIT_REQUIRE_CUDA=1`` (set by
``benchmarks/gpu_check.sh``), which turns a missing GPU into a failure.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from bench_reference import ref
from engine_fakes import write_market_folder

from reidkit.config import load_config
from reidkit.metrics import evaluate_features, evaluate_rank, re_ranking, re_ranking_features

if not torch.cuda.is_available():
    if os.environ.get("REIDKIT_REQUIRE_CUDA") == "1":
        raise RuntimeError("REIDKIT_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
    pytest.skip("needs CUDA", allow_module_level=True)


def _problem(nq=200, ng=3000, ties=False, seed=0):
    rng = np.random.default_rng(seed)
    qp = rng.integers(1, 30, nq)
    gp = np.concatenate([rng.integers(1, 30, ng - 400), np.zeros(200, int), -np.ones(200, int)])
    qc, gc = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    d = rng.random((nq, ng)) * np.where(gp[None, :] == qp[:, None], 0.6, 1.0)
    if ties:
        d = np.round(d * 30) / 30
    return d.astype(np.float32), qp, gp, qc, gc


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dense_frac", [-1.0, 2.0])
def test_evaluate_rank_cuda_equals_cpu_and_naive(ties, dense_frac, monkeypatch):
    import reidkit.metrics.rank as rank_mod

    monkeypatch.setattr(rank_mod, "_DENSE_FRACTION", dense_frac)
    d, qp, gp, qc, gc = _problem(ties=ties)
    for ignore in ((), (-1,)):
        cpu = evaluate_rank(d, qp, gp, qc, gc, ignore_gallery_pids=ignore)
        gpu = evaluate_rank(torch.from_numpy(d).cuda(), qp, gp, qc, gc, ignore_gallery_pids=ignore)
        expected = ref.naive_eval(d, qp, gp, qc, gc, ignore_gallery_pids=ignore)
        np.testing.assert_array_equal(gpu.all_AP, cpu.all_AP)
        np.testing.assert_array_equal(gpu.cmc, cpu.cmc)
        np.testing.assert_allclose(gpu.all_AP, expected[3], atol=1e-12)


def test_evaluate_features_and_rerank_on_cuda():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, 32, generator=g)
    qp, gp = torch.randint(0, 20, (60,), generator=g), torch.randint(0, 20, (400,), generator=g)
    qf = centers[qp] + 0.8 * torch.randn(60, 32, generator=g)
    gf = centers[gp] + 0.8 * torch.randn(400, 32, generator=g)
    cpu = evaluate_features(qf, gf, qp, gp)
    gpu = evaluate_features(qf.cuda(), gf.cuda(), qp, gp)
    assert gpu.mAP == pytest.approx(cpu.mAP, abs=1e-6)
    qg, qq, gg = torch.cdist(qf, gf), torch.cdist(qf, qf), torch.cdist(gf, gf)
    dense_cpu = re_ranking(qg, qq, gg)
    dense_gpu = re_ranking(qg.cuda(), qq.cuda(), gg.cuda())
    assert dense_gpu.is_cuda
    assert (dense_gpu.cpu() - dense_cpu).abs().max() < 1e-5
    sparse_gpu = re_ranking_features(qf.cuda(), gf.cuda())
    assert (sparse_gpu.cpu() - dense_cpu).abs().max() < 1e-4


def test_device_transforms_loader_on_cuda(tmp_path):
    from reidkit.data.datasets import build_dataset
    from reidkit.data.loader import build_train_loader

    root = write_market_folder(tmp_path / "data", size=(64, 32))
    cfg = load_config(
        None,
        [
            "data.dataset=market1501",
            f"data.root={root}",
            "data.height=128",
            "data.width=64",
            "data.batch_size=8",
            "data.num_instances=2",
            "data.num_workers=0",
            "data.color_jitter=0.2",
        ],
    )
    records = build_dataset("market1501", root).train
    ref_batches = list(build_train_loader(cfg, records))
    loader = build_train_loader(cfg, records, device_transforms=True)
    for r, b in zip(ref_batches, loader):
        out = loader.prepare(b, "cuda")
        assert out["images"].is_cuda and out["images"].shape == r["images"].shape
        # the CUDA resize rounds differently from the CPU uint8 kernel: <= 1 grey level
        diff = (out["images"].cpu() - r["images"]).abs().max()
        assert diff <= 1.5 * 1.01 / (255 * min(cfg.data.std))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_steps_on_cuda(amp, tmp_path):
    """BoT (ResNet-18) trains a few steps under autocast with finite losses; fp16 uses the
    gradient scaler, whose state lands in the checkpoint."""
    from reidkit.engine import train

    root = write_market_folder(tmp_path / "data", size=(64, 32))
    cfg = load_config(
        None,
        [
            "model.name=bot",
            "model.backbone=resnet18",
            "model.pretrained=null",
            "data.dataset=market1501",
            f"data.root={root}",
            "data.height=64",
            "data.width=32",
            "data.batch_size=8",
            "data.num_instances=2",
            "data.num_workers=0",
            "device=cuda",
            f"amp={amp}",
            "solver.max_epochs=2",
            "solver.warmup_epochs=1",
            "test.eval_period=2",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    run = train(cfg, overwrite=True, progress=False)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    losses = [v for line in lines for k, v in line.items() if "loss" in k and isinstance(v, float)]
    assert losses and all(math.isfinite(v) for v in losses)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["mAP"] <= 1.0
