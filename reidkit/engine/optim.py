"""Optimisers with parameter groups, and learning-rate schedules.

Schedules are pure functions of a (possibly fractional) 0-based epoch index, so a resumed
run recomputes exactly the same learning rates; :class:`LRScheduler` applies them to an
optimiser's parameter groups (each group keeps an ``lr_factor``, e.g. the bias factor).

Conventions (BoT's ``WarmupMultiStepLR``, stepped once per epoch by default):

- warm-up: for ``e < warmup_epochs`` the lr is multiplied by
  ``warmup_factor + (1 - warmup_factor) * e / warmup_epochs`` (``warmup_factor * lr`` at
  epoch 0, ``lr`` at ``warmup_epochs``);
- ``multistep``: multiplied by ``gamma ** (number of milestones <= e)``; milestones are
  0-based epoch indices, so with ``milestones=[40, 70]`` the 41st epoch is the first at
  ``0.1 * lr`` (as in BoT);
- ``cosine``: after the warm-up, ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with
  ``t = (e - warmup_epochs) / (max_epochs - warmup_epochs)``;
- ``constant``: only the warm-up.

``solver.schedule_per_iter=true`` evaluates the same formulas at ``epoch + it / iters``
(smooth warm-up and cosine); the default steps once per epoch like BoT.

The optional classifier-only phase (``solver.classifier_warm_epochs``, CAMA) runs before
the schedule above: its epochs ``0..W-1`` ramp the lr linearly from
``classifier_warm_lr_start`` (first warm epoch) to ``classifier_warm_lr_end`` (last warm
epoch), then the main schedule starts at its own epoch 0.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reidkit.config import SolverConfig

if TYPE_CHECKING:  # pragma: no cover
    from reidkit.config import Config

__all__ = [
    "OptimizerSpec",
    "default_optimizers",
    "constant_lr",
    "warmup_multiplier",
    "lr_at",
    "classifier_warm_lr_at",
    "build_param_groups",
    "build_optimizer",
    "build_aux_optimizer",
    "LRScheduler",
]

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def warmup_multiplier(solver: SolverConfig, epoch: float) -> float:
    """Linear warm-up factor at ``epoch`` (1.0 once ``epoch >= warmup_epochs``)."""
    w = solver.warmup_epochs
    if w <= 0 or epoch >= w:
        return 1.0
    alpha = epoch / w
    return solver.warmup_factor * (1.0 - alpha) + alpha


def lr_at(solver: SolverConfig, epoch: float) -> float:
    """Base learning rate of the main schedule at 0-based ``epoch`` (may be fractional)."""
    if epoch < 0:
        raise ValueError(f"lr_at: epoch must be >= 0, got {epoch}")
    warm = warmup_multiplier(solver, epoch)
    if solver.scheduler == "multistep":
        milestones = sorted(solver.milestones)
        return solver.lr * warm * solver.gamma ** bisect.bisect_right(milestones, epoch)
    if solver.scheduler == "cosine":
        if epoch < solver.warmup_epochs:
            return solver.lr * warm
        span = max(solver.max_epochs - solver.warmup_epochs, 1)
        t = min((epoch - solver.warmup_epochs) / span, 1.0)
        return solver.min_lr + (solver.lr - solver.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if solver.scheduler == "constant":
        return solver.lr * warm
    raise ValueError(f"solver.scheduler: unknown schedule '{solver.scheduler}'")


def classifier_warm_lr_at(solver: SolverConfig, epoch: float) -> float:
    """Learning rate of the classifier-only phase at 0-based ``epoch < classifier_warm_epochs``."""
    w = solver.classifier_warm_epochs
    if w <= 0:
        raise ValueError("classifier_warm_lr_at: solver.classifier_warm_epochs is 0")
    start, end = solver.classifier_warm_lr_start, solver.classifier_warm_lr_end
    if w == 1:
        return end
    alpha = min(max(epoch / (w - 1), 0.0), 1.0)
    return start + (end - start) * alpha


def _norm_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def build_param_groups(
    model: nn.Module,
    solver: SolverConfig,
    params: Iterable[nn.Parameter] | None = None,
    exclude: Iterable[nn.Parameter] = (),
) -> list[dict]:
    """Parameter groups with per-group ``lr_factor`` and ``weight_decay``.

    - biases: lr x ``solver.bias_lr_factor``, weight decay ``solver.weight_decay_bias``
      (default: ``solver.weight_decay``);
    - normalisation weights (BN/GN/LN/IN): weight decay ``solver.weight_decay_norm``
      (default: ``solver.weight_decay``);
    - everything else: ``solver.lr``, ``solver.weight_decay``.

    ``params`` restricts the groups to a subset (e.g. the classifier); ``exclude`` removes
    parameters that have their own optimiser (center-loss centres). Frozen parameters
    (``requires_grad=False``) are skipped.
    """
    allowed = None if params is None else {id(p) for p in params}
    excluded = {id(p) for p in exclude}
    norm_ids = _norm_param_ids(model)
    wd = solver.weight_decay
    wd_bias = wd if solver.weight_decay_bias is None else solver.weight_decay_bias
    wd_norm = wd if solver.weight_decay_norm is None else solver.weight_decay_norm
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in excluded or id(p) in seen:
            continue
        if allowed is not None and id(p) not in allowed:
            continue
        seen.add(id(p))
        if name.endswith("bias"):
            key, factor, decay = "bias", solver.bias_lr_factor, wd_bias
        elif id(p) in norm_ids:
            key, factor, decay = "norm", 1.0, wd_norm
        else:
            key, factor, decay = "weight", 1.0, wd
        group = groups.setdefault(
            key,
            {"params": [], "group_name": key, "lr_factor": float(factor), "weight_decay": decay},
        )
        group["params"].append(p)
    if allowed is not None and len(seen) != len(allowed - excluded):
        # classifier parameters that are frozen are ignored; unknown ones are an error
        names = {id(p) for p in model.parameters()}
        stray = [pid for pid in allowed if pid not in names]
        if stray:
            raise ValueError(
                f"build_param_groups: {len(stray)} parameter(s) passed in `params` do not belong to the model"
            )
    out = [g for g in (groups.get("weight"), groups.get("norm"), groups.get("bias")) if g]
    for g in out:
        g["lr"] = solver.lr * g["lr_factor"]
    return out


def build_optimizer(param_groups: list[dict], solver: SolverConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over ``param_groups`` (see :func:`build_param_groups`)."""
    if not param_groups:
        raise ValueError("build_optimizer: no trainable parameters")
    if solver.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=solver.lr, amsgrad=solver.amsgrad)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=solver.lr, amsgrad=solver.amsgrad)
    if solver.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=solver.lr, momentum=solver.momentum)
    raise ValueError(f"solver.optimizer: unknown optimiser '{solver.optimizer}'")


