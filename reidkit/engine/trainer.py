"""The training loop: ``train(cfg) -> run folder``.

One loop serves every method through the :class:`~reidkit.methods.base.ReIDMethod`
contract. Per epoch: set the sampler epoch and the lr, call ``on_epoch_start``, run the
(capped) iterations (forward under autocast, ``compute_loss`` in fp32, sum of the terms,
backward, optimiser steps, ``on_step_end``), evaluate every ``test.eval_period`` epochs
and at the end, then write ``checkpoints/last.pt`` (every epoch) and
``checkpoints/epoch_NNN.pt`` (every ``checkpoint_period`` epochs and at the end).

Epochs are counted over the whole run: the optional classifier-only phase
(``solver.classifier_warm_epochs`` = W) occupies epochs ``0..W-1`` and the main schedule
``W..W+max_epochs-1``; ``on_epoch_start(epoch, total_epochs)`` receives that index.

Resuming (``train(cfg, resume=True)``) restores model, optimisers, scheduler, scaler, RNG
states and counters from ``last.pt`` and continues with the next epoch; since the sampler
is deterministic by ``(seed, epoch)``, a single-process run with ``num_workers=0`` resumes
bit-for-bit. Under DDP only rank 0's RNG state is stored; other ranks reseed.
"""

from __future__ import annotations

import functools
import math
import os
import random
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reidkit.config import Config, config_to_dict, dump_config
from reidkit.engine import distributed as dist_utils
from reidkit.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_save,
    get_rng_state,
    load_checkpoint,
    set_rng_state,
)
from reidkit.engine.evaluator import EvalResult, evaluate_model
from reidkit.engine.extract import autocast_context
from reidkit.engine.log import RunLogger, format_duration
from reidkit.engine.optim import (
    LRScheduler,
    build_aux_optimizer,
    build_optimizer,
    build_param_groups,
    classifier_warm_lr_at,
    lr_at,
)

__all__ = ["train", "NonFiniteLossError", "seed_everything", "total_epochs"]


class NonFiniteLossError(RuntimeError):
    """The summed loss became NaN/inf; the message names the epoch, iteration and terms."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def total_epochs(cfg: Config) -> int:
    """Classifier-only warm epochs + main-schedule epochs."""
    return cfg.solver.classifier_warm_epochs + cfg.solver.max_epochs


def _cast_float(obj: Any) -> Any:
    """Floating tensors (possibly nested in dicts/lists) to float32 for the loss."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: _cast_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_float(v) for v in obj)
    return obj


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _accuracy(outputs: Any, pids: torch.Tensor) -> torch.Tensor:
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if isinstance(logits, (list, tuple)) and logits:
        logits = logits[0]
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == pids.shape[0]:
        return (logits.detach().argmax(1) == pids).float().mean()
    return torch.tensor(float("nan"), device=pids.device)


def _clear_run(out_dir: Path) -> None:
    for name in ("log.jsonl", "metrics.json"):
        (out_dir / name).unlink(missing_ok=True)
    ckpt = out_dir / "checkpoints"
    if ckpt.is_dir():
        shutil.rmtree(ckpt)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (hard link when possible)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _metric_summary(result: EvalResult) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in result.metrics.items()}


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


def _set_trainable(params: Iterable[nn.Parameter], allowed: set[int]) -> None:
    for p in params:
        p.requires_grad_(id(p) in allowed)


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> Path:
    """Train ``cfg`` and return the run folder (``cfg.output_dir``).

    The folder holds ``config.yaml`` (resolved), ``log.jsonl``, ``checkpoints/last.pt``,
    ``checkpoints/best.pt`` (best mAP), ``checkpoints/epoch_NNN.pt`` and, once the run is
    complete, ``metrics.json`` (final and best metrics).

    ``resume``: continue from ``checkpoints/last.pt`` at the next epoch. ``overwrite``:
    delete a previous run's logs/checkpoints in the folder (otherwise an existing run is
    an error). ``stop_after_epochs``: stop (as if interrupted, without final evaluation)
    after this many epochs of this call, e.g. for time-limited cluster jobs; continue
    later with ``resume=True``. ``progress``: tqdm progress bars on rank 0.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``) it trains with DDP: NCCL on CUDA, gloo
    on CPU, one PK-sampler shard per rank, rank 0 logs, evaluates and writes.
    Raises :class:`NonFiniteLossError` if the loss becomes NaN/inf (earlier checkpoints
    are kept untouched).
    """
    info, device = dist_utils.init_from_env(cfg.device)
    try:
        out = _train(cfg, info, device, resume, overwrite, stop_after_epochs, progress)
    except BaseException:
        dist_utils.cleanup(info, sync=False)
        raise
    dist_utils.cleanup(info)
    return out


