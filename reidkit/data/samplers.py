"""Training samplers: identity-balanced P x K batches and a plain shuffle, DDP-aware.

Both samplers are deterministic functions of ``(seed, epoch)``: call ``set_epoch(epoch)``
before iterating (as with ``DistributedSampler``); resuming therefore only needs the epoch
and the step (``set_epoch(epoch, start_step=step)`` skips the batches already done).

DDP convention: ``batch_size`` is the *global* batch (all ranks together, as in fast-reid's
``IMS_PER_BATCH``); every rank builds the same global batches from the shared seed and keeps
its own slice, so the ranks' batches at a step are disjoint and together form the global
batch. Each rank yields ``batch_size // world_size`` indices per step.

Besides the indices, :meth:`epoch_plan` returns each sample's *global position* in the
epoch's stream; the loader derives per-sample augmentation seeds from it, so augmentation
depends on neither ``num_workers`` nor ``world_size``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PK_EPOCHS", "PKSampler", "ShuffleSampler"]

#: What one epoch of :class:`PKSampler` is (``data.pk_epoch``).
PK_EPOCHS = ("images", "identities")


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def _check_batch_size(
    owner: str, batch_size: int, divisor: int, divisor_name: str, hint: str = ""
) -> None:
    """``batch_size`` must be a positive multiple of ``divisor`` (named ``divisor_name``)."""
    if batch_size < 1 or batch_size % divisor != 0:
        raise ValueError(
            f"{owner}: batch_size ({batch_size}) must be a positive multiple of "
            f"{divisor_name} ({divisor}){hint}"
        )


def _count_batches(num_items: int, per_batch: int, drop_last: bool) -> int:
    """Batches of ``per_batch`` items in ``num_items``: rounded down (``drop_last``) or up,
    and at least 1."""
    nb = num_items // per_batch if drop_last else -(-num_items // per_batch)
    return max(nb, 1)


class _EpochSampler(Sampler[int]):
    """Shared epoch / resume bookkeeping; subclasses implement :meth:`_global_batches`.

    Subclasses call ``super().__init__(seed, rank, world_size, drop_last)`` first (it checks
    the DDP position) and then set ``batch_size``, ``local_batch_size`` and ``num_batches``.
    """

    seed: int
    rank: int
    world_size: int
    drop_last: bool
    batch_size: int
    local_batch_size: int
    num_batches: int

    def __init__(self, seed: int, rank: int, world_size: int, drop_last: bool) -> None:
        _check_rank(rank, world_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_step = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch to iterate; ``start_step`` skips that many (local) batches of it.

        ``len(self)`` stays the full epoch length; only the next iteration is shorter.
        """
        if epoch < 0 or start_step < 0:
            raise ValueError(
                f"set_epoch: epoch and start_step must be >= 0, got {epoch}, {start_step}"
            )
        self.epoch = int(epoch)
        self.start_step = int(start_step)

    def _global_batches(self, epoch: int) -> np.ndarray:
        """``(num_batches, world_size, local_batch_size)`` dataset indices of one epoch."""
        raise NotImplementedError

    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(indices, global_positions)`` for ``epoch`` (default: the current one).

        Both are int64 arrays of length ``len(self)`` (the whole epoch, ignoring
        ``start_step``); ``global_positions`` index the flattened global stream.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        batches = self._global_batches(epoch)
        nb, ws, lb = batches.shape
        positions = np.arange(nb * ws * lb, dtype=np.int64).reshape(nb, ws, lb)
        idx = np.ascontiguousarray(batches[:, self.rank].reshape(-1), dtype=np.int64)
        pos = np.ascontiguousarray(positions[:, self.rank].reshape(-1))
        self._cache = (epoch, idx, pos)
        return idx, pos

    def iter_with_positions(self) -> Iterator[tuple[int, int]]:
        """Yield ``(index, global_position)`` for the current epoch from ``start_step`` on."""
        idx, pos = self.epoch_plan()
        start = self.start_step * self.local_batch_size
        yield from zip(idx[start:].tolist(), pos[start:].tolist())

    def __iter__(self) -> Iterator[int]:
        idx, _ = self.epoch_plan()
        yield from idx[self.start_step * self.local_batch_size :].tolist()

    def __len__(self) -> int:
        return self.num_batches * self.local_batch_size