def build_aux_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
    """Plain SGD for auxiliary parameters (center-loss centres, BoT: lr 0.5); None if empty."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    return torch.optim.SGD(params, lr=lr)


class LRScheduler:
    """Sets ``group["lr"] = lr_fn(epoch) * group["lr_factor"]`` for every group.

    ``lr_fn`` maps a (fractional) 0-based epoch to the base lr, e.g.
    ``functools.partial(lr_at, solver)``. The state is just the last epoch set, so the
    scheduler is trivially resumable.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_fn: Callable[[float], float]):
        self.optimizer = optimizer
        self.lr_fn = lr_fn
        self.last_epoch: float = -1.0

    def set_epoch(self, epoch: float) -> float:
        lr = float(self.lr_fn(epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)
        self.last_epoch = float(epoch)
        return lr

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = float(state["last_epoch"])
        if self.last_epoch >= 0:
            self.set_epoch(self.last_epoch)


# ------------------------------------------------------------------ named optimisers
@dataclass
class OptimizerSpec:
    """A named optimiser of a method, as the trainer steps it.

    Attributes:
        optimizer: the torch optimiser (its groups may carry ``lr_factor``).
        lr_fn: base learning rate at a (fractional) epoch *of its phase*:
            ``lr_fn(epoch - start_epoch)``.
        start_epoch, end_epoch: the global epochs ``[start, end)`` in which it is active
            (``end_epoch=None``: to the end). Inactive optimisers are not stepped.
        grad_scale: gradients are multiplied by this before the step (BoT's center loss
            undoes its loss weight with ``1 / center_weight``).
        clip_grad: ``solver.grad_clip`` applies to its parameters.
        default: stepped by the default ``train_step`` (a GAN's ``train_step`` steps its
            optimisers itself and may mark them ``default=False``).
    """

    optimizer: torch.optim.Optimizer
    lr_fn: Callable[[float], float]
    start_epoch: int = 0
    end_epoch: int | None = None
    grad_scale: float = 1.0
    clip_grad: bool = True
    default: bool = True

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def constant_lr(lr: float, epoch: float) -> float:
    """A schedule that is always ``lr`` (``functools.partial(constant_lr, lr)``)."""
    return lr


def default_optimizers(model: Any, cfg: Config) -> dict[str, OptimizerSpec]:
    """The default named optimisers of a method (see ``ReIDMethod.optimizers``).

    ``main``: ``solver`` optimiser over all trainable parameters except center-loss
    centres, with :func:`lr_at`, active from epoch ``W = solver.classifier_warm_epochs``;
    ``warm`` (``W > 0``): the classifier parameters with :func:`classifier_warm_lr_at`
    for epochs ``0..W-1`` (weight decay ``solver.classifier_warm_weight_decay``, default
    ``solver.weight_decay``); ``center`` (center loss configured): SGD at
    ``loss.center_lr``, gradients rescaled by ``1 / loss.center_weight``, active with main.
    """
    from reidkit.losses.center import CenterLoss

    solver = cfg.solver
    warm = solver.classifier_warm_epochs
    centers = [
        p
        for m in model.modules()
        if isinstance(m, CenterLoss)
        for p in m.parameters()
        if p.requires_grad
    ]
    specs: dict[str, OptimizerSpec] = {}
    if warm > 0:
        params = [p for p in model.classifier_parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"solver.classifier_warm_epochs={warm} but {type(model).__name__}."
                "classifier_parameters() is empty"
            )
        warm_solver = solver
        if solver.classifier_warm_weight_decay is not None:
            warm_solver = solver.model_copy(
                update={"weight_decay": solver.classifier_warm_weight_decay}
            )
        specs["warm"] = OptimizerSpec(
            build_optimizer(
                build_param_groups(model, warm_solver, params=params, exclude=centers),
                warm_solver,
            ),
            functools.partial(classifier_warm_lr_at, solver),
            start_epoch=0,
            end_epoch=warm,
        )
    specs["main"] = OptimizerSpec(
        build_optimizer(build_param_groups(model, solver, exclude=centers), solver),
        functools.partial(lr_at, solver),
        start_epoch=warm,
    )
    center_opt = build_aux_optimizer(centers, cfg.loss.center_lr)
    if center_opt is not None:
        weight = cfg.loss.center_weight
        specs["center"] = OptimizerSpec(
            center_opt,
            functools.partial(constant_lr, cfg.loss.center_lr),
            start_epoch=warm,
            grad_scale=1.0 / weight if weight > 0 else 1.0,
            clip_grad=False,
        )
    return specs
