"""Atomic, pickle-free checkpoints and RNG state capture.

Checkpoints are plain ``torch.save`` dicts that contain only tensors and primitive
containers, so they load with ``torch.load(weights_only=True)`` (no code is ever
unpickled). Writes go to a temporary file in the same folder, are ``fsync``-ed, then
``os.replace``-d over the target: a crash mid-write leaves the previous file intact.

Layout of a training checkpoint (``checkpoints/last.pt``)::

    {"format": "reidkit.checkpoint/2", "model": state_dict, "num_classes": int,
     "optimizers": {name: state}, "schedulers": {name: state}, "scaler": {...} | None,
     "hooks": {hook name: state}, "epoch": int (last finished, 0-based),
     "global_step": int, "train_time_s": float (all sessions), "skipped_in_loader": int,
     "rng": {...}, "best": {...} | None,
     "config": dict}

Version 1 files (one ``optimizer`` plus ``warm_optimizer`` / ``aux_optimizer``) are
upgraded on resume by :func:`upgrade_training_state`.
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reidkit.errors import DiskFullError, describe_load_error, format_bytes, one_line

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "disk_full_error",
    "load_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "extract_state_dict",
    "upgrade_training_state",
    "clean_stale_tmp",
    "resolve_weights",
    "state_dict_mismatch",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "reidkit.checkpoint/2"
_FORMATS = ("reidkit.checkpoint/1", CHECKPOINT_FORMAT)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (tmp file + fsync + ``os.replace``).

    Raises:
        DiskFullError: the disk (or quota) is full; the message names the file, the space
            needed and free, and that the previous ``path`` is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise fully before touching the disk
    atomic_write_bytes(path, buffer.getbuffer())
    return path


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically: a ``.NAME.tmp-PID`` file in the same folder,
    fsync, ``os.replace``; on any failure the tmp file is removed and ``path`` is untouched.

    Raises:
        DiskFullError: on ``ENOSPC`` / ``EDQUOT``, naming the file and the space needed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(path, len(data), exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


def disk_full_error(path: Path, needed: int, exc: OSError) -> DiskFullError:
    """A :class:`DiskFullError` for writing ``needed`` bytes to ``path``."""
    try:
        free = f", {format_bytes(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    kept = (
        f"the previous {path.name} is intact"
        if path.exists()
        else f"no earlier {path.name} existed; nothing else was touched"
    )
    err = DiskFullError(
        f"{path}: {exc.strerror or 'no space left on device'} while writing "
        f"{format_bytes(needed)} ({needed} bytes){free} on {path.parent}; nothing was lost: "
        f"{kept} and the partial file was removed; free some space and run again"
    )
    err.errno = exc.errno  # (a filename would change str(err))
    return err


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 ``text`` (e.g. ``metrics.json``)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` files that :func:`atomic_save` left behind when its process
    was killed mid-write (a live writer's PID is left alone). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def upgrade_training_state(state: dict, path: str | Path = "checkpoint") -> dict:
    """A training checkpoint in the current layout (version 1 files are converted:
    ``optimizer`` -> ``optimizers["main"]``, ``warm_optimizer`` -> ``"warm"``,
    ``aux_optimizer`` -> ``"center"``, ``best`` -> the eval hook's state)."""
    fmt = state.get("format")
    if fmt not in _FORMATS or "epoch" not in state or "rng" not in state:
        raise ValueError(f"{path}: not a reidkit training checkpoint (format {fmt!r})")
    if fmt == CHECKPOINT_FORMAT:
        return state
    optimizers = {"main": state["optimizer"]}
    schedulers = {"main": state["scheduler"]}
    if state.get("warm_optimizer") is not None:
        optimizers["warm"] = state["warm_optimizer"]
        schedulers["warm"] = state["warm_scheduler"]
    if state.get("aux_optimizer") is not None:
        optimizers["center"] = state["aux_optimizer"]
        schedulers["center"] = {"last_epoch": -1.0}
    out = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}
    out.update(
        format=CHECKPOINT_FORMAT,
        optimizers=optimizers,
        schedulers=schedulers,
        hooks={"eval": {"best": state.get("best"), "last": None}},
    )
    return out


