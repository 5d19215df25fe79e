"""Small fakes shared by the engine tests: a Market-layout image folder and a tiny method.

They keep the engine tests independent of (and much faster than) the real backbones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reidkit.losses import CenterLoss
from reidkit.methods.base import _METHODS, ReIDMethod, register_method

FAKE_METHOD = "_engine_fake"


def write_market_folder(
    root: Path,
    num_ids: int = 8,
    per_cam: int = 2,
    cams: int = 2,
    size=(32, 16),
    seed: int = 0,
    noise: float = 12.0,
) -> Path:
    """A Market-1501-layout folder ``root/Market-1501-v15.09.15`` with ``num_ids`` train
    identities and ``num_ids`` other test identities; each identity has a distinct colour
    pattern so a model can learn it. Returns ``root``."""
    rng = np.random.default_rng(seed)
    base = root / "Market-1501-v15.09.15"
    h, w = size
    counter = 0

    def write(folder: str, pid: int, cam: int, k: int) -> None:
        nonlocal counter
        counter += 1
        colour = np.array([(pid * 53) % 256, (pid * 97) % 256, (pid * 151) % 256], dtype=np.float64)
        img = np.ones((h, w, 3)) * colour
        img[: h // 2] = 255 - colour  # two-tone "clothes"
        img += rng.normal(0, noise, img.shape)
        path = base / folder / f"{pid:04d}_c{cam + 1}s1_{counter:06d}_{k:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)

    for pid in range(1, num_ids + 1):
        for cam in range(cams):
            for k in range(per_cam):
                write("bounding_box_train", pid, cam, k)
    for pid in range(num_ids + 1, 2 * num_ids + 1):
        write("query", pid, 0, 0)
        for cam in range(cams):
            for k in range(per_cam):
                if cam == 0 and k == 0:
                    continue
                write("bounding_box_test", pid, cam, k)
    return root


class FakeMethod(ReIDMethod):
    """conv-bn-relu x2 -> GAP -> BN1d -> Linear; CE + batch-hard triplet (+ center loss)."""

    def __init__(self, cfg, num_classes: int):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.bottleneck = nn.BatchNorm1d(16)
        self.classifier = nn.Linear(16, num_classes, bias=False)
        self.center_weight = cfg.loss.center_weight
        # a CenterLoss module: the default optimisers give its centres BoT's own SGD
        self.center = CenterLoss(num_classes, 16) if self.center_weight > 0 else None
        self.nan_at_step: int | None = None  # tests: make the loss NaN at this call
        self.calls = 0

    def forward_features(self, images):
        g = self.backbone(images).mean((2, 3))
        return {"pre_bn": g, "post_bn": self.bottleneck(g)}

    def encode(self, batch, role="gallery"):
        return self.forward_features(batch["images"])

    def forward(self, batch):
        f = self.forward_features(batch["images"])
        return {
            "global_feat": f["pre_bn"],
            "bn_feat": f["post_bn"],
            "logits": self.classifier(f["post_bn"]),
        }

    def compute_loss(self, outputs, batch):
        pids = batch["pids"]
        self.calls += 1
        ce = F.cross_entropy(outputs["logits"], pids)
        feat = outputs["global_feat"]
        d = torch.cdist(feat, feat)
        same = pids[:, None] == pids[None, :]
        ap = (d * same).max(1).values
        an = d.masked_fill(same, float("inf")).min(1).values
        losses = {"ce": ce, "triplet": F.relu(ap - an + 0.3).mean()}
        if self.center is not None:
            losses["center"] = self.center_weight * self.center(feat, pids)
        if self.nan_at_step is not None and self.calls >= self.nan_at_step:
            losses["ce"] = losses["ce"] * float("nan")
        return losses

    def classifier_parameters(self):
        return iter([self.classifier.weight])


if FAKE_METHOD not in _METHODS:
    register_method(FAKE_METHOD)(FakeMethod)


def fake_config(root: Path, out: Path, **over):
    """A Config for the fake method on ``write_market_folder(root)``."""
    from reidkit.config import load_config

    items = {
        "model.name": FAKE_METHOD,
        "data.dataset": "market1501",
        "data.root": str(root),
        "data.height": 32,
        "data.width": 16,
        "data.batch_size": 8,
        "data.num_instances": 2,
        "data.test_batch_size": 16,
        "data.num_workers": 0,
        "data.pad": 2,
        "output_dir": str(out),
        "device": "cpu",
        "solver.max_epochs": 4,
        "solver.warmup_epochs": 1,
        "solver.milestones": [2],
        "solver.lr": 0.01,
        "test.eval_period": 2,
        "checkpoint_period": 2,
        "log_period": 1,
    }
    items.update(over)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def brute_force_metrics(dist: np.ndarray, qp, gp, qc, gc) -> tuple[float, float]:
    """mAP and rank-1 of a ``(Q, G)`` distance matrix by a per-query loop (same pid and
    camera excluded): the independent reference for the evaluator in the engine tests."""
    aps, r1 = [], []
    for i in range(dist.shape[0]):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        order = np.argsort(dist[i][keep], kind="stable")
        match = (gp[keep] == qp[i])[order]
        if not match.any():
            continue
        hits = np.flatnonzero(match)
        aps.append(np.mean([(n + 1) / (h + 1) for n, h in enumerate(hits)]))
        r1.append(float(match[0]))
    return float(np.mean(aps)), float(np.mean(r1))
