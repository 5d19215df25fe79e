"""Episodic training and evaluation of the few-shot models.

``train_fewshot(cfg)`` writes a run folder ``cfg.output_dir``::

    config.yaml            the resolved config
    log.jsonl              one JSON row per log period / epoch / evaluation
    checkpoints/last.pt    after every epoch (atomic; model, optimiser, RNG, epoch, best)
    checkpoints/best.pt    the best validation accuracy so far (when validating)
    metrics.json           at the end: test accuracy +- 95 % CI (and CAN+T)

Resume (``resume=True``) continues from ``last.pt`` at the next epoch and is exact: the
episodes and their augmentation depend only on ``(seed, epoch, episode)``, so a run split
into pieces ends with the same weights as one run.

``evaluate_fewshot(model, split, cfg)`` scores ``cfg.eval.episodes`` seeded test episodes.
When the backbone maps of every image the episodes use fit in ``eval.feature_cache_mb``,
each image goes through the backbone once and episodes are scored from the cache (test
transforms are deterministic and BN is in eval mode, so this is exact); otherwise episodes
are streamed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from reidkit.data.transforms import (
    ColorJitter,
    Compose,
    Normalize,
    RandomErasing,
    RandomHorizontalFlip,
    RandomPadCrop,
    Resize,
    Transform,
)
from reidkit.engine.checkpoint import (
    atomic_save,
    extract_state_dict,
    get_rng_state,
    load_checkpoint,
    set_rng_state,
    state_dict_mismatch,
)
from reidkit.engine.distributed import resolve_device
from reidkit.engine.hooks import link_or_copy
from reidkit.engine.log import RunLogger, format_duration
from reidkit.fewshot.config import FewShotConfig, dump_fewshot_config, lr_at_epoch
from reidkit.fewshot.datasets import FewShotSplit, load_fewshot_dataset
from reidkit.fewshot.episodes import EpisodeDataset, EpisodeSampler, ImageIndexDataset
from reidkit.fewshot.metrics import mean_confidence_interval
from reidkit.fewshot.model import FewShotNet, build_fewshot_model, convert_can_state_dict

__all__ = [
    "FEWSHOT_CHECKPOINT_FORMAT",
    "FewShotNonFiniteLossError",
    "build_fewshot_transforms",
    "evaluate_fewshot",
    "load_fewshot_weights",
    "save_episode_accuracies",
    "train_fewshot",
]

FEWSHOT_CHECKPOINT_FORMAT = "reidkit.fewshot.checkpoint/1"


class FewShotNonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (the last good checkpoint is kept)."""


# --------------------------------------------------------------------------- helpers
def build_fewshot_transforms(cfg: FewShotConfig, train: bool) -> Compose:
    """Training: ``Resize(H, W) -> pad-``pad`` random crop -> flip -> [colour jitter] ->
    normalise -> random erasing`` (the CAN code's ``RandomCrop(84, padding=8)``,
    ``RandomHorizontalFlip``, ``RandomErasing(0.5)`` filling the box with
    ``data.random_erasing_values``). Test: ``Resize -> normalise``. Images already at the
    size (the 84x84 caches) are not resampled."""
    d = cfg.data
    size = (d.height, d.width)
    ts: list[Transform] = [Resize(size)]
    if train:
        if d.pad > 0:
            ts.append(RandomPadCrop(d.pad, size))
        if d.hflip_p > 0:
            ts.append(RandomHorizontalFlip(d.hflip_p))
        if d.color_jitter > 0:
            ts.append(ColorJitter(d.color_jitter, d.color_jitter, d.color_jitter))
    ts.append(Normalize(d.mean, d.std))
    if train and d.random_erasing_p > 0:
        ts.append(
            RandomErasing(
                p=d.random_erasing_p,
                sl=d.random_erasing_sl,
                sh=d.random_erasing_sh,
                r1=d.random_erasing_r1,
                fill=d.random_erasing_fill,
                mean=d.random_erasing_values,
                inplace=True,
            )
        )
    return Compose(ts)