def resolve_weights(weights: str | Path) -> Path:
    """A weights file from a path: files are returned as they are; a run folder (or its
    ``checkpoints/`` folder) gives ``checkpoints/best.pt``, else ``last.pt``.

    Raises:
        FileNotFoundError: naming the path (and what was looked for in a folder).
    """
    p = Path(weights)
    if p.is_file():
        return p
    if p.is_dir():
        folders = [p / "checkpoints", p] if p.name != "checkpoints" else [p]
        for folder in folders:
            for name in ("best.pt", "last.pt"):
                if (folder / name).is_file():
                    return folder / name
        raise FileNotFoundError(
            f"weights: {p} is a folder without checkpoints/best.pt or checkpoints/last.pt "
            "(pass a run folder or a .pt/.pth/.safetensors file)"
        )
    raise FileNotFoundError(
        f"weights file not found: {p} (expected a checkpoint .pt, a .pth / .safetensors "
        "weights file or a run folder)"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint or weights file with ``weights_only=True``.

    ``.safetensors`` files are read with safetensors and returned as ``{"model": tensors}``.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file on problems.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"model": load_file(str(path), device=str(map_location))}
        except Exception as exc:  # SafetensorError: bad header, truncated, not safetensors
            raise ValueError(
                f"{path}: not a valid .safetensors file (corrupt or truncated?): {one_line(exc)}"
            ) from exc
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that needs code
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True): {describe_load_error(exc)}"
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a dict (state dict or checkpoint), got {type(obj).__name__}"
        )
    return obj


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The model state dict in a reidkit checkpoint, a ``{"state_dict": ...}`` /
    ``{"model": ...}`` wrapper, or a bare state dict; strips ``module.`` prefixes."""
    for key in ("model", "state_dict", "model_state"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise ValueError(f"not a model state dict: entry '{bad}' is not a tensor")
    prefixes = ("module.", "_orig_mod.")
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for pre in prefixes:
                if k.startswith(pre):
                    k = k[len(pre) :]
                    changed = True
        out[k] = v
    return out


# ------------------------------------------------------------------------------ RNG
def get_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors / primitives only."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].cpu().numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)


# ----------------------------------------------------------------------- model loading
def _infer_num_classes(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Number of identities of a state dict, from tensors whose first dimension is the
    class count in ``model`` (built with one class)."""
    counts = set()
    for key, tensor in model.state_dict().items():
        other = state.get(key)
        if (
            other is not None
            and other.shape != tensor.shape
            and tensor.dim() >= 1
            and tensor.shape[0] == 1
            and other.shape[1:] == tensor.shape[1:]
        ):
            counts.add(int(other.shape[0]))
    return counts.pop() if len(counts) == 1 else None


def load_model(
    cfg, weights: str | Path, num_classes: int | None = None, device: str | torch.device = "cpu"
):
    """Build ``cfg.model.name`` and load ``weights`` (a run's ``last.pt``/``best.pt``, a
    ``.pt``/``.pth`` state dict or a ``.safetensors`` file) with ``weights_only=True``.

    ``num_classes`` defaults to the checkpoint's ``num_classes`` or is inferred from the
    classifier shapes. Returns the model in eval mode on ``device``. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the mismatched keys
    when the weights do not fit the configured model.
    """
    from reidkit.methods import build_method

    weights = resolve_weights(weights)
    cfg = cfg.model_copy(deep=True)
    cfg.model.pretrained = None  # the weights replace any ImageNet initialisation
    obj = load_checkpoint(weights)
    try:
        state = extract_state_dict(obj)
    except ValueError as exc:
        raise ValueError(f"{weights}: {exc}") from None
    if num_classes is None:
        num_classes = obj.get("num_classes") if isinstance(obj.get("num_classes"), int) else None
    if num_classes is None:
        probe = build_method(cfg, 1)
        num_classes = _infer_num_classes(probe, state)
        if num_classes is None:
            num_classes = 1
        del probe
    model = build_method(cfg, num_classes)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"{weights}: weights do not match model '{cfg.model.name}' "
            f"({cfg.model.backbone}): " + mismatch + "; use the config the weights "
            "were trained with (-c RUN_FOLDER or its config.yaml)"
        )
    model.load_state_dict(state)
    return model.to(device).eval()


def state_dict_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """How a weights file's ``state`` fails to fit a model's ``own`` state dict: missing and
    unexpected keys and tensors of other shapes (a few of each named); ``""`` when it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
    return ", ".join(parts)
