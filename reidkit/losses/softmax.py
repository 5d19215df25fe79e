"""Identity (classification) loss: cross entropy with label smoothing (BoT).

With ``N`` classes and smoothing ``epsilon`` the target distribution is
``q = (1 - epsilon) * onehot(y) + epsilon / N`` and the loss is
``mean_b sum_c -q_bc log softmax(logits)_bc`` (Szegedy et al. 2016; BoT, Luo et al. 2019).
``epsilon = 0`` is the ordinary cross entropy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "cross_entropy_label_smooth",
    "CrossEntropyLabelSmooth",
    "check_targets",
    "to_float",
    "full_precision",
]


def full_precision(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a loss with autocast disabled (inputs are upcast by :func:`to_float` inside).

    Distances and logits of metric losses lose too much precision in fp16/bf16
    (``||x||^2 + ||y||^2 - 2 x.y`` cancels), so losses always compute in float32 even
    inside an AMP region.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (AMP) tensors to float32; float32/float64 are kept as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Validate ``logits (B, C)`` and integer ``targets (B,)`` with clear messages."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, num_classes), got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be (B,) with B={logits.shape[0]}, got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point:
        raise TypeError(f"targets must be integer class ids, got dtype {targets.dtype}")


@full_precision
def cross_entropy_label_smooth(
    logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1
) -> torch.Tensor:
    """Label-smoothed cross entropy.

    Args:
        logits: ``(B, C)`` unnormalised scores.
        targets: ``(B,)`` class ids in ``[0, C)``.
        epsilon: smoothing in ``[0, 1)``; the target is ``(1-eps) onehot + eps / C``.

    Returns:
        Scalar: mean over the batch. Computed in float32.
    """
    check_targets(logits, targets)
    if not 0 <= epsilon < 1:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    log_probs = F.log_softmax(to_float(logits), dim=1)
    nll = -log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)  # (B,)
    if epsilon == 0:
        return nll.mean()
    uniform = -log_probs.mean(dim=1)  # (B,) = sum_c -(1/C) log p_c
    return ((1 - epsilon) * nll + epsilon * uniform).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """Module form of :func:`cross_entropy_label_smooth`: ``(logits (B, C), targets (B,))``."""

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_label_smooth(logits, targets, self.epsilon)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"
