"""The step context: what a method's ``train_step`` uses to run one optimisation step.

The engine owns the mechanics (DDP and ``torch.compile`` wrappers, autocast, the AMP
grad scaler, gradient clipping, the non-finite loss check, the named optimisers and
their schedules); the method owns the order of things. The default
``ReIDMethod.train_step`` is::

    outputs = ctx.forward(batch)                 # wrap(method)(batch) under autocast, fp32 out
    losses = method.compute_loss(outputs, batch)
    ctx.step(losses)                             # every default optimiser active this epoch

and a GAN alternates (VRSTC)::

    d_losses = ...;  ctx.step(d_losses, optimizers=["d"])
    g_losses = ...;  ctx.step(g_losses, optimizers=["g"])

Each :meth:`StepContext.step` checks the summed loss (all-reduced under DDP) *before*
the backward pass and raises :class:`NonFiniteLossError` naming the epoch, iteration and
terms, so the weights and the last checkpoint stay intact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from reidkit.engine.extract import autocast_context
from reidkit.engine.optim import LRScheduler, OptimizerSpec

__all__ = ["StepContext", "NonFiniteLossError", "cast_float"]


class NonFiniteLossError(RuntimeError):
    """The summed loss became NaN/inf; the message names the epoch, iteration and terms."""


def cast_float(obj: Any) -> Any:
    """Floating tensors (possibly nested in dicts/lists) to float32 for the loss."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: cast_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_float(v) for v in obj)
    return obj


