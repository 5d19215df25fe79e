"""The trainer: ``train(cfg) -> run folder``, a :class:`Trainer` with hooks.

One loop serves every method through the :class:`~reidkit.methods.base.ReIDMethod`
contract. Per epoch: set the sampler epoch, call the method's ``on_epoch_start``, put it
in train mode, run the hooks' ``before_epoch`` (a freeze hook may freeze parameters),
apply the schedules of the active optimisers, then for each (capped) iteration hand the
batch to ``method.train_step(batch, ctx)`` (:class:`~reidkit.engine.step.StepContext`);
after the epoch the hooks log, evaluate (every ``test.eval_period`` epochs and at the
end) and write ``checkpoints/last.pt`` (every epoch) and ``checkpoints/epoch_NNN.pt``.

Epochs are counted over the whole run: an optional classifier-only phase
(``solver.classifier_warm_epochs`` = W) occupies epochs ``0..W-1`` and the main schedule
``W..W+max_epochs-1``; ``on_epoch_start(epoch, total_epochs)`` receives that index.

Resuming (``train(cfg, resume=True)``) restores the model, every named optimiser and
schedule, the AMP scaler, the hooks' state (best mAP), the RNG states and the counters
from ``last.pt`` and continues with the next epoch; since the sampler is deterministic by
``(seed, epoch)``, a single-process run resumes bit-for-bit. Under DDP only rank 0's RNG
state is stored; other ranks reseed.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reidkit.config import Config, config_to_dict, dump_config
from reidkit.data.loader import CorruptImageError
from reidkit.engine import distributed as dist_utils
from reidkit.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_save,
    atomic_write_text,
    clean_stale_tmp,
    get_rng_state,
    load_checkpoint,
    set_rng_state,
    upgrade_training_state,
)
from reidkit.engine.hooks import CheckpointHook, EvalHook, HookBase, LoggerHook
from reidkit.engine.log import RunLogger
from reidkit.engine.step import NonFiniteLossError, StepContext
from reidkit.errors import DiskFullError, one_line
from reidkit.metrics.table import format_percent

__all__ = ["train", "Trainer", "NonFiniteLossError", "seed_everything", "total_epochs"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def total_epochs(cfg: Config) -> int:
    """Classifier-only warm epochs + main-schedule epochs."""
    return cfg.solver.classifier_warm_epochs + cfg.solver.max_epochs


def use_device_transforms(cfg: Config, device: torch.device) -> bool:
    """``data.device_transforms``: ``auto`` = batched augmentation on CUDA only (on a CPU
    the per-sample path is faster: docs/speed.md)."""
    mode = cfg.data.device_transforms
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


# Settings that do not change the training trajectory (where it runs, how it logs and
# evaluates); a resume may change these without a warning.
_RESUME_FREE_KEYS = (
    "output_dir",
    "device",
    "data.num_workers",
    "tensorboard",
    "log_period",
    "checkpoint_period",
)
_RESUME_FREE_PREFIXES = ("test.",)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _config_changes(saved: Any, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint value, current value)`` for the trajectory-relevant config keys
    that differ between a checkpoint's stored config and the current one."""
    if not isinstance(saved, dict):
        return []
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if key in _RESUME_FREE_KEYS or key.startswith(_RESUME_FREE_PREFIXES):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            out.append((key, va, vb))
    return out


