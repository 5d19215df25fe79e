"""Pretraining a backbone on synthetic persons (``reidkit pretrain``).

:func:`pretrain` trains a config with the normal :class:`~reidkit.engine.trainer.Trainer`
(so resume, progress with ETA, DDP under torchrun and AMP work as for any run), then
writes the trained backbone alone, in the key layout of the real checkpoints
(torchvision's ``conv1``, ``bn1``, ``layer1.0.conv1``, ... for the ResNets; no
``backbone.`` prefix), as a ``.safetensors`` file, atomically, with a JSON card beside it
(``weights.json`` next to ``weights.safetensors``). ``model.pretrained=weights.safetensors``
then starts any method from it.

Backbones of chosen epochs (``export_epochs``) are written during training by
:class:`BackboneExportHook` (``weights.e003.safetensors`` + card). With the default
constant learning rate after a one-epoch warm-up (``configs/pretrain/synth.yaml``), the
backbone of epoch ``e`` is the one a run of ``e`` epochs ends with.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from reidkit.config import Config, config_to_dict
from reidkit.engine import distributed as dist_utils
from reidkit.engine.hooks import HookBase

__all__ = [
    "BACKBONE_FORMAT",
    "BackboneExportHook",
    "backbone_tensors",
    "card_path",
    "epoch_weights_path",
    "pretrain",
    "verify_backbone_file",
    "write_backbone",
]

#: ``format`` of the JSON card.
BACKBONE_FORMAT = "reidkit-backbone/1"


def card_path(weights: str | os.PathLike) -> Path:
    """The JSON card of a weights file: ``weights.safetensors`` -> ``weights.json``."""
    return Path(weights).with_suffix(".json")


def epoch_weights_path(out: str | os.PathLike, epoch: int) -> Path:
    """Where the backbone of ``epoch`` goes: ``weights.safetensors`` ->
    ``weights.e003.safetensors``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.e{epoch:03d}{out.suffix}")


