"""Trainer hooks (fast-reid style): logging, evaluation, checkpointing, freezing phases.

A hook sees the :class:`~reidkit.engine.trainer.Trainer` (``self.trainer``) and is called
around epochs and steps. The trainer runs, per epoch::

    before_epoch  ->  (train_step, after_step) x iterations  ->  after_epoch

Hooks run in list order: the method's own hooks (e.g. :class:`FreezeHook`) first, then
:class:`LoggerHook`, :class:`EvalHook` and :class:`CheckpointHook` (the checkpoint records
what evaluation found). A hook with state (the best mAP so far) stores it through
``state_dict`` / ``load_state_dict``; the checkpoint keeps it under the hook's ``name``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reidkit.engine.log import format_duration

if TYPE_CHECKING:  # pragma: no cover
    from reidkit.engine.trainer import Trainer

__all__ = ["HookBase", "FreezeHook", "LoggerHook", "EvalHook", "CheckpointHook"]


class HookBase:
    """No-op hook; override what you need. ``name`` keys the hook's checkpoint state."""

    name: str = ""
    trainer: Trainer

    def before_train(self) -> None:  # noqa: B027
        pass

    def before_epoch(self) -> None:  # noqa: B027
        pass

    def after_step(self, stats: dict[str, float]) -> None:  # noqa: B027
        pass

    def after_epoch(self) -> None:  # noqa: B027
        pass

    def after_train(self) -> None:  # noqa: B027
        pass

    def on_error(self, exc: BaseException) -> None:  # noqa: B027
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        pass