class Trainer:
    """Builds the dataset, method, optimisers and hooks from a config and trains.

    Attributes hooks may read: ``cfg``, ``info`` (:class:`DistInfo`), ``device``,
    ``model`` (the method), ``ctx`` (:class:`StepContext`), ``dataset``, ``epoch``,
    ``iteration``, ``num_iterations``, ``total_epochs``, ``start_epoch``, ``lr``,
    ``phase``, ``logger``, ``out_dir``, ``ckpt_dir``, ``last_path``, ``progress``,
    ``eval_hook``.

    ``hooks`` run after the standard ones (after the checkpoint of each epoch is
    written), e.g. the backbone export of ``reidkit pretrain``.
    """

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        overwrite: bool = False,
        stop_after_epochs: int | None = None,
        progress: bool = True,
        dataset: Any = None,
        hooks: Sequence[HookBase] = (),
    ) -> None:
        self.cfg = cfg
        self.given_dataset = dataset  # a ReIDDataset to use instead of cfg.data (tune)
        self.extra_hooks = list(hooks)
        self.resume = resume
        self.overwrite = overwrite
        self.stop_after_epochs = stop_after_epochs
        self.progress = progress
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_path = self.ckpt_dir / "last.pt"
        self.epoch = 0
        self.iteration = 0
        self.lr = float("nan")
        self.phase = "main"
        self.hooks: list[HookBase] = []
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run
        self.skipped_in_loader = 0  # unreadable images data.skip_corrupt dropped in batches

    # ------------------------------------------------------------------ building
    def _check_folder(self) -> None:
        if self.resume and not self.last_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.last_path}")
        if not self.resume and self.last_path.exists() and not self.overwrite:
            raise ValueError(
                f"output_dir {self.out_dir} already holds a run ({self.last_path} exists): pass "
                "--resume to continue it, --overwrite to start over, or choose another "
                "output_dir=..."
            )
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise ValueError(f"stop_after_epochs must be >= 1, got {self.stop_after_epochs}")
        pretrained = self.cfg.model.pretrained
        if pretrained and not self.resume:
            # before the dataset is read: a missing, truncated or unsafe ImageNet file is the
            # first thing a paper config runs into (the shapes are checked when building)
            from reidkit.models import (
                PretrainedLoadError,
                missing_pretrained_message,
                read_state_dict,
            )

            if not Path(pretrained).expanduser().is_file():
                raise PretrainedLoadError(missing_pretrained_message(pretrained))
            try:
                read_state_dict(pretrained)
            except PretrainedLoadError as exc:
                raise PretrainedLoadError(f"model.pretrained: {exc}") from exc

    def build(self) -> None:
        from reidkit.data.datasets import dataset_from_config
        from reidkit.data.loader import batch_keys, build_train_loader
        from reidkit.engine.video_eval import is_video_dataset
        from reidkit.methods import build_method, check_requirements

        cfg, info = self.cfg, self.info
        if info.is_main:
            if not self.resume and self.overwrite:
                self._clear_run()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # .NAME.tmp-PID files of a run killed while writing (atomic_save's partial files)
            for folder in (self.ckpt_dir, self.out_dir):
                for tmp in clean_stale_tmp(folder):
                    print(f"removed {tmp}: a partial file left by an interrupted run", flush=True)
        self.logger = RunLogger(self.out_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        seed_everything(cfg.seed)  # identical initialisation on every rank
        if self.given_dataset is not None:
            self.dataset = self.given_dataset
        else:
            self.dataset = dataset_from_config(cfg.data)
        self._report_skipped_files()
        if not self.dataset.train:
            raise ValueError(
                f"dataset '{self.dataset.name}' at {self.dataset.root}: the train split is empty"
            )
        from reidkit.methods.base import method_spec

        spec = method_spec(cfg.model.name)
        train_keys, eval_keys = spec.cls.batch_requirements(cfg)
        check_requirements(cfg.model.name, train_keys, batch_keys(self.dataset.train))
        eval_available = batch_keys(self.dataset.query) & batch_keys(self.dataset.gallery)
        if is_video_dataset(self.dataset):
            eval_available |= {"images"}  # frames are images (I2V, V2I, I2I; image methods)
        check_requirements(cfg.model.name, eval_keys, eval_available, split="query/gallery")
        self.num_classes = self.dataset.num_train_pids
        build_cfg = cfg
        if self.resume and cfg.model.pretrained:
            # the checkpoint replaces every weight: the ImageNet file need not be there
            build_cfg = cfg.model_copy(deep=True)
            build_cfg.model.pretrained = None
        model = build_method(build_cfg, self.num_classes)
        if cfg.model.sync_bn and info.distributed:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self.logger.print(
                    "model.sync_bn: SyncBatchNorm needs CUDA; keeping per-rank BatchNorm on CPU"
                )
        if info.is_main and not self.resume:  # a resume writes it once the checkpoint loaded
            dump_config(cfg, self.out_dir / "config.yaml")
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ctx = StepContext(
            model,
            model.optimizers(cfg),
            self.device,
            amp=cfg.amp,
            grad_clip=cfg.solver.grad_clip,
            distributed=info.distributed,
            compile=cfg.compile,
            channels_last=cfg.channels_last,
        )
        self.train_loader = build_train_loader(
            cfg,
            self.dataset.train,
            info.rank,
            info.world_size,
            device_transforms=use_device_transforms(cfg, self.device),
        )
        n_iters = len(self.train_loader)
        if cfg.solver.iters_per_epoch is not None:
            n_iters = min(n_iters, cfg.solver.iters_per_epoch)
        if n_iters <= 0:
            raise ValueError(
                f"the train loader is empty: {len(self.dataset.train)} train samples, "
                f"data.batch_size={cfg.data.batch_size}, world size {info.world_size}"
            )
        self.num_iterations = n_iters
        self.total_epochs = total_epochs(cfg)
        self.ctx.num_iterations = n_iters
        self.ctx.total_epochs = self.total_epochs
        self.eval_hook = EvalHook()
        self.hooks = [
            *model.training_hooks(cfg),
            LoggerHook(progress=self.progress),
            self.eval_hook,
            CheckpointHook(),
            *self.extra_hooks,
        ]
        for hook in self.hooks:
            hook.trainer = self

    def _report_skipped_files(self) -> None:
        """Images the dataset check dropped (``data.skip_corrupt``): printed and logged."""
        skipped = getattr(self.dataset, "skipped", None) or []
        if not skipped or not self.info.is_main:
            return
        first = skipped[0]
        self.logger.print(
            f"data.skip_corrupt: skipped {len(skipped)} unreadable image(s) of "
            f"{self.dataset.name} (first: {first.path}: {first.reason})"
        )
        self.logger.log(
            "skipped_images",
            stage="dataset check",
            count=len(skipped),
            images=[{"path": b.path, "reason": b.reason} for b in skipped[:100]],
        )

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped so far: at the dataset check + in training batches."""
        return len(getattr(self.dataset, "skipped", None) or []) + self.skipped_in_loader

    def _kept_message(self) -> str:
        if self.last_path.is_file():
            return f"the last checkpoint {self.last_path} is intact: continue with --resume"
        return "no checkpoint was written yet"

    def _clear_run(self) -> None:
        for name in ("log.jsonl", "metrics.json"):
            (self.out_dir / name).unlink(missing_ok=True)
        if self.ckpt_dir.is_dir():
            shutil.rmtree(self.ckpt_dir)

    # ------------------------------------------------------------------ checkpoints
    def save_model_checkpoint(self, path: Path, metrics: dict[str, float]) -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "num_classes": self.num_classes,
                "epoch": self.epoch,
                "metrics": metrics,
                "config": config_to_dict(self.cfg),
            },
            path,
        )

    def save_training_checkpoint(self, path: Path) -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": self.model.state_dict(),
                "num_classes": self.num_classes,
                **self.ctx.state_dict(),
                "hooks": {h.name: h.state_dict() for h in self.hooks if h.name},
                "epoch": self.epoch,
                "global_step": self.ctx.global_step,
                "train_time_s": self.elapsed_before + (time.time() - self.session_start),
                "skipped_in_loader": self.skipped_in_loader,
                "rng": get_rng_state(),
                "best": self.eval_hook.best,
                "config": config_to_dict(self.cfg),
            },
            path,
        )

    def load_training_checkpoint(self) -> dict:
        path = self.last_path
        state = upgrade_training_state(load_checkpoint(path, map_location=self.device), path)
        if state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"{path}: trained with {state.get('num_classes')} identities, the dataset now "
                f"has {self.num_classes}"
            )
        changed = _config_changes(state.get("config"), config_to_dict(self.cfg))
        if changed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:8])
            more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
            original = self.out_dir / "config.yaml"
            if self.info.is_main and original.is_file():
                # config.yaml will describe the resumed run; the settings so far stay here
                kept = self.out_dir / f"config.before_resume_{int(state['epoch']) + 2:03d}.yaml"
                shutil.copyfile(original, kept)
                original = kept
            self.logger.print(
                f"warning: --resume with a config that differs from the checkpoint's ({path}): "
                f"{shown}{more}. The resumed run is not an exact continuation; resume with "
                f"-c {original} to keep the original settings."
            )
            self.logger.log(
                "config_changed", changes={k: [a, b] for k, a, b in changed}, epoch=state["epoch"]
            )
        self.model.load_state_dict(state["model"])
        self.ctx.load_state_dict(state, source=str(path))
        hook_states = state.get("hooks") or {}
        for hook in self.hooks:
            if hook.name and hook.name in hook_states:
                hook.load_state_dict(hook_states[hook.name])
        self.ctx.global_step = int(state["global_step"])
        self.elapsed_before = float(state.get("train_time_s") or 0.0)
        self.skipped_in_loader = int(state.get("skipped_in_loader") or 0)
        if self.info.is_main:
            dump_config(self.cfg, self.out_dir / "config.yaml")
        return state

    # ------------------------------------------------------------------ training
    def run(self) -> Path:
        self._check_folder()
        self.info, self.device = dist_utils.init_from_env(self.cfg.device)
        try:
            out = self._run()
        except BaseException:
            dist_utils.cleanup(self.info, sync=False)
            raise
        dist_utils.cleanup(self.info)
        return out

    def _run(self) -> Path:
        cfg, info = self.cfg, self.info
        self.build()
        self.session_start = time.time()
        T = self.total_epochs
        self.start_epoch = 0
        state = None
        if self.resume:
            state = self.load_training_checkpoint()
            self.start_epoch = int(state["epoch"]) + 1
            if self.start_epoch >= T:
                self.logger.print(f"{self.out_dir}: the run already finished all {T} epochs")
                return self.out_dir
            self.logger.print(
                f"resuming {self.out_dir} at epoch {self.start_epoch + 1}/{T} "
                f"(step {self.ctx.global_step})"
            )
            self.logger.log("resume", epoch=self.start_epoch, global_step=self.ctx.global_step)
        if info.is_main:
            self.logger.print(
                f"train: {self.dataset.name} {len(self.dataset.train)} samples / "
                f"{self.num_classes} ids, method {cfg.model.name} ({cfg.model.backbone}), "
                f"{T} epochs x {self.num_iterations} iterations, device {self.device}"
                + (f", {info.world_size} processes" if info.distributed else "")
            )
        # RNG last, after everything that consumed random numbers while building.
        if state is not None and info.rank == 0:
            set_rng_state(state["rng"])
        else:
            seed_everything(cfg.seed + info.rank + 7919 * self.start_epoch)
        del state

        for hook in self.hooks:
            hook.before_train()
        stopped_early = False
        epochs_done = 0
        for epoch in range(self.start_epoch, T):
            self.epoch = self.ctx.epoch = epoch
            self.phase = "classifier_warm" if epoch < cfg.solver.classifier_warm_epochs else "main"
            skipped_before = self.skipped_in_loader
            try:
                self._run_epoch()
            except CorruptImageError as exc:
                for hook in self.hooks:
                    hook.on_error(exc)
                raise CorruptImageError(
                    f"{one_line(exc)} (epoch {epoch + 1}, iteration {self.iteration + 1}); "
                    + self._kept_message()
                ) from None
            except NonFiniteLossError as exc:
                for hook in self.hooks:
                    hook.on_error(exc)
                where = (
                    f"The last good checkpoint is {self.last_path}."
                    if self.last_path.is_file()
                    else "No checkpoint was written yet."
                )
                message = f"{exc} {where} Try a lower solver.lr, solver.grad_clip, or amp=off."
                message = " ".join(message.split())
                self.logger.log(
                    "error",
                    epoch=epoch,
                    iteration=self.iteration,
                    global_step=self.ctx.global_step,
                    message=message,
                )
                raise NonFiniteLossError(message) from None
            try:
                for hook in self.hooks:
                    hook.after_epoch()
            except DiskFullError as exc:
                err = DiskFullError(
                    f"{exc}; training stopped after epoch {epoch + 1}/{T}: continue with "
                    "--resume once there is space"
                )
                err.errno = exc.errno  # (a filename would change str(err))
                self.logger.log("error", epoch=epoch, message=str(err))
                raise err from None
            epochs_done += 1
            if self.skipped_in_loader > skipped_before:
                n = self.skipped_in_loader - skipped_before
                self.logger.log("skipped_images", stage="training", epoch=epoch, count=n)
                self.logger.print(
                    f"data.skip_corrupt: epoch {epoch + 1} skipped {n} unreadable image(s)"
                )
            is_last = epoch == T - 1
            if self.stop_after_epochs is not None and epochs_done >= self.stop_after_epochs:
                if not is_last:
                    stopped_early = True
                    self.logger.log("stop", epoch=epoch, global_step=self.ctx.global_step)
                    self.logger.print(
                        f"stopped after epoch {epoch + 1}/{T}; continue with --resume"
                    )
                    break

        dist_utils.barrier()
        if info.is_main and not stopped_early:
            for hook in self.hooks:
                hook.after_train()
            self._write_summary()
        self.logger.close()
        return self.out_dir

    def _run_epoch(self) -> None:
        cfg, model, ctx = self.cfg, self.model, self.ctx
        _set_sampler_epoch(self.train_loader, self.epoch)
        model.on_epoch_start(self.epoch, self.total_epochs)
        model.train()
        for hook in self.hooks:
            hook.before_epoch()
        self.lr = ctx.set_lr(0.0)
        per_iter = cfg.solver.schedule_per_iter
        loader = self.train_loader
        data_iter = iter(loader)
        try:
            for it in range(self.num_iterations):
                self.iteration = it
                batch = next(data_iter)
                if self.cfg.data.skip_corrupt:  # unreadable images are dropped from batches
                    self.skipped_in_loader += max(0, loader.batch_size - len(batch["index"]))
                batch = loader.prepare(batch, self.device) if hasattr(loader, "prepare") else batch
                if per_iter:
                    self.lr = ctx.set_lr(it / self.num_iterations)
                ctx.begin_iteration(it)
                model.train_step(batch, ctx)
                stats = ctx.end_iteration()
                for hook in self.hooks:
                    hook.after_step(stats)
        finally:
            del data_iter

    def _write_summary(self) -> None:
        ev = self.eval_hook
        summary = {
            "final": ev.last,
            "best": ev.best,
            "epochs": self.total_epochs,
            "global_step": self.ctx.global_step,
            "train_time_s": round(self.elapsed_before + time.time() - self.session_start, 1),
            "world_size": self.info.world_size,
        }
        skipped = self.skipped_images
        if skipped:
            summary["skipped_images"] = int(skipped)
            self.logger.print(
                f"data.skip_corrupt: {skipped} unreadable image(s) were skipped in this run "
                "(see the skipped_images rows of log.jsonl)"
            )
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(summary, indent=2))
        if ev.final is not None:
            self.logger.print(f"final evaluation (epoch {self.total_epochs}):")
            self.logger.print(ev.final.table())
        key = getattr(type(self.model), "best_metric", "mAP")
        if ev.best is not None and key in ev.best:
            value = ev.best[key]
            shown = format_percent(value) if key == "mAP" else f"{value:.4g}"
            self.logger.print(f"best {key} {shown} at epoch {ev.best['epoch']}")
        self.logger.print(f"run folder: {self.out_dir}")


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
    dataset: Any = None,
    hooks: Sequence[HookBase] = (),
) -> Path:
    """Train ``cfg`` and return the run folder (``cfg.output_dir``).

    The folder holds ``config.yaml`` (resolved), ``log.jsonl``, ``checkpoints/last.pt``,
    ``checkpoints/best.pt`` (best mAP), ``checkpoints/epoch_NNN.pt`` and, once the run is
    complete, ``metrics.json`` (final and best metrics).

    ``resume``: continue from ``checkpoints/last.pt`` at the next epoch. ``overwrite``:
    delete a previous run's logs/checkpoints in the folder (otherwise an existing run is
    an error). ``stop_after_epochs``: stop (as if interrupted, without final evaluation)
    after this many epochs of this call, e.g. for time-limited cluster jobs; continue
    later with ``resume=True``. ``progress``: tqdm progress bars on rank 0. ``dataset``:
    a :class:`~reidkit.data.records.ReIDDataset` to train and evaluate on instead of the
    one ``cfg.data`` names (``reidkit tune`` passes a validation split). ``hooks``: extra
    :class:`~reidkit.engine.hooks.HookBase` s run after the standard ones.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``) it trains with DDP: NCCL on CUDA, gloo
    on CPU, one PK-sampler shard per rank, rank 0 logs, evaluates and writes.
    Raises :class:`NonFiniteLossError` if the loss becomes NaN/inf (earlier checkpoints
    are kept untouched).
    """
    return Trainer(
        cfg, resume, overwrite, stop_after_epochs, progress, dataset=dataset, hooks=hooks
    ).run()