def backbone_tensors(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a method's state dict, without the prefix (CPU,
    contiguous): the layout ``build_backbone(name).state_dict()`` has."""
    out = {
        k[len("backbone.") :]: v.detach().to("cpu").contiguous()
        for k, v in model_state.items()
        if k.startswith("backbone.")
    }
    if not out:
        shown = sorted(model_state)[:5]
        raise ValueError(
            f"the model has no 'backbone.' parameters (keys start with {shown}); pretraining "
            "exports the `backbone` module of a method"
        )
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_replace(tmp: Path, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # like a plain open(): the writer may create 0600 files
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_backbone(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, card: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``tensors`` to ``path`` (``.safetensors``) and ``card`` (plus the file's
    ``sha256``) to :func:`card_path`, each atomically (temporary file, fsync, rename).
    The weights are renamed into place first, so a card always describes the file beside
    it. Returns (weights path, card path)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: backbone weights are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    card_file = card_path(path)
    card_tmp = card_file.with_name(f".{card_file.name}.tmp-{os.getpid()}")
    try:
        meta = {"format": BACKBONE_FORMAT, "backbone": str(card.get("backbone", ""))}
        save_file(dict(tensors), str(tmp), metadata=meta)
        card = {**card, "weights": path.name, "sha256": _sha256(tmp)}
        card_tmp.write_text(json.dumps(card, indent=2) + "\n")
        _fsync_replace(tmp, path)
        _fsync_replace(card_tmp, card_file)
    finally:
        tmp.unlink(missing_ok=True)
        card_tmp.unlink(missing_ok=True)
    return path, card_file


def verify_backbone_file(path: str | os.PathLike, cfg: Config) -> None:
    """Load ``path`` into a fresh ``build_backbone`` of ``cfg.model``'s backbone; raise
    ``RuntimeError`` when a key is missing or left over (the export is then unusable)."""
    from reidkit.models import build_backbone, load_pretrained

    m = cfg.model
    fresh = build_backbone(
        m.backbone,
        last_stride=m.last_stride,
        ibn=m.ibn,
        non_local_layers=m.non_local_layers if m.non_local else None,
        non_local_inner_channels=m.non_local_inner_channels,
        **m.backbone_options,
    )
    report = load_pretrained(fresh, path)
    if report.missing or report.unexpected:
        raise RuntimeError(
            f"{path}: the exported backbone does not load cleanly into {m.backbone}: "
            f"missing {report.missing[:5]}, unexpected {report.unexpected[:5]}"
        )


def _init_info(cfg: Config) -> dict[str, Any] | None:
    init = cfg.model.pretrained
    if not init:
        return None
    path = Path(init)
    return {"path": str(path), "sha256": _sha256(path) if path.is_file() else None}


def build_card(
    cfg: Config,
    *,
    epoch: int,
    global_step: int,
    metrics: Mapping[str, Any] | None,
    train_time_s: float | None,
    run_dir: str | os.PathLike,
    num_query: int | None = None,
    num_gallery: int | None = None,
) -> dict[str, Any]:
    """The JSON card of a backbone trained for ``epoch`` epochs (``global_step`` steps)."""
    import reidkit

    data, model = cfg.data, cfg.model
    render = data.render.model_dump(mode="json") if data.render is not None else None
    validation = None
    if metrics:
        validation = {
            "set": "query/gallery of the training dataset (disjoint identities)",
            "epoch": metrics.get("epoch", epoch),
            **{k: metrics[k] for k in ("mAP", "rank1", "rank5", "rank10", "mINP") if k in metrics},
            "num_query": num_query,
            "num_gallery": num_gallery,
        }
    return {
        "format": BACKBONE_FORMAT,
        "backbone": model.backbone,
        "backbone_options": dict(model.backbone_options),
        "ibn": model.ibn,
        "last_stride_trained": model.last_stride,
        "key_layout": "the backbone's published layout (torchvision keys for ResNets), no "
        "'backbone.' prefix",
        "usage": "model.pretrained=<this .safetensors file>",
        "init": _init_info(cfg),
        "dataset": data.dataset,
        "preset": render["preset"] if render else data.synth_preset,
        "render": render,
        "seed": cfg.seed,
        "render_seed": render["seed"] if render else None,
        "epochs": epoch,
        "planned_epochs": cfg.solver.classifier_warm_epochs + cfg.solver.max_epochs,
        "iterations": global_step,
        "images_seen": global_step * data.batch_size,
        "input_size": [data.height, data.width],
        "recipe": {
            "method": model.name,
            "loss": f"ce(label_smoothing={cfg.loss.label_smoothing}) + {cfg.loss.metric}"
            f"(margin={cfg.loss.triplet_margin})",
            "optimizer": cfg.solver.optimizer,
            "lr": cfg.solver.lr,
            "scheduler": cfg.solver.scheduler,
            "batch_size": data.batch_size,
            "num_instances": data.num_instances,
            "augmentation": {
                "hflip_p": data.hflip_p,
                "pad": data.pad,
                "color_jitter": data.color_jitter,
                "random_erasing_p": data.random_erasing_p,
            },
            "amp": cfg.amp,
        },
        "validation": validation,
        "train_time_s": None if train_time_s is None else round(float(train_time_s), 1),
        "run_dir": str(run_dir),
        "reidkit_version": reidkit.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class BackboneExportHook(HookBase):
    """Write the backbone (and its card) after each epoch listed in ``epochs`` (1-based),
    to :func:`epoch_weights_path` of ``out``. The card's validation metrics are the
    evaluation of that epoch (run here when ``test.eval_period`` skipped it)."""

    def __init__(self, out: str | os.PathLike, epochs: Iterable[int]) -> None:
        self.out = Path(out)
        self.epochs = {int(e) for e in epochs}
        self.split_sizes: tuple[int, int] | None = None  # (query, gallery) of the run

    def before_train(self) -> None:
        t = self.trainer
        self.split_sizes = (len(t.dataset.query), len(t.dataset.gallery))

    def _metrics(self) -> dict[str, Any] | None:
        t = self.trainer
        done = t.epoch + 1
        last = t.eval_hook.last
        if last is not None and last.get("epoch") == done:
            return last
        from reidkit.engine.evaluator import evaluate_model

        if t.info.distributed:  # every rank evaluates its shard, as EvalHook does
            dist_utils.broadcast_buffers(t.model)
        devices = [t.device.index or 0] if t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate_model(t.cfg, t.model, t.dataset, t.device)
        t.model.train()
        if result is None:
            return None
        return {"epoch": done, **{k: round(float(v), 6) for k, v in result.metrics.items()}}

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epoch + 1
        if done not in self.epochs:
            return
        metrics = self._metrics()
        if not t.info.is_main:
            return
        path = epoch_weights_path(self.out, done)
        card = build_card(
            t.cfg,
            epoch=done,
            global_step=t.ctx.global_step,
            metrics=metrics,
            train_time_s=t.elapsed_before + (time.time() - t.session_start),
            run_dir=t.out_dir,
            num_query=len(t.dataset.query),
            num_gallery=len(t.dataset.gallery),
        )
        write_backbone(backbone_tensors(t.model.state_dict()), path, card)
        verify_backbone_file(path, t.cfg)
        t.logger.print(f"wrote the backbone of epoch {done}: {path} (+ {card_path(path).name})")


def pretrain(
    cfg: Config,
    out: str | os.PathLike,
    *,
    export_epochs: Iterable[int] = (),
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Train ``cfg`` (run folder ``cfg.output_dir``) and write its backbone to ``out``.

    Args:
        cfg: the training config (``configs/pretrain/synth.yaml`` and overrides; any
            dataset works, the synthetic set rendered on the fly is the point).
        out: the ``.safetensors`` file to write; its card goes to :func:`card_path`.
            It must not be the init weights (``model.pretrained``) and must not exist
            unless ``resume`` or ``overwrite``.
        export_epochs: also write the backbone after these epochs
            (:func:`epoch_weights_path`).
        resume, overwrite, stop_after_epochs, progress: as in
            :func:`reidkit.engine.trainer.train`.

    Returns:
        the card of ``out`` on the main process once the run is complete; ``None`` on
        other ranks and when the run stopped early (continue with ``resume=True``).
    """
    from reidkit.engine.checkpoint import load_checkpoint
    from reidkit.engine.trainer import total_epochs, train

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the backbone is written as .safetensors")
    init = cfg.model.pretrained
    if init and Path(init).expanduser().resolve() == out.resolve():
        raise ValueError(f"--out {out} is the init weights file: outputs never overwrite inputs")
    if out.exists() and not (resume or overwrite):
        raise ValueError(
            f"--out {out} already exists: pass --overwrite to replace it, or --resume to "
            "continue its run"
        )
    epochs = sorted({int(e) for e in export_epochs})
    total = total_epochs(cfg)
    bad = [e for e in epochs if not 1 <= e <= total]
    if bad:
        raise ValueError(f"--export-epochs {bad}: epochs are 1..{total}")
    hook = BackboneExportHook(out, epochs)
    run_dir = train(
        cfg,
        resume=resume,
        overwrite=overwrite,
        stop_after_epochs=stop_after_epochs,
        progress=progress,
        hooks=[hook],
    )
    rank, _world, _local = dist_utils.env_world()
    if rank != 0:
        return None
    state = load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")
    done = int(state["epoch"]) + 1
    if done < total:
        return None
    summary_file = Path(run_dir) / "metrics.json"
    final = json.loads(summary_file.read_text()).get("final") if summary_file.is_file() else None
    sizes = hook.split_sizes or (None, None)
    card = build_card(
        cfg,
        epoch=done,
        global_step=int(state["global_step"]),
        metrics=final,
        train_time_s=state.get("train_time_s"),
        run_dir=run_dir,
        num_query=sizes[0],
        num_gallery=sizes[1],
    )
    card["config"] = config_to_dict(cfg)
    write_backbone(backbone_tensors(state["model"]), out, card)
    verify_backbone_file(out, cfg)
    return json.loads(card_path(out).read_text())