def _train(
    cfg: Config,
    info: dist_utils.DistInfo,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    stop_after_epochs: int | None,
    progress: bool,
) -> Path:
    from reidkit.data.datasets import dataset_from_config
    from reidkit.data.loader import build_train_loader
    from reidkit.methods import build_method

    main = info.is_main
    solver = cfg.solver
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_path}")
    if not resume and last_path.exists() and not overwrite:
        raise ValueError(
            f"output_dir {out_dir} already holds a run ({last_path} exists): pass --resume to "
            "continue it, --overwrite to start over, or choose another output_dir=..."
        )
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise ValueError(f"stop_after_epochs must be >= 1, got {stop_after_epochs}")
    if main:
        if not resume and overwrite:
            _clear_run(out_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(out_dir, enabled=main, tensorboard=cfg.tensorboard)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- data and model
    seed_everything(cfg.seed)  # identical initialisation on every rank
    dataset = dataset_from_config(cfg.data)
    if not dataset.train:
        raise ValueError(f"dataset '{dataset.name}' at {dataset.root}: the train split is empty")
    num_classes = dataset.num_train_pids
    core = build_method(cfg, num_classes)
    if cfg.model.sync_bn and info.distributed:
        if device.type == "cuda":
            core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
        else:
            logger.print(
                "model.sync_bn: SyncBatchNorm needs CUDA; keeping per-rank BatchNorm on CPU"
            )
    if main:  # after building: method presets may have filled config fields in place
        dump_config(cfg, out_dir / "config.yaml")
    core.to(device)
    if cfg.channels_last:
        core.to(memory_format=torch.channels_last)

    trainable = [p for p in core.parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in trainable}
    aux_params = [p for p in core.aux_parameters() if p.requires_grad]
    optimizer = build_optimizer(build_param_groups(core, solver, exclude=aux_params), solver)
    scheduler = LRScheduler(optimizer, functools.partial(lr_at, solver))
    warm_epochs = solver.classifier_warm_epochs
    warm_optimizer = warm_scheduler = None
    cls_ids: set[int] = set()
    if warm_epochs > 0:
        cls_params = [p for p in core.classifier_parameters() if p.requires_grad]
        if not cls_params:
            raise ValueError(
                f"solver.classifier_warm_epochs={warm_epochs} but {type(core).__name__}."
                "classifier_parameters() is empty"
            )
        cls_ids = {id(p) for p in cls_params}
        warm_optimizer = build_optimizer(
            build_param_groups(core, solver, params=cls_params, exclude=aux_params), solver
        )
        warm_scheduler = LRScheduler(
            warm_optimizer, functools.partial(classifier_warm_lr_at, solver)
        )
    aux_optimizer = build_aux_optimizer(aux_params, cfg.loss.center_lr)
    aux_scale = 1.0 / cfg.loss.center_weight if cfg.loss.center_weight > 0 else 1.0
    use_scaler = cfg.amp == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    train_loader = build_train_loader(cfg, dataset.train, info.rank, info.world_size)
    n_iters = len(train_loader)
    if solver.iters_per_epoch is not None:
        n_iters = min(n_iters, solver.iters_per_epoch)
    if n_iters <= 0:
        raise ValueError(
            f"the train loader is empty: {len(dataset.train)} train images, "
            f"data.batch_size={cfg.data.batch_size}, world size {info.world_size}"
        )

    T = total_epochs(cfg)
    start_epoch, global_step = 0, 0
    best: dict | None = None
    state = None
    if resume:
        state = load_checkpoint(last_path, map_location=device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{last_path}: not a reidkit training checkpoint")
        if state.get("num_classes") != num_classes:
            raise ValueError(
                f"{last_path}: trained with {state.get('num_classes')} identities, the "
                f"dataset now has {num_classes}"
            )
        changed = _config_changes(state.get("config"), config_to_dict(cfg))
        if changed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:8])
            more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
            logger.print(
                f"warning: --resume with a config that differs from the checkpoint's "
                f"({last_path}): {shown}{more}. The resumed run is not an exact continuation; "
                f"resume with -c {out_dir / 'config.yaml'} to keep the original settings."
            )
            logger.log(
                "config_changed", changes={k: [a, b] for k, a, b in changed}, epoch=state["epoch"]
            )
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if warm_optimizer is not None and state.get("warm_optimizer") is not None:
            warm_optimizer.load_state_dict(state["warm_optimizer"])
            warm_scheduler.load_state_dict(state["warm_scheduler"])
        if aux_optimizer is not None and state.get("aux_optimizer") is not None:
            aux_optimizer.load_state_dict(state["aux_optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        global_step = int(state["global_step"])
        best = state.get("best")
        logger.print(f"resuming {out_dir} at epoch {start_epoch + 1}/{T} (step {global_step})")
        logger.log("resume", epoch=start_epoch, global_step=global_step)

    if main:
        logger.print(
            f"train: {dataset.name} {len(dataset.train)} images / {num_classes} ids, "
            f"method {cfg.model.name} ({cfg.model.backbone}), {T} epochs x {n_iters} iterations, "
            f"device {device}" + (f", {info.world_size} processes" if info.distributed else "")
        )
    if start_epoch >= T:
        logger.print(f"{out_dir}: the run already finished all {T} epochs")
        return out_dir

    # RNG last, after everything that consumed random numbers while building.
    if state is not None and info.rank == 0:
        set_rng_state(state["rng"])
    else:
        seed_everything(cfg.seed + info.rank + 7919 * start_epoch)
    del state

    net_cache: dict[bool, nn.Module] = {}

    def network(warm: bool) -> nn.Module:
        """The module called for the forward: DDP / torch.compile wrappers of ``core``."""
        if warm in net_cache:
            return net_cache[warm]
        net_cache.clear()
        allowed = (cls_ids & trainable_ids) if warm else trainable_ids
        _set_trainable(core.parameters(), allowed)
        net: nn.Module = core
        if info.distributed:
            net = nn.parallel.DistributedDataParallel(
                core, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile:
            net = torch.compile(net)
        net_cache[warm] = net
        return net

    run_start = time.time()
    stopped_early = False
    final: EvalResult | None = None
    last_eval: dict | None = None
    epochs_done = 0
    for epoch in range(start_epoch, T):
        warm = epoch < warm_epochs
        net = network(warm)
        opt, sched = (warm_optimizer, warm_scheduler) if warm else (optimizer, scheduler)
        local_epoch = epoch if warm else epoch - warm_epochs
        lr = sched.set_epoch(local_epoch)
        _set_sampler_epoch(train_loader, epoch)
        core.on_epoch_start(epoch, T)
        core.train()
        use_aux = aux_optimizer is not None and not warm
        per_iter = solver.schedule_per_iter
        sums: dict[str, float] = {}
        count = 0
        epoch_start = time.time()
        bar = None
        if main and progress:
            from tqdm import tqdm

            bar = tqdm(
                total=n_iters, desc=f"epoch {epoch + 1}/{T}", dynamic_ncols=True, leave=False
            )
        data_iter = iter(train_loader)
        for it in range(n_iters):
            batch = next(data_iter)
            images = batch["images"].to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            pids = batch["pids"].to(device, non_blocking=True)
            if per_iter:
                lr = sched.set_epoch(local_epoch + it / n_iters)
            with autocast_context(device, cfg.amp):
                outputs = net(images)
            outputs = _cast_float(outputs)
            losses = core.compute_loss(outputs, pids)
            if not isinstance(losses, dict) or not losses:
                raise TypeError(
                    f"{type(core).__name__}.compute_loss must return a non-empty dict of scalar losses"
                )
            total = sum(losses.values())
            stats = torch.stack(
                [total.detach().float()]
                + [v.detach().float().reshape(()) for v in losses.values()]
                + [_accuracy(outputs, pids)]
            )
            if info.distributed:
                torch.distributed.all_reduce(stats)
                stats /= info.world_size
            values = stats.tolist()
            if not math.isfinite(values[0]):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, values[1:-1]))
                message = (
                    f"non-finite loss at epoch {epoch + 1}/{T}, iteration {it + 1}/{n_iters} "
                    f"(global step {global_step}): total={values[0]}, {terms}. "
                    + (
                        f"The last good checkpoint is {last_path}."
                        if last_path.is_file()
                        else "No checkpoint was written yet."
                    )
                    + " Try a lower solver.lr, solver.grad_clip, or amp=off."
                )
                if bar is not None:
                    bar.close()
                logger.log(
                    "error", epoch=epoch, iteration=it, global_step=global_step, message=message
                )
                raise NonFiniteLossError(message)
            core.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if solver.grad_clip is not None:
                scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, solver.grad_clip)
            scaler.step(opt)
            if use_aux:
                scaler.unscale_(aux_optimizer)
                for p in aux_params:
                    if p.grad is not None:
                        p.grad.mul_(aux_scale)  # undo center_weight (BoT)
                scaler.step(aux_optimizer)
            scaler.update()
            with torch.no_grad():
                core.on_step_end(outputs, pids)
            global_step += 1
            count += 1
            names = ["loss", *losses.keys(), "acc"]
            for k, v in zip(names, values):
                sums[k] = sums.get(k, 0.0) + v
            if bar is not None:
                post = {k: f"{v:.3f}" for k, v in zip(names, values) if math.isfinite(v)}
                post["lr"] = f"{lr:.2e}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if main and (it + 1) % cfg.log_period == 0:
                logger.log(
                    "iter",
                    step=global_step,
                    epoch=epoch,
                    iteration=it + 1,
                    global_step=global_step,
                    lr=lr,
                    **{k: v for k, v in zip(names, values)},
                )
        del data_iter
        if bar is not None:
            bar.close()
        epoch_time = time.time() - epoch_start
        means = {k: v / max(count, 1) for k, v in sums.items()}
        images_per_s = (
            count
            * (cfg.data.batch_size // info.world_size)
            * info.world_size
            / max(epoch_time, 1e-9)
        )
        logger.log(
            "epoch",
            step=global_step,
            epoch=epoch,
            global_step=global_step,
            lr=lr,
            phase="classifier_warm" if warm else "main",
            epoch_time=round(epoch_time, 3),
            images_per_s=round(images_per_s, 2),
            **means,
        )
        if main:
            terms = " ".join(f"{k}={v:.4f}" for k, v in means.items() if math.isfinite(v))
            elapsed = time.time() - run_start
            eta = elapsed / (epoch - start_epoch + 1) * (T - epoch - 1)
            logger.print(
                f"epoch {epoch + 1}/{T} lr={lr:.2e} {terms} ({format_duration(epoch_time)}, "
                f"{images_per_s:.1f} img/s, ETA {format_duration(eta)})"
            )

        # ------------------------------------------------------------ evaluation
        is_last = epoch == T - 1
        if (epoch + 1) % cfg.test.eval_period == 0 or is_last:
            if info.distributed:  # BN running stats differ per rank without SyncBN
                dist_utils.broadcast_buffers(core)
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # evaluation leaves RNG untouched
                result = evaluate_model(cfg, core, dataset, device, progress=progress and main)
            if main and result is not None:
                summary = _metric_summary(result)
                last_eval = {"epoch": epoch + 1, **summary}
                logger.log("eval", step=global_step, epoch=epoch, metrics=summary)
                if not is_last:  # the final table is printed at the end
                    logger.print(result.table(title=f"epoch {epoch + 1}"))
                if best is None or summary["mAP"] > best["mAP"]:
                    best = {"epoch": epoch + 1, **summary}
                    atomic_save(
                        {
                            "format": CHECKPOINT_FORMAT,
                            "model": core.state_dict(),
                            "num_classes": num_classes,
                            "epoch": epoch,
                            "metrics": summary,
                            "config": config_to_dict(cfg),
                        },
                        ckpt_dir / "best.pt",
                    )
                if is_last:
                    final = result

        # ------------------------------------------------------------ checkpoint
        if main:
            atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": core.state_dict(),
                    "num_classes": num_classes,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "warm_optimizer": warm_optimizer.state_dict() if warm_optimizer else None,
                    "warm_scheduler": warm_scheduler.state_dict() if warm_scheduler else None,
                    "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer else None,
                    "scaler": scaler.state_dict() if use_scaler else None,
                    "epoch": epoch,
                    "global_step": global_step,
                    "rng": get_rng_state(),
                    "best": best,
                    "config": config_to_dict(cfg),
                },
                last_path,
            )
            if (epoch + 1) % cfg.checkpoint_period == 0 or is_last:
                _link_or_copy(last_path, ckpt_dir / f"epoch_{epoch + 1:03d}.pt")
        epochs_done += 1
        if stop_after_epochs is not None and epochs_done >= stop_after_epochs and not is_last:
            stopped_early = True
            logger.log("stop", epoch=epoch, global_step=global_step)
            logger.print(f"stopped after epoch {epoch + 1}/{T}; continue with --resume")
            break

    dist_utils.barrier()
    if main and not stopped_early:
        import json

        summary = {
            "final": last_eval,
            "best": best,
            "epochs": T,
            "global_step": global_step,
            "train_time_s": round(time.time() - run_start, 1),
            "world_size": info.world_size,
        }
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        if final is not None:
            logger.print(final.table(title="final"))
        if best is not None:
            logger.print(f"best mAP {100 * best['mAP']:.1f} at epoch {best['epoch']}")
        logger.print(f"run folder: {out_dir}")
    logger.close()
    return out_dir
