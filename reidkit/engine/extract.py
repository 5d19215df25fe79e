"""Batched feature extraction with flip test-time augmentation, and saved feature sets."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureSet", "extract_features", "autocast_context", "flip_batch"]

_FORMAT = "reidkit.FeatureSet/1"


@dataclass
class FeatureSet:
    """Features of an ordered list of images (or tracklets).

    ``feats``: (N, D) float32 vectors; ``pids``, ``camids``: (N,) int64; ``paths``: N
    strings; ``extras``: other per-item tensors a method keeps for its own scoring
    (``{name: (N, ...)}``, e.g. feature maps for pairwise re-scoring; float16 /
    bfloat16 extras keep their precision, other floating extras are float32).
    """

    feats: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    paths: list[str] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

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
        for name, t in self.extras.items():
            if t.shape[:1] != (n,):
                raise ValueError(
                    f"FeatureSet.extras['{name}']: first dimension {tuple(t.shape)[:1]} must be {n}"
                )

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    def __getitem__(self, index: slice) -> FeatureSet:
        """A contiguous slice (e.g. a chunk of queries), extras included."""
        if not isinstance(index, slice):
            raise TypeError("FeatureSet supports slicing only (fs[a:b])")
        return FeatureSet(
            self.feats[index],
            self.pids[index],
            self.camids[index],
            self.paths[index] if self.paths else [],
            {k: v[index] for k, v in self.extras.items()},
        )

    def to(self, device: str | torch.device) -> FeatureSet:
        return FeatureSet(
            self.feats.to(device),
            self.pids.to(device),
            self.camids.to(device),
            self.paths,
            {k: v.to(device) for k, v in self.extras.items()},
        )

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        return path, path.with_suffix(".json")

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (feats, pids, camids, ``extra.<name>``) and a ``.json``
        sidecar (paths). Returns the ``.safetensors`` path."""
        from safetensors.torch import save_file

        tensor_path, meta_path = self._paths(path)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "feats": self.feats.detach().float().cpu().contiguous(),
            "pids": self.pids.detach().long().cpu().contiguous(),
            "camids": self.camids.detach().long().cpu().contiguous(),
        }
        for name, t in self.extras.items():
            tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tensor_path), metadata={"format": _FORMAT})
        meta = {"format": _FORMAT, "num": len(self), "dim": self.dim, "paths": list(self.paths)}
        meta_path.write_text(json.dumps(meta))
        return tensor_path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read a set written by :meth:`save` (``path`` with or without ``.safetensors``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        tensor_path, meta_path = cls._paths(path)
        if not tensor_path.is_file():
            raise FileNotFoundError(f"feature file not found: {tensor_path}")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{tensor_path}: not a readable safetensors file ({exc})") from exc
        missing = {"feats", "pids", "camids"} - set(tensors)
        if missing:
            raise ValueError(f"{tensor_path}: missing tensors {sorted(missing)}")
        paths: list[str] = []
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            paths = list(meta.get("paths", []))
        extras = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(tensors["feats"], tensors["pids"], tensors["camids"], paths, extras)


def autocast_context(device: torch.device, amp: str = "off"):
    """``torch.autocast`` for ``amp`` in {bf16, fp16} on CUDA; a no-op otherwise."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type="cuda", dtype=dtype)


def flip_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with images (B, 3, H, W) or clips (B, T, 3, H, W) mirrored left-right and,
    when present, pixel keypoints mirrored too (x -> W - x, left/right COCO swapped)."""
    out = dict(batch)
    width = None
    for key in ("images", "clips"):
        if isinstance(batch.get(key), torch.Tensor):
            out[key] = batch[key].flip(-1)
            width = batch[key].shape[-1]
    kp = batch.get("keypoints")
    if isinstance(kp, torch.Tensor) and width is not None:
        from reidkit.data.transforms import flip_keypoints

        out["keypoints"] = flip_keypoints(kp, width)
    return out


def _concat(a: dict[str, Any], b: dict[str, Any], size: int) -> dict[str, Any]:
    """Two batches as one (tensors with a leading batch dimension are concatenated)."""
    out: dict[str, Any] = {}
    for key, value in a.items():
        other = b.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = torch.cat([value, other], 0)
        elif isinstance(value, list) and len(value) == size:
            out[key] = value + list(other)
        else:
            out[key] = value
    return out


def _encode(model: nn.Module, batch: dict[str, Any], role: str) -> dict[str, torch.Tensor]:
    """``model.encode(batch, role)`` for reidkit methods; plain modules (tests, user code)
    fall back to ``forward_features(images)`` (a dict) or ``model(images)`` (``"feat"``)."""
    if hasattr(model, "encode"):
        return model.encode(batch, role)
    images = batch["images"]
    if hasattr(model, "forward_features"):
        out = model.forward_features(images)
        if isinstance(out, dict):
            return out
        return {"feat": out}
    return {"feat": model(images)}


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
    role: str = "gallery",
    keep: Sequence[str] | None = None,
) -> FeatureSet:
    """Features of every item yielded by ``loader`` (batch dicts with ``images``
    (B, 3, H, W) or ``clips``, ``pids``, ``camids``, ``paths``), in loader order.

    The model's ``encode(batch, role)`` gives the vectors; ``feature`` picks one of them
    (``test.feature``; a model with a single output uses it whatever the name).
    ``flip``: average with the horizontally flipped batch (one forward of 2B items).
    ``normalize``: L2-normalise the (averaged) vector. ``keep``: other ``encode`` outputs
    stored in ``FeatureSet.extras`` (default: the model's ``keep_for_eval``; from the
    unflipped items; float16 / bfloat16 extras keep their precision). Returns tensors on
    CPU (vectors in float32).
    """
    device = torch.device(device)
    keep = tuple(getattr(model, "keep_for_eval", ()) if keep is None else keep)
    was_training = model.training
    model.eval()
    feats, pids, camids, paths = [], [], [], []
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in keep}
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc=f"extract {role}", leave=False, dynamic_ncols=True)
    prepare = getattr(loader, "prepare", None)
    try:
        for batch in iterator:
            if prepare is not None:
                batch = prepare(batch, device)
            else:
                batch = {
                    k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                }
            if channels_last and isinstance(batch.get("images"), torch.Tensor):
                batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
            b = len(batch["pids"])
            with autocast_context(device, amp):
                run = _concat(batch, flip_batch(batch), b) if flip else batch
                out = _encode(model, run, role)
            f = _pick(out, feature, model).float()
            if f.dim() != 2 or f.shape[0] != (2 * b if flip else b):
                raise ValueError(
                    f"extract_features: {type(model).__name__} returned {tuple(f.shape)} for "
                    f"'{feature}', expected ({b}, D)"
                )
            if flip:
                f = (f[:b] + f[b:]) / 2
            if normalize:
                f = F.normalize(f, dim=1)
            feats.append(f.cpu())
            for k in keep:
                if k not in out:
                    raise ValueError(
                        f"extract_features: {type(model).__name__}.encode gave no '{k}' "
                        f"(keep_for_eval); it returned {sorted(out)}"
                    )
                kept[k].append(_kept_tensor(out[k][:b]))
            pids.append(torch.as_tensor(batch["pids"]).long().cpu())
            camids.append(torch.as_tensor(batch["camids"]).long().cpu())
            paths.extend(_path_str(p) for p in batch.get("paths", []))
    finally:
        model.train(was_training)
    if not feats:
        return FeatureSet(
            torch.zeros(0, 0),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            [],
        )
    return FeatureSet(
        torch.cat(feats),
        torch.cat(pids),
        torch.cat(camids),
        paths,
        {k: torch.cat(v) for k, v in kept.items()},
    )


def _kept_tensor(t: torch.Tensor) -> torch.Tensor:
    """An extra for ``FeatureSet.extras`` on CPU: float16 / bfloat16 stay as the method
    returned them (a method stores large maps at reduced precision on purpose, e.g. CAN's
    ``can_map``), other floating types become float32."""
    t = t.detach()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.cpu()


def _path_str(p: Any) -> str:
    # a tracklet's path is its list of frames: the first frame names it
    if isinstance(p, (list, tuple)):
        return str(p[0]) if p else ""
    return str(p)


def _pick(out: dict[str, torch.Tensor], feature: str, model: nn.Module) -> torch.Tensor:
    if not isinstance(out, dict):
        raise TypeError(f"{type(model).__name__}.encode must return a dict of tensors")
    if feature in out:
        return out[feature]
    names = tuple(getattr(model, "feature_names", ()))
    vectors = [k for k in out if k in names] if names else [k for k in out if out[k].dim() == 2]
    if len(out) == 1 or (len(vectors) == 1 and feature not in names):
        return out[vectors[0] if vectors else next(iter(out))]
    raise ValueError(
        f"test.feature: '{feature}' is not produced by {type(model).__name__} "
        f"(available: {', '.join(sorted(out))})"
    )