def _loader(dataset: Any, batch: int, workers: int, seed: int, drop_last: bool) -> DataLoader:
    # an explicit generator: creating the iterator does not consume the global torch RNG
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def load_fewshot_weights(
    cfg: FewShotConfig, weights: str | Path, device: str | torch.device = "cpu"
) -> FewShotNet:
    """Build the configured model and load ``weights`` (a run's ``last.pt`` / ``best.pt``, a
    state dict, ``.safetensors``, or a checkpoint of the authors' CAN code) with
    ``weights_only=True``. The number of training classes comes from the classifier."""
    obj = load_checkpoint(weights)
    state = convert_can_state_dict(extract_state_dict(obj))
    cls = state.get("classifier.weight")
    if cls is None:
        raise ValueError(f"{weights}: no 'classifier.weight' in the weights: not a few-shot model")
    model = build_fewshot_model(cfg, int(cls.shape[0]))
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"{weights}: weights do not fit model.name={cfg.model.name}, model.width="
            f"{cfg.model.width}, data.height/width={cfg.data.height}x{cfg.data.width}: " + mismatch
        )
    model.load_state_dict(state)
    return model.to(device).eval()


# ------------------------------------------------------------------------ evaluation
def _episode_batches(n: int, batch: int) -> list[range]:
    return [range(s, min(n, s + batch)) for s in range(0, n, batch)]