class PKSampler(_EpochSampler):
    """P identities x K instances per batch (BoT's ``RandomIdentitySampler``, fast-reid's
    ``NaiveIdentitySampler``), with a fixed, exact epoch length.

    Per epoch, each identity's images are shuffled and cut into chunks of K; an identity with
    ``n < K`` images keeps all ``n`` and draws ``K - n`` more *with replacement* from them
    (one chunk). Identities with ``n >= K`` give ``n // K`` chunks (the remainder is left out
    this epoch; a new shuffle next epoch leaves out others). Batches are then built greedily:
    P distinct identities uniformly among those with chunks left, one chunk each. When fewer
    than P identities have chunks left, a fresh round of chunks for every identity is queued
    (after the leftovers), so every batch is complete.

    The epoch has ``C // P`` batches (``drop_last=True``) or ``ceil(C / P)`` (``False``),
    where ``C = sum_id max(n_id, K) // K`` is the number of chunks, i.e. about as many samples
    as the training set has images. ``batch_size`` is global (see the module docstring); a
    rank's local batch holds ``P / world_size`` whole identities.

    ``epoch="identities"`` is the epoch of the MGN-style code bases (SCR's): every identity
    is visited exactly once, with K of its images (drawn without replacement when it has
    ``n >= K``, else all ``n`` plus ``K - n`` drawn with replacement), in a random order of
    identities; the epoch has ``N_ids // P`` batches (``drop_last``; else ``ceil``, the last
    batch completed with identities from the start of the order). On Market-1501 (751
    identities, P = 4) that is 187 batches instead of ~808.

    Args:
        pids: identity label of every dataset index (any hashable ints), length N.
        batch_size: global P * K.
        num_instances: K.
        seed: base seed; the epoch's batches depend only on ``(seed, epoch)``.
        rank, world_size: DDP position.
        drop_last: round the number of batches down (True) or up (False).
        epoch: ``"images"`` (about one pass over the images) or ``"identities"`` (each
            identity once, K images; ``data.pk_epoch``).
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray,
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        epoch: str = "images",
    ) -> None:
        super().__init__(seed, rank, world_size, drop_last)
        if epoch not in PK_EPOCHS:
            raise ValueError(f"PKSampler: epoch must be one of {PK_EPOCHS}, got {epoch!r}")
        self.epoch_mode = epoch
        if num_instances < 1:
            raise ValueError(f"PKSampler: num_instances (K) must be >= 1, got {num_instances}")
        _check_batch_size(
            "PKSampler", batch_size, num_instances, "num_instances K", " (data.batch_size = P * K)"
        )
        p = batch_size // num_instances
        if p % world_size != 0:
            raise ValueError(
                f"PKSampler: P = batch_size / K = {p} identities per global batch cannot be split "
                f"into whole identities over world_size={world_size} ranks; make batch_size a "
                f"multiple of K * world_size = {num_instances * world_size}"
            )
        labels = np.asarray(pids)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(
                f"PKSampler: pids must be a non-empty 1-D sequence, got shape {labels.shape}"
            )
        self.batch_size, self.num_instances, self.num_pids_per_batch = batch_size, num_instances, p
        self.local_batch_size = batch_size // world_size

        uniq, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if len(uniq) < p:
            raise ValueError(
                f"PKSampler: a batch needs P = {p} distinct identities (batch_size {batch_size} / "
                f"K {num_instances}) but the training set has only {len(uniq)}; lower "
                f"data.batch_size or data.num_instances"
            )
        self.num_identities = len(uniq)
        self._codes = codes.astype(np.int64)
        self._counts = counts.astype(np.int64)
        # dataset indices grouped by identity code (stable: ascending index inside a group)
        self._grouped = np.argsort(self._codes, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._chunks_per_id = np.maximum(self._counts, num_instances) // num_instances
        self.num_chunks = int(self._chunks_per_id.sum())
        units = self.num_chunks if epoch == "images" else self.num_identities
        self.num_batches = _count_batches(units, p, drop_last)

    def _round(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One shuffled round of chunks: ``(chunks (C, K), identity code per chunk (C,))``."""
        k = self.num_instances
        n = len(self._codes)
        # shuffle inside each identity: sort by (code, random key)
        order = np.lexsort((rng.random(n), self._codes))
        members = order  # dataset indices, grouped by code, random order within
        member_codes = self._codes[order]
        # identities with fewer than K images: draw the missing ones with replacement
        deficit = np.maximum(k - self._counts, 0)
        if deficit.any():
            extra_codes = np.repeat(np.arange(len(self._counts)), deficit)
            picks = rng.integers(0, self._counts[extra_codes])
            extra = self._grouped[self._starts[extra_codes] + picks]
            members = np.concatenate([members, extra])
            member_codes = np.concatenate([member_codes, extra_codes])
            resort = np.argsort(member_codes, kind="stable")
            members, member_codes = members[resort], member_codes[resort]
        # keep the first chunks_per_id * K of each identity's (padded) list
        sizes = np.maximum(self._counts, k)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        within = np.arange(len(members)) - starts[member_codes]
        keep = within < self._chunks_per_id[member_codes] * k
        chunks = members[keep].reshape(-1, k)
        chunk_codes = np.repeat(np.arange(len(self._counts)), self._chunks_per_id)
        return chunks, chunk_codes

    def _identity_batches(self, epoch: int) -> np.ndarray:
        """Each identity once (K images), identities in a random order."""
        rng = _epoch_rng(self.seed, epoch, 2)
        chunks, _ = self._round(rng)  # shuffled within identity; first chunk per identity
        first = np.concatenate([[0], np.cumsum(self._chunks_per_id)[:-1]])
        order = rng.permutation(self.num_identities)
        total = self.num_batches * self.num_pids_per_batch
        if total > len(order):  # complete the last batch from the start of the order
            order = np.concatenate([order, order[: total - len(order)]])
        batches = chunks[first[order[:total]]]  # (total, K)
        return batches.reshape(self.num_batches, self.world_size, self.local_batch_size)

    def _global_batches(self, epoch: int) -> np.ndarray:
        if self.epoch_mode == "identities":
            return self._identity_batches(epoch)
        rng = _epoch_rng(self.seed, epoch, 0)
        p = self.num_pids_per_batch
        pool: list[np.ndarray] = []
        queues: list[deque[int]] = [deque() for _ in range(self.num_identities)]
        remaining = np.zeros(self.num_identities, dtype=np.int64)

        def add_round() -> None:
            chunks, codes = self._round(rng)
            base = sum(len(c) for c in pool)
            pool.append(chunks)
            # chunk ids of each identity, in the (already shuffled) order of the round
            for code, cid in zip(codes.tolist(), range(base, base + len(codes))):
                queues[code].append(cid)
            np.add.at(remaining, codes, 1)

        add_round()
        chosen_chunks = np.empty((self.num_batches, p), dtype=np.int64)
        for b in range(self.num_batches):
            available = np.flatnonzero(remaining)
            if len(available) < p:
                add_round()
                available = np.flatnonzero(remaining)
            ids = rng.choice(available, size=p, replace=False)
            chosen_chunks[b] = [queues[i].popleft() for i in ids.tolist()]
            remaining[ids] -= 1
        all_chunks = np.concatenate(pool)
        batches = all_chunks[chosen_chunks]  # (num_batches, P, K)
        return batches.reshape(self.num_batches, self.world_size, self.local_batch_size)


class ShuffleSampler(_EpochSampler):
    """Uniform shuffle of all N indices per epoch (``data.sampler: random``), DDP-sharded.

    ``num_batches = N // batch_size`` (``drop_last``) or ``ceil(N / batch_size)`` with the last
    global batch completed from the start of the permutation. ``batch_size`` is global and must
    be divisible by ``world_size``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        super().__init__(seed, rank, world_size, drop_last)
        if num_samples < 1:
            raise ValueError(f"ShuffleSampler: num_samples must be >= 1, got {num_samples}")
        _check_batch_size("ShuffleSampler", batch_size, world_size, "world_size")
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.num_batches = _count_batches(num_samples, batch_size, drop_last)

    def _global_batches(self, epoch: int) -> np.ndarray:
        perm = _epoch_rng(self.seed, epoch, 1).permutation(self.num_samples)
        total = self.num_batches * self.batch_size
        if total > len(perm):
            perm = np.resize(perm, total)  # wraps around to complete the last batch
        return perm[:total].reshape(self.num_batches, self.world_size, self.local_batch_size)
