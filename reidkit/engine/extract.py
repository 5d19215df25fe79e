"""Batched feature extraction with flip test-time augmentation, and saved feature sets."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureSet", "extract_features", "autocast_context"]

_FORMAT = "reidkit.FeatureSet/1"


@dataclass
class FeatureSet:
    """Features of an ordered image list.

    ``feats``: (N, D) float32; ``pids``, ``camids``: (N,) int64; ``paths``: N strings.
    """

    feats: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.feats.shape[0]
        if self.feats.dim() != 2:
            raise ValueError(f"FeatureSet.feats: expected (N, D), got {tuple(self.feats.shape)}")
        if self.pids.shape != (n,) or self.camids.shape != (n,):
            raise ValueError(
                f"FeatureSet: pids {tuple(self.pids.shape)} / camids {tuple(self.camids.shape)} "
                f"must be ({n},) like feats"
            )
        if self.paths and len(self.paths) != n:
            raise ValueError(f"FeatureSet: {len(self.paths)} paths for {n} features")

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    def to(self, device: str | torch.device) -> FeatureSet:
        return FeatureSet(
            self.feats.to(device), self.pids.to(device), self.camids.to(device), self.paths
        )

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        return path, path.with_suffix(".json")

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (feats, pids, camids) and a ``.json`` sidecar (paths).

        Returns the ``.safetensors`` path.
        """
        from safetensors.torch import save_file

        tensor_path, meta_path = self._paths(path)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "feats": self.feats.detach().float().cpu().contiguous(),
                "pids": self.pids.detach().long().cpu().contiguous(),
                "camids": self.camids.detach().long().cpu().contiguous(),
            },
            str(tensor_path),
            metadata={"format": _FORMAT},
        )
        meta = {"format": _FORMAT, "num": len(self), "dim": self.dim, "paths": list(self.paths)}
        meta_path.write_text(json.dumps(meta))
        return tensor_path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read a set written by :meth:`save` (``path`` with or without ``.safetensors``)."""
        from safetensors.torch import load_file

        tensor_path, meta_path = cls._paths(path)
        if not tensor_path.is_file():
            raise FileNotFoundError(f"feature file not found: {tensor_path}")
        tensors = load_file(str(tensor_path))
        missing = {"feats", "pids", "camids"} - set(tensors)
        if missing:
            raise ValueError(f"{tensor_path}: missing tensors {sorted(missing)}")
        paths: list[str] = []
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            paths = list(meta.get("paths", []))
        return cls(tensors["feats"], tensors["pids"], tensors["camids"], paths)


def autocast_context(device: torch.device, amp: str = "off"):
    """``torch.autocast`` for ``amp`` in {bf16, fp16} on CUDA; a no-op otherwise."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type="cuda", dtype=dtype)


def _select_feature(model: nn.Module, images: torch.Tensor, feature: str) -> torch.Tensor:
    if hasattr(model, "forward_features"):
        feats = model.forward_features(images)
        if isinstance(feats, dict):
            if feature not in feats:
                raise ValueError(
                    f"test.feature: '{feature}' is not produced by {type(model).__name__}."
                    f"forward_features (available: {', '.join(sorted(feats))})"
                )
            return feats[feature]
        return feats
    return model(images)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[dict],
    device: str | torch.device,
    flip: bool = False,
    feature: str = "post_bn",
    normalize: bool = True,
    amp: str = "off",
    channels_last: bool = False,
    progress: bool = False,
) -> FeatureSet:
    """Features of every image yielded by ``loader`` (batch dicts with ``images`` (B,3,H,W),
    ``pids``, ``camids``, ``paths``), in loader order.

    ``flip``: average of the features of the image and its horizontal flip (computed in
    one forward of 2B images). ``feature``: key of ``model.forward_features`` (``post_bn``
    or ``pre_bn``); models without ``forward_features`` use ``model(images)``.
    ``normalize``: L2-normalise the (averaged) feature. Returns float32 features on CPU.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, pids, camids, paths = [], [], [], []
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="extract", leave=False, dynamic_ncols=True)
    try:
        for batch in iterator:
            images = batch["images"].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            b = images.shape[0]
            with autocast_context(device, amp):
                if flip:
                    f = _select_feature(model, torch.cat([images, images.flip(3)], 0), feature)
                    f = f.float()
                    f = (f[:b] + f[b:]) / 2
                else:
                    f = _select_feature(model, images, feature).float()
            if f.dim() != 2 or f.shape[0] != b:
                raise ValueError(
                    f"extract_features: model returned {tuple(f.shape)}, expected ({b}, D)"
                )
            if normalize:
                f = F.normalize(f, dim=1)
            feats.append(f)
            pids.append(torch.as_tensor(batch["pids"]).long())
            camids.append(torch.as_tensor(batch["camids"]).long())
            paths.extend(str(p) for p in batch.get("paths", []))
    finally:
        model.train(was_training)
    if not feats:
        return FeatureSet(
            torch.zeros(0, 0),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            [],
        )
    return FeatureSet(torch.cat(feats).cpu(), torch.cat(pids).cpu(), torch.cat(camids).cpu(), paths)