@torch.no_grad()
def evaluate_fewshot(
    model: FewShotNet,
    split: FewShotSplit,
    cfg: FewShotConfig,
    episodes: int | None = None,
    transductive: bool | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Accuracy (percent) +- 95 % CI over seeded ``way``-way ``shot``-shot test episodes
    with ``episode.test_queries`` queries per class.

    Returns ``{"split", "episodes", "way", "shot", "queries", "model", "accuracy",
    "ci95", "std", "seconds", "feature_cache"}`` plus ``"transductive": {"accuracy",
    "ci95", "std", "iterations", "counts"}`` when transductive inference is on, and
    ``"per_episode": {"accuracy": (E,) array[, "transductive": (E,) array]}`` (percent;
    :func:`save_episode_accuracies` moves them to an ``.npz`` file).
    """
    ev, ep = cfg.eval, cfg.episode
    n_episodes = int(episodes if episodes is not None else ev.episodes)
    use_t = ev.transductive if transductive is None else bool(transductive)
    device = device or next(model.parameters()).device
    way, shot, queries = ep.way, ep.shot, ep.test_queries
    sampler = EpisodeSampler(split.labels, way, shot, queries, seed=ev.seed, split=split.name)
    model.eval()
    transform = build_fewshot_transforms(cfg, train=False)
    start = time.time()
    acc = np.zeros(n_episodes)
    acc_t = np.zeros(n_episodes)
    support_labels = torch.arange(way, device=device).repeat_interleave(shot)
    query_labels = torch.arange(way, device=device).repeat_interleave(queries)

    def score(idx: range, s_maps: Tensor, q_maps: Tensor) -> None:
        b = s_maps.shape[0]
        s_lab = support_labels.expand(b, -1)
        scores = model.scores(s_maps, s_lab, q_maps, way)
        acc[idx.start : idx.stop] = (scores.argmax(-1) == query_labels).float().mean(1).cpu()
        if use_t:
            scores_t = model.transductive_scores(
                s_maps,
                s_lab,
                q_maps,
                way,
                ev.transductive_iterations,
                ev.transductive_fraction,
                initial=scores,
            )
            acc_t[idx.start : idx.stop] = (
                (scores_t.argmax(-1) == query_labels).float().mean(1).cpu()
            )

    eps = [sampler.episode(i) for i in range(n_episodes)]
    needed = np.unique(
        np.concatenate([np.concatenate([e.support.ravel(), e.query.ravel()]) for e in eps])
    )
    h, w = model.map_size
    map_bytes = model.backbone.out_channels * h * w * 4
    cached = len(needed) * map_bytes <= ev.feature_cache_mb * 2**20
    if cached:
        images = ImageIndexDataset(split, needed, transform)
        loader = _loader(images, 128, cfg.data.num_workers, ev.seed, drop_last=False)
        bar = _bar(len(images), f"features ({split.name})", progress)
        feats = []
        for x in loader:
            feats.append(model.extract(x.to(device, non_blocking=True)))
            if bar is not None:
                bar.update(len(x))
        if bar is not None:
            bar.close()
        maps = torch.cat(feats)
        bar = _bar(n_episodes, f"episodes ({split.name})", progress)
        for idx in _episode_batches(n_episodes, max(ev.batch, 16)):
            rows_s = np.searchsorted(needed, np.stack([eps[i].support.ravel() for i in idx]))
            rows_q = np.searchsorted(needed, np.stack([eps[i].query.ravel() for i in idx]))
            score(
                idx,
                maps[torch.from_numpy(rows_s).to(device)],
                maps[torch.from_numpy(rows_q).to(device)],
            )
            if bar is not None:
                bar.update(len(idx))
    else:
        dataset = EpisodeDataset(split, sampler, transform, n_episodes, augment=False)
        loader = _loader(dataset, ev.batch, cfg.data.num_workers, ev.seed, drop_last=False)
        bar = _bar(n_episodes, f"episodes ({split.name})", progress)
        for batch in loader:
            sup, qry = batch["support"].to(device), batch["query"].to(device)
            b, s = sup.shape[:2]
            maps = model.extract(torch.cat([sup.flatten(0, 1), qry.flatten(0, 1)]))
            first = int(batch["episode"][0])
            score(
                range(first, first + b),
                maps[: b * s].unflatten(0, (b, s)),
                maps[b * s :].unflatten(0, (b, qry.shape[1])),
            )
            if bar is not None:
                bar.update(b)
    if bar is not None:
        bar.close()

    mean, ci = mean_confidence_interval(acc * 100)
    out: dict[str, Any] = {
        "split": split.name,
        "episodes": n_episodes,
        "way": way,
        "shot": shot,
        "queries": queries,
        "model": cfg.model.name,
        "accuracy": round(mean, 4),
        "ci95": round(ci, 4),
        "std": round(float(np.std(acc * 100)), 4),
        "seconds": round(time.time() - start, 2),
        "feature_cache": bool(cached),
        "seed": ev.seed,
    }
    if use_t:
        from reidkit.fewshot.model import transductive_counts

        mean_t, ci_t = mean_confidence_interval(acc_t * 100)
        out["transductive"] = {
            "accuracy": round(mean_t, 4),
            "ci95": round(ci_t, 4),
            "std": round(float(np.std(acc_t * 100)), 4),
            "iterations": ev.transductive_iterations,
            "counts": transductive_counts(
                way * queries, ev.transductive_iterations, ev.transductive_fraction
            ),
        }
    out["per_episode"] = {"accuracy": acc * 100}
    if use_t:
        out["per_episode"]["transductive"] = acc_t * 100
    return out


def save_episode_accuracies(result: dict[str, Any], path: str | Path) -> Path:
    """Move ``result["per_episode"]`` into the ``.npz`` file ``path`` (atomically), with the
    episode settings, so two runs can be compared episode by episode
    (``reidkit fewshot compare``); ``result`` keeps only the summary."""
    per = result.pop("per_episode")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    settings = [result["split"], result["way"], result["shot"], result["queries"]]
    with open(tmp, "wb") as f:
        np.savez(
            f,
            settings=np.array([str(x) for x in settings]),
            seed=np.array(result.get("seed", -1)),
            **per,
        )
    os.replace(tmp, path)
    return path


def format_result(result: dict[str, Any]) -> str:
    """One or two lines: ``<model> <way>-way <shot>-shot: acc +- ci (n episodes)``."""
    name = {"can": "CAN", "proto": "Prototype baseline"}.get(result["model"], result["model"])
    head = f"{result['way']}-way {result['shot']}-shot, {result['episodes']} {result['split']} episodes"
    lines = [f"{name:>20s}  {result['accuracy']:6.2f} +- {result['ci95']:.2f} %   ({head})"]
    t = result.get("transductive")
    if t:
        lines.append(f"{name + '+T':>20s}  {t['accuracy']:6.2f} +- {t['ci95']:.2f} %")
    return "\n".join(lines)


# -------------------------------------------------------------------------- training
def _clear_run(out_dir: Path) -> None:
    for name in ("log.jsonl", "metrics.json"):
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / "checkpoints").is_dir():
        shutil.rmtree(out_dir / "checkpoints")


def train_fewshot(
    cfg: FewShotConfig,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Episodic training of ``cfg.model.name`` (see the module docstring for the run folder).

    ``stop_after_epochs``: stop after that many epochs of this call (continue later with
    ``resume=True``). Returns the final metrics (also written to ``metrics.json``) once all
    epochs are done, else ``None``.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint.
        ValueError: the output folder already holds a run (without ``resume`` /
            ``overwrite``), or the data / config do not fit.
        FewShotNonFiniteLossError: the loss became NaN or infinite.
    """
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
    if overwrite and not resume:
        _clear_run(out_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(out_dir)
    device = resolve_device(cfg.device)

    _seed_everything(cfg.seed)
    dataset = load_fewshot_dataset(cfg.data)
    train_split = dataset.split("train")
    num_classes = train_split.num_classes
    model = build_fewshot_model(cfg, num_classes).to(device)
    dump_fewshot_config(cfg, out_dir / "config.yaml")
    solver, ep = cfg.solver, cfg.episode
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lr_at_epoch(solver, 0),
        momentum=solver.momentum,
        nesterov=solver.nesterov,
        weight_decay=solver.weight_decay,
    )
    sampler = EpisodeSampler(
        train_split.labels, ep.way, ep.shot, ep.train_queries, seed=cfg.seed, split="train"
    )
    episodes = EpisodeDataset(
        train_split,
        sampler,
        build_fewshot_transforms(cfg, train=True),
        solver.episodes_per_epoch,
        seed=cfg.seed,
    )
    n_iters = solver.episodes_per_epoch // ep.batch
    if n_iters < 1:
        raise ValueError(
            f"solver.episodes_per_epoch={solver.episodes_per_epoch} is smaller than "
            f"episode.batch={ep.batch}: no iteration per epoch"
        )
    val_name = cfg.eval.val_split if cfg.eval.val_split in dataset.splits else "test"
    if val_name != cfg.eval.val_split and cfg.eval.period > 0:
        logger.print(
            f"note: {dataset.name} has no '{cfg.eval.val_split}' split; validating on test"
        )

    total_epochs = solver.epochs
    start_epoch, global_step = 0, 0
    best: dict[str, Any] | None = None
    state = None
    if resume:
        state = load_checkpoint(last_path, map_location=device)
        if state.get("format") != FEWSHOT_CHECKPOINT_FORMAT:
            raise ValueError(f"{last_path}: not a reidkit few-shot training checkpoint")
        if state.get("num_classes") != num_classes:
            raise ValueError(
                f"{last_path}: trained with {state.get('num_classes')} classes, the train "
                f"split now has {num_classes}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        global_step = int(state["global_step"])
        best = state.get("best")
        logger.print(f"resuming {out_dir} at epoch {start_epoch + 1}/{total_epochs}")
        logger.log("resume", epoch=start_epoch, global_step=global_step)
    logger.print(dataset.summary())
    if val_name != cfg.eval.val_split and cfg.eval.period > 0:
        logger.print(
            f"note: {dataset.name} has no '{cfg.eval.val_split}' split; validating on test"
        )
    logger.print(
        f"train: {cfg.model.name} (ResNet-12 width {cfg.model.width}, maps "
        f"{model.map_size[0]}x{model.map_size[1]}), {ep.way}-way {ep.shot}-shot, "
        f"{ep.train_queries} queries/class, {total_epochs} epochs x {n_iters} iterations x "
        f"{ep.batch} episodes, device {device}"
    )
    if start_epoch >= total_epochs:
        logger.print(f"{out_dir}: the run already finished all {total_epochs} epochs")
    if state is not None:
        set_rng_state(state["rng"])
    else:
        _seed_everything(cfg.seed + 7919)
    del state

    loader = _loader(episodes, ep.batch, cfg.data.num_workers, cfg.seed, drop_last=True)
    run_start = time.time()
    done_this_call = 0
    for epoch in range(start_epoch, total_epochs):
        lr = lr_at_epoch(solver, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        episodes.set_epoch(epoch)
        model.train()
        sums = {"total": 0.0, "global": 0.0, "nn": 0.0, "acc": 0.0}
        count = 0
        epoch_start = time.time()
        bar = _bar(n_iters, f"epoch {epoch + 1}/{total_epochs}", progress)
        for batch in loader:
            support = batch["support"].to(device, non_blocking=True)
            query = batch["query"].to(device, non_blocking=True)
            s_lab = batch["support_labels"].to(device)
            q_lab = batch["query_labels"].to(device)
            q_cls = batch["query_classes"].to(device)
            outputs = model(support, s_lab, query, q_lab, ep.way)
            losses = model.compute_loss(
                outputs, q_lab, q_cls, cfg.loss.global_weight, cfg.loss.nn_weight
            )
            total = losses["total"]
            if not torch.isfinite(total):
                msg = (
                    f"non-finite loss {float(total)} at epoch {epoch + 1}, step {global_step} "
                    f"({', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())}); the last "
                    f"good checkpoint is {last_path}"
                )
                logger.log("error", message=msg)
                raise FewShotNonFiniteLossError(msg)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if solver.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), solver.grad_clip)
            optimizer.step()
            global_step += 1
            count += 1
            with torch.no_grad():
                # episode accuracy of the position-averaged nearest-neighbour logits
                pred = outputs["nn_logits"].mean((-2, -1)).argmax(-1)
                acc = float((pred == q_lab.reshape(-1)).float().mean())
            for k in ("total", "global", "nn"):
                sums[k] += float(losses[k].detach())
            sums["acc"] += acc
            if global_step % cfg.log_period == 0:
                logger.log(
                    "train",
                    step=global_step,
                    epoch=epoch + 1,
                    lr=lr,
                    **{k: round(float(v.detach()), 5) for k, v in losses.items()},
                    acc=round(acc, 4),
                )
            if bar is not None:
                bar.set_postfix(
                    loss=f"{sums['total'] / count:.3f}", acc=f"{sums['acc'] / count:.3f}"
                )
                bar.update(1)
        if bar is not None:
            bar.close()
        means = {k: round(v / max(count, 1), 5) for k, v in sums.items()}
        elapsed = time.time() - epoch_start
        logger.log("epoch", epoch=epoch + 1, lr=lr, seconds=round(elapsed, 2), **means)
        done_this_call += 1
        remaining = (total_epochs - epoch - 1) * (time.time() - run_start) / done_this_call
        logger.print(
            f"epoch {epoch + 1}/{total_epochs}  lr {lr:.3g}  loss {means['total']:.4f} "
            f"(global {means['global']:.4f}, nn {means['nn']:.4f})  train acc "
            f"{100 * means['acc']:.2f}%  [{format_duration(elapsed)}, ETA "
            f"{format_duration(remaining)}]"
        )
        improved = False
        last_epoch = epoch + 1 == total_epochs
        period = cfg.eval.period
        if period > 0 and ((epoch + 1) % period == 0 or last_epoch):
            val = evaluate_fewshot(
                model,
                dataset.split(val_name),
                cfg,
                episodes=cfg.eval.val_episodes,
                transductive=False,
                progress=progress,
                device=device,
            )
            val.pop("per_episode")
            logger.log("val", epoch=epoch + 1, **val)
            logger.print(f"  val ({val_name}): {val['accuracy']:.2f} +- {val['ci95']:.2f} %")
            if best is None or val["accuracy"] > best["accuracy"]:
                best = {"epoch": epoch + 1, "accuracy": val["accuracy"], "ci95": val["ci95"]}
                improved = True
        atomic_save(
            {
                "format": FEWSHOT_CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "num_classes": num_classes,
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "rng": get_rng_state(),
                "best": best,
                "config": cfg.model_dump(mode="json"),
            },
            last_path,
        )
        if improved:
            link_or_copy(last_path, ckpt_dir / "best.pt")
        if stop_after_epochs is not None and done_this_call >= stop_after_epochs and not last_epoch:
            logger.print(f"stopped after epoch {epoch + 1}/{total_epochs}; continue with --resume")
            return None

    test = evaluate_fewshot(
        model, dataset.split(cfg.eval.split), cfg, progress=progress, device=device
    )
    save_episode_accuracies(test, out_dir / f"{cfg.eval.split}_episodes.npz")
    logger.log("test", **test)
    logger.print(format_result(test))
    summary = {
        "epochs": total_epochs,
        "global_step": global_step,
        "weights": str(last_path),
        "test": test,
        "best_val": best,
        "train_seconds_this_call": round(time.time() - run_start, 1),
    }
    tmp = out_dir / f".metrics.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "metrics.json")
    logger.close()
    return summary