class FreezeHook(HookBase):
    """Train only ``params`` during epochs ``[start_epoch, end_epoch)``.

    In those epochs every other parameter has ``requires_grad=False`` and every module
    without a trainable parameter of its own is in eval mode, so frozen BatchNorm layers
    neither learn nor move their running statistics (the CAMA warm phase trains only the
    classifiers). The original ``requires_grad`` flags come back when the phase ends.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter],
        start_epoch: int,
        end_epoch: int,
        name: str = "freeze",
    ) -> None:
        self.model = model
        self.allowed = {id(p) for p in params}
        self.start_epoch = int(start_epoch)
        self.end_epoch = int(end_epoch)
        self.name = name
        self._saved: dict[int, bool] | None = None

    def _in_phase(self, epoch: int) -> bool:
        return self.start_epoch <= epoch < self.end_epoch

    def before_epoch(self) -> None:
        epoch = self.trainer.epoch
        if self._in_phase(epoch):
            if self._saved is None:
                self._saved = {id(p): p.requires_grad for p in self.model.parameters()}
                for p in self.model.parameters():
                    p.requires_grad_(self._saved[id(p)] and id(p) in self.allowed)
                self.trainer.ctx.invalidate()
            for module in self.model.modules():
                own = list(module.parameters(recurse=False))
                if not any(p.requires_grad for p in own) and (own or list(module.buffers(False))):
                    module.training = False  # this module only: children decide for themselves
        elif self._saved is not None:
            for p in self.model.parameters():
                p.requires_grad_(self._saved[id(p)])
            self._saved = None
            self.trainer.ctx.invalidate()
            self.trainer.logger.print(f"{self.name} phase over: training all parameters")


class LoggerHook(HookBase):
    """Progress bar with ETA, ``log.jsonl`` rows per ``log_period`` steps and per epoch,
    and the epoch summary line."""

    name = "logger"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.bar = None

    def before_epoch(self) -> None:
        t = self.trainer
        self.sums: dict[str, float] = {}
        self.count = 0
        self.epoch_start = time.time()
        if t.info.is_main and self.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=t.num_iterations,
                desc=f"epoch {t.epoch + 1}/{t.total_epochs}",
                dynamic_ncols=True,
                leave=False,
            )

    def after_step(self, stats: dict[str, float]) -> None:
        t = self.trainer
        self.count += 1
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.bar is not None:
            post = {k: f"{v:.3f}" for k, v in stats.items() if math.isfinite(v)}
            post["lr"] = f"{t.lr:.2e}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        if t.info.is_main and (t.iteration + 1) % t.cfg.log_period == 0:
            step = t.ctx.global_step
            t.logger.log(
                "iter",
                step=step,
                epoch=t.epoch,
                iteration=t.iteration + 1,
                global_step=step,
                lr=t.lr,
                **stats,
            )

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_error(self, exc: BaseException) -> None:
        self._close()

    @staticmethod
    def _unit(t: Any) -> str:
        from reidkit.engine.video_eval import is_video_dataset

        return "clip" if is_video_dataset(getattr(t, "dataset", None)) else "img"

    def after_epoch(self) -> None:
        t = self.trainer
        self._close()
        epoch_time = time.time() - self.epoch_start
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        world = t.info.world_size
        images_per_s = self.count * (t.cfg.data.batch_size // world) * world / max(epoch_time, 1e-9)
        t.logger.log(
            "epoch",
            step=t.ctx.global_step,
            epoch=t.epoch,
            global_step=t.ctx.global_step,
            lr=t.lr,
            phase=t.phase,
            epoch_time=round(epoch_time, 3),
            images_per_s=round(images_per_s, 2),
            **means,
        )
        if t.info.is_main:
            terms = " ".join(f"{k}={v:.4f}" for k, v in means.items() if math.isfinite(v))
            done = t.epoch - t.start_epoch + 1
            eta = (time.time() - t.session_start) / done * (t.total_epochs - t.epoch - 1)
            t.logger.print(
                f"epoch {t.epoch + 1}/{t.total_epochs} lr={t.lr:.2e} {terms} "
                f"({format_duration(epoch_time)}, {images_per_s:.1f} {self._unit(t)}/s, "
                f"ETA {format_duration(eta)})"
            )


class EvalHook(HookBase):
    """Evaluate every ``test.eval_period`` epochs and after the last one; keep the best
    model (by the method's ``best_metric``, mAP by default) in ``checkpoints/best.pt``. Evaluation never touches the RNG streams
    of training (it runs under ``torch.random.fork_rng``)."""

    name = "eval"

    def __init__(self) -> None:
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.final = None

    def after_epoch(self) -> None:
        from reidkit.engine import distributed as dist_utils
        from reidkit.engine.evaluator import evaluate_model

        t = self.trainer
        is_last = t.epoch == t.total_epochs - 1
        if not ((t.epoch + 1) % t.cfg.test.eval_period == 0 or is_last):
            return
        if t.info.distributed:  # BN running stats differ per rank without SyncBN
            dist_utils.broadcast_buffers(t.model)
        devices = [t.device.index or 0] if t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate_model(
                t.cfg, t.model, t.dataset, t.device, progress=t.progress and t.info.is_main
            )
        if not t.info.is_main or result is None:
            return
        summary = {k: round(float(v), 6) for k, v in result.metrics.items()}
        self.last = {"epoch": t.epoch + 1, **summary}
        t.logger.log("eval", step=t.ctx.global_step, epoch=t.epoch, metrics=summary)
        for note in result.notes:
            t.logger.print(note)
        if not is_last:  # the final table is printed at the end
            t.logger.print(f"evaluation after epoch {t.epoch + 1}:")
            t.logger.print(result.table())
        key = getattr(type(t.model), "best_metric", "mAP")
        if key not in summary:
            raise ValueError(
                f"{type(t.model).__name__}.best_metric is '{key}' but the evaluation "
                f"returned {sorted(summary)}"
            )
        if self.best is None or summary[key] > self.best[key]:
            self.best = {"epoch": t.epoch + 1, **summary}
            t.save_model_checkpoint(t.ckpt_dir / "best.pt", metrics=summary)
        if is_last:
            self.final = result

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.last = state.get("last")


class CheckpointHook(HookBase):
    """``checkpoints/last.pt`` after every epoch (everything needed to resume) and a
    hard-linked ``epoch_NNN.pt`` every ``checkpoint_period`` epochs and at the end."""

    name = "checkpoint"

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.info.is_main:
            return
        t.save_training_checkpoint(t.last_path)
        is_last = t.epoch == t.total_epochs - 1
        if (t.epoch + 1) % t.cfg.checkpoint_period == 0 or is_last:
            link_or_copy(t.last_path, t.ckpt_dir / f"epoch_{t.epoch + 1:03d}.pt")


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (hard link when possible)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
