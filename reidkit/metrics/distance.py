"""Pairwise distances between query and gallery features.

Every function here returns *distances* (smaller = more similar):

- ``"euclidean"``: the true Euclidean distance ``||q - g||_2`` (not squared),
- ``"sqeuclidean"``: the squared Euclidean distance ``||q - g||_2^2``,
- ``"cosine"``: ``1 - cos(q, g)`` in ``[0, 2]``; features are L2-normalised inside, so
  unnormalised features are fine.

Inputs may be numpy arrays or torch tensors on any device; the result is a torch tensor
on the device of ``gf``. Half / bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from ..threads import bounded_threads

__all__ = ["Metric", "METRICS", "GalleryDistance", "as_tensor", "compute_distance", "l2_normalize"]

Metric = Literal["euclidean", "sqeuclidean", "cosine"]
METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean", "cosine")


def as_tensor(
    x: np.ndarray | torch.Tensor | Any, name: str, device: torch.device | None = None
) -> torch.Tensor:
    """Convert ``x`` (numpy array, torch tensor or sequence) to a torch tensor.

    Args:
        x: the input.
        name: the argument's name, used in error messages.
        device: move the result there when given.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
            raise TypeError(
                f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}"
            ) from exc
    if device is not None:
        t = t.to(device)
    return t


def _float_features(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if t.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D (N, D) feature matrix, got shape {tuple(t.shape)}"
        )
    if not torch.is_floating_point(t):
        t = t.float()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalisation of an ``(N, D)`` tensor (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


class GalleryDistance:
    """Distances from blocks of queries to a fixed gallery, without copying the gallery.

    Precomputes the gallery norms once, so computing ``(n, G)`` blocks for many query
    chunks costs one matrix product each and no ``(G, D)`` temporary.

    Args:
        gf: ``(G, D)`` gallery features.
        metric: ``"euclidean"`` (true, not squared), ``"sqeuclidean"`` or ``"cosine"``.
    """

    def __init__(self, gf: np.ndarray | torch.Tensor, metric: Metric = "euclidean") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.g = _float_features(gf, "gf")
        self.metric = metric
        norm = torch.linalg.vector_norm(self.g, dim=1)
        if metric == "cosine":
            self.g_scale = 1.0 / norm.clamp_min(1e-12)
        else:
            self.g_scale = norm.square()

    def __call__(self, qf: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(n, G)`` distances of ``(n, D)`` query features (on the gallery's device)."""
        q = _float_features(qf, "qf")
        if q.shape[1] != self.g.shape[1]:
            raise ValueError(
                f"qf has feature dimension {q.shape[1]} but gf has {self.g.shape[1]}; they must match"
            )
        dtype = torch.promote_types(q.dtype, self.g.dtype)
        q = q.to(device=self.g.device, dtype=dtype)
        g = self.g.to(dtype)
        scale = self.g_scale.to(dtype)
        if self.metric == "cosine":
            sim = (l2_normalize(q) @ g.T).mul_(scale[None, :])
            return sim.neg_().add_(1.0)
        # ||q||^2 + ||g||^2 - 2 q.g, clamped at 0 against rounding.
        d = torch.linalg.vector_norm(q, dim=1, keepdim=True).square() + scale[None, :]
        d = d.addmm_(q, g.T, alpha=-2.0).clamp_min_(0.0)
        return d.sqrt_() if self.metric == "euclidean" else d


@bounded_threads
def compute_distance(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    metric: Metric = "euclidean",
) -> torch.Tensor:
    """Distance matrix between query and gallery features.

    Args:
        qf: ``(Q, D)`` query features.
        gf: ``(G, D)`` gallery features.
        metric: ``"euclidean"`` (true, not squared), ``"sqeuclidean"`` or ``"cosine"``
            (``1 - cosine similarity``).

    Returns:
        ``(Q, G)`` float tensor of distances on ``gf``'s device (float64 if either input
        is float64, else float32).
    """
    return GalleryDistance(gf, metric)(qf)
