"""Thin helpers over ``torch.distributed`` for torchrun-launched jobs.

``torchrun --nproc_per_node N -m reidkit.cli train -c ...`` sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
reads them and initialises the default process group (NCCL on CUDA, gloo on CPU).
Without those variables everything here degrades to single-process no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "env_world",
    "init_from_env",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_gather_variable",
    "shard_bounds",
    "broadcast_buffers",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this call created the process group (destroy at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables."""

    def _int(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError as exc:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc

    return _int("RANK", 0), _int("WORLD_SIZE", 1), _int("LOCAL_RANK", 0)


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: '{pref}' requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_from_env(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the process group if launched by torchrun; return the rank info and device."""
    rank, world, local_rank = env_world()
    device = resolve_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, False), device
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, True), device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if _active() and get_world_size() > 1:
        dist.barrier()


def _comm_device(fallback: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks, in rank order.

    Each rank may hold a different number of rows ``(N_r, *S)`` (trailing shape ``S`` and
    dtype must agree); returns ``(sum_r N_r, *S)`` on the input's device. Single process:
    returns the input.
    """
    if not _active() or get_world_size() == 1:
        return tensor
    world = get_world_size()
    comm = _comm_device(tensor.device)
    local = tensor.to(comm).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=comm)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    max_n = max(counts)
    if local.shape[0] < max_n:
        pad = local.new_zeros((max_n - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad], 0)
    buffers = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(buffers, local)
    out = torch.cat([b[:c] for b, c in zip(buffers, counts)], 0)
    return out.to(tensor.device)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers (e.g. BatchNorm running statistics) from rank ``src`` to
    all ranks, so every rank evaluates the same model as the one rank ``src`` saves."""
    if not _active() or get_world_size() == 1:
        return
    for buf in module.buffers():
        if dist.get_backend() == "nccl" or buf.device.type == "cpu":
            dist.broadcast(buf, src)
        else:  # gloo with accelerator tensors
            tmp = buf.detach().cpu()
            dist.broadcast(tmp, src)
            buf.copy_(tmp)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of ``n`` items owned by ``rank`` (sizes differ by <= 1),
    so concatenating the shards in rank order restores the original order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def cleanup(info: DistInfo, sync: bool = True) -> None:
    """Destroy the process group if :func:`init_from_env` created it.

    ``sync``: wait for every rank first (gloo aborts a process whose group is torn down
    while a peer still talks to it); pass ``False`` on error paths, where the other ranks
    may never arrive.
    """
    if info.initialized_here and _active():
        if sync:
            barrier()
        dist.destroy_process_group()
