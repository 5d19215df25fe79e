"""A clip re-ID network small enough for the VRSTC tests (frame maps + BN + classifier),
registered as ``_vrstc_tiny_clip``, and a helper that saves it as a reidkit checkpoint
(the form of a trained temporal baseline: embedded config and ``num_classes``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.config import config_to_dict, load_config
from reidkit.methods.base import _METHODS, ReIDMethod, register_method

TINY_CLIP = "_vrstc_tiny_clip"


class TinyClipNet(ReIDMethod):
    """conv-BN-ReLU x2 per frame, temporal mean, BN, classifier."""

    requires = frozenset({"clips"})
    eval_requires = frozenset({"clips"})

    def __init__(self, cfg, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, 2, 1)
        )
        self.bn = nn.BatchNorm1d(8)
        self.classifier = nn.Linear(8, max(1, num_classes), bias=False)

    def frame_maps(self, clips):
        b, t = clips.shape[:2]
        return self.backbone(clips.flatten(0, 1)).unflatten(0, (b, t))

    def forward(self, batch):
        f = self.frame_maps(batch["clips"]).mean((3, 4))
        m = batch["clip_mask"].float()[..., None]
        v = (f * m).sum(1) / m.sum(1).clamp(min=1)
        return {"global_feat": v, "logits": self.classifier(self.bn(v))}

    def compute_loss(self, outputs, batch):
        return {"ce": F.cross_entropy(outputs["logits"], batch["pids"])}

    def encode(self, batch, role="gallery"):
        f = self.frame_maps(batch["clips"]).mean((3, 4))
        return {"pre_bn": f, "post_bn": f}


if TINY_CLIP not in _METHODS:
    register_method(TINY_CLIP)(TinyClipNet)


def save_tiny_clip_net(
    path: Path, num_classes: int = 5, height: int = 16, width: int = 8, seed: int = 0, **data
) -> Path:
    """An (untrained) :class:`TinyClipNet` checkpoint with its config."""
    over = [f"model.name={TINY_CLIP}", f"data.height={height}", f"data.width={width}"]
    over += [f"data.{k}={v}" for k, v in data.items()]
    cfg = load_config(None, over)
    torch.manual_seed(seed)
    net = TinyClipNet(cfg, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"config": config_to_dict(cfg), "num_classes": num_classes, "model": net.state_dict()},
        path,
    )
    return path