class StepContext:
    """Runs forward / backward / optimiser steps for the trainer.

    Args:
        model: the method (unwrapped).
        optimizers: the method's named :class:`OptimizerSpec` s.
        device: training device.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` (autocast on CUDA; fp16 uses a grad scaler).
        grad_clip: max gradient norm (``solver.grad_clip``) or None.
        distributed: wrap modules in DDP in :meth:`wrap`.
        compile: wrap modules in ``torch.compile`` in :meth:`wrap`.
        channels_last: images / clips go channels-last in :meth:`forward`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Mapping[str, OptimizerSpec],
        device: torch.device,
        amp: str = "off",
        grad_clip: float | None = None,
        distributed: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        if not optimizers:
            raise ValueError(f"{type(model).__name__}.optimizers() returned no optimiser")
        self.model = model
        self.optimizers = dict(optimizers)
        self.schedulers = {
            name: LRScheduler(spec.optimizer, spec.lr_fn) for name, spec in self.optimizers.items()
        }
        self.device = device
        self.amp = amp
        self.grad_clip = grad_clip
        self.distributed = distributed
        self.compile = compile
        self.channels_last = channels_last
        self.use_scaler = amp == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.epoch = 0
        self.iteration = 0
        self.num_iterations = 0
        self.total_epochs = 0
        self.global_step = 0
        self.stats: dict[str, float] = {}
        self._wrapped: dict[int, nn.Module] = {}

    # ------------------------------------------------------------------ modules
    def wrap(self, module: nn.Module | None = None) -> nn.Module:
        """``module`` (default: the method) wrapped for this run: DDP when distributed,
        ``torch.compile`` when configured. Cached until :meth:`invalidate`."""
        module = self.model if module is None else module
        key = id(module)
        if key not in self._wrapped:
            net: nn.Module = module
            if self.distributed and any(p.requires_grad for p in module.parameters()):
                net = nn.parallel.DistributedDataParallel(
                    module, device_ids=[self.device.index] if self.device.type == "cuda" else None
                )
            if self.compile:
                net = torch.compile(net)
            self._wrapped[key] = net
        return self._wrapped[key]

    def invalidate(self) -> None:
        """Drop cached wrappers (the trainable parameter set changed, e.g. a freeze hook)."""
        self._wrapped.clear()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast context (a no-op without AMP or off CUDA)."""
        return autocast_context(self.device, self.amp)

    def forward(self, batch: Mapping[str, Any], module: nn.Module | None = None) -> Any:
        """``wrap(module)(batch)`` under autocast, floating outputs cast to float32."""
        batch = dict(batch)
        if self.channels_last:
            for key in ("images",):
                if isinstance(batch.get(key), torch.Tensor) and batch[key].dim() == 4:
                    batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
        with self.autocast():
            outputs = self.wrap(module)(batch)
        return cast_float(outputs)

    # -------------------------------------------------------------- optimisers
    def active(self, default_only: bool = True) -> list[str]:
        """Names of the optimisers active in the current epoch (default ones only)."""
        return [
            n
            for n, s in self.optimizers.items()
            if s.active(self.epoch) and (s.default or not default_only)
        ]

    def set_lr(self, fraction: float = 0.0) -> float:
        """Apply every active optimiser's schedule at ``epoch + fraction`` (of its phase);
        returns the lr of ``main`` (or of the first active optimiser)."""
        lr = float("nan")
        for name, spec in self.optimizers.items():
            if spec.active(self.epoch):
                value = self.schedulers[name].set_epoch(self.epoch - spec.start_epoch + fraction)
                if name == "main" or math.isnan(lr):
                    lr = value
        return lr

    def step(
        self,
        losses: Mapping[str, torch.Tensor],
        optimizers: Sequence[str] | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Backward of ``sum(losses)`` and a step of ``optimizers`` (default: every default
        optimiser active this epoch). ``extras`` (e.g. accuracy) are averaged over ranks
        and recorded with the loss terms in :attr:`stats`. Returns the summed loss."""
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError(
                f"{type(self.model).__name__}: the loss must be a non-empty dict of scalar terms"
            )
        names = list(self.active()) if optimizers is None else list(optimizers)
        unknown = [n for n in names if n not in self.optimizers]
        if unknown:
            raise KeyError(f"step: unknown optimiser(s) {unknown} (have {list(self.optimizers)})")
        if not names:
            raise RuntimeError(f"step: no optimiser is active in epoch {self.epoch + 1}")
        total = sum(losses.values())
        extras = dict(extras or {})
        stats = torch.stack(
            [total.detach().float().reshape(())]
            + [v.detach().float().reshape(()) for v in losses.values()]
            + [
                torch.as_tensor(v, device=total.device).detach().float().reshape(())
                for v in extras.values()
            ]
        )
        if self.distributed:
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        values = stats.tolist()
        if not math.isfinite(values[0]):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, values[1:]))
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch + 1}/{self.total_epochs}, iteration "
                f"{self.iteration + 1}/{self.num_iterations} (global step {self.global_step}): "
                f"total={values[0]}, {terms}."
            )
        self.stats["loss"] = self.stats.get("loss", 0.0) + values[0]
        for key, value in zip([*losses, *extras], values[1:]):
            self.stats[key] = value
        self.model.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        for name in names:
            spec = self.optimizers[name]
            opt = spec.optimizer
            clip = self.grad_clip is not None and spec.clip_grad
            if clip or spec.grad_scale != 1.0:
                self.scaler.unscale_(opt)
            if spec.grad_scale != 1.0:
                for p in spec.params():
                    if p.grad is not None:
                        p.grad.mul_(spec.grad_scale)
            if clip:
                torch.nn.utils.clip_grad_norm_(spec.params(), self.grad_clip)
            self.scaler.step(opt)
        return total

    def begin_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self.stats = {}

    def end_iteration(self) -> dict[str, float]:
        """Finish the iteration (AMP scaler update); returns the recorded stats."""
        self.scaler.update()
        self.global_step += 1
        return dict(self.stats)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {n: s.optimizer.state_dict() for n, s in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict() if self.use_scaler else None,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        saved = set(state.get("optimizers", {}))
        mine = set(self.optimizers)
        if saved != mine:
            raise ValueError(
                f"{source}: the checkpoint has optimisers {sorted(saved)}, the method now has "
                f"{sorted(mine)} (was the config changed?)"
            )
        for name, spec in self.optimizers.items():
            spec.optimizer.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        if state.get("scaler") and self.use_scaler:
            self.scaler.load_state_dict(state["scaler"])


def parameters_of(specs: Iterable[OptimizerSpec]) -> list[nn.Parameter]:
    """All parameters of the given optimiser specs (each once)."""
    seen: set[int] = set()
    out = []
    for spec in specs:
        for p in spec.params():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
