"""Episodic sampling: N-way K-shot tasks with Q queries per class, seeded and deterministic.

An episode draws ``way`` distinct classes among those with at least ``shot + queries``
images, then ``shot + queries`` distinct images of each class (the first ``shot`` are the
support set, the rest the queries). Episode ``i`` of epoch ``e`` depends only on
``(seed, e, i)`` (a NumPy ``SeedSequence``), never on loader workers, batch size or what
was drawn before, so a resumed run sees the same episodes and test episodes are the same
for every model.

Within an episode, classes get episode labels ``0..way-1`` in draw order; support and query
images are stored class by class (``support[k * shot + s]`` has label ``k``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from reidkit.data.loader import sample_seed
from reidkit.fewshot.datasets import FewShotSplit

__all__ = ["Episode", "EpisodeSampler", "EpisodeDataset", "ImageIndexDataset"]


@dataclass(frozen=True)
class Episode:
    """One task. ``classes``: ``(way,)`` class ids of the split; ``support``: ``(way, shot)``
    and ``query``: ``(way, queries)`` image indices into the split."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray

    @property
    def way(self) -> int:
        return len(self.classes)

    def support_labels(self) -> np.ndarray:
        """``(way * shot,)`` episode labels of the flattened support indices."""
        return np.repeat(np.arange(self.way), self.support.shape[1])

    def query_labels(self) -> np.ndarray:
        """``(way * queries,)`` episode labels of the flattened query indices."""
        return np.repeat(np.arange(self.way), self.query.shape[1])


class EpisodeSampler:
    """Draws :class:`Episode`\\ s from per-image class ``labels``.

    Args:
        labels: ``(N,)`` integer class of every image of the split.
        way, shot, queries: N, K and Q (queries per class).
        seed: the episodes of a seed are fixed (see the module docstring).
        split: name used in error messages.

    Raises:
        ValueError: fewer than ``way`` classes have ``shot + queries`` images.
    """

    def __init__(
        self,
        labels: np.ndarray,
        way: int,
        shot: int,
        queries: int,
        seed: int = 0,
        split: str = "split",
    ) -> None:
        if way < 1 or shot < 1 or queries < 0:
            raise ValueError(
                f"need way >= 1, shot >= 1, queries >= 0; got {way}, {shot}, {queries}"
            )
        if seed < 0:
            raise ValueError(f"episode seed must be >= 0, got {seed}")
        labels = np.asarray(labels, dtype=np.int64)
        self.way, self.shot, self.queries, self.seed = int(way), int(shot), int(queries), int(seed)
        need = self.shot + self.queries
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self.by_class = {
            int(c): order[s : s + n] for c, s, n in zip(classes, starts, counts) if n >= need
        }
        self.eligible = np.array(sorted(self.by_class), dtype=np.int64)
        self.skipped_classes = int(len(classes) - len(self.eligible))
        if len(self.eligible) < self.way:
            raise ValueError(
                f"{split}: {self.way}-way {self.shot}-shot episodes with {self.queries} queries "
                f"per class need {self.way} classes with >= {need} images each; only "
                f"{len(self.eligible)} of {len(classes)} classes have that many (largest "
                f"class: {int(counts.max()) if len(counts) else 0} images). Lower the queries "
                "per class (episode.train_queries / episode.test_queries) or the shots."
            )

    def episode(self, index: int, epoch: int = 0) -> Episode:
        """Episode ``index`` of ``epoch`` (deterministic)."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        classes = rng.choice(self.eligible, size=self.way, replace=False)
        picks = np.stack(
            [
                rng.choice(self.by_class[int(c)], size=self.shot + self.queries, replace=False)
                for c in classes
            ]
        )
        return Episode(classes=classes, support=picks[:, : self.shot], query=picks[:, self.shot :])


class EpisodeDataset(Dataset):
    """Item ``i``: the images of episode ``i`` of the current epoch, transformed.

    Returns a dict with ``support`` ``(way * shot, 3, H, W)``, ``support_labels``
    ``(way * shot,)``, ``query`` ``(way * queries, 3, H, W)``, ``query_labels``, the split's
    class ids ``query_classes`` / ``support_classes`` and ``episode`` (the index).
    Augmentation draws from a generator seeded by ``(seed, epoch, image position)``.
    Call :meth:`set_epoch` before iterating a new epoch.
    """

    def __init__(
        self,
        split: FewShotSplit,
        sampler: EpisodeSampler,
        transform: Callable[..., Tensor],
        num_episodes: int,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        self.split = split
        self.sampler = sampler
        self.transform = transform
        self.num_episodes = int(num_episodes)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_episodes

    def _images(self, indices: np.ndarray, index: int, offset: int) -> Tensor:
        out = []
        for j, i in enumerate(indices.reshape(-1).tolist()):
            gen = None
            if self.augment:
                pos = (index << 16) | (offset + j)
                gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, pos))
            out.append(self.transform(self.split.load(i), generator=gen))
        return torch.stack(out)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ep = self.sampler.episode(index, self.epoch)
        n_support = ep.support.size
        return {
            "support": self._images(ep.support, index, 0),
            "support_labels": torch.from_numpy(ep.support_labels()),
            "query": self._images(ep.query, index, n_support),
            "query_labels": torch.from_numpy(ep.query_labels()),
            "support_classes": torch.from_numpy(np.repeat(ep.classes, ep.support.shape[1])),
            "query_classes": torch.from_numpy(np.repeat(ep.classes, ep.query.shape[1])),
            "episode": index,
        }


class ImageIndexDataset(Dataset):
    """Images ``indices`` of a split through a deterministic ``transform`` (feature caching)."""

    def __init__(
        self, split: FewShotSplit, indices: np.ndarray, transform: Callable[..., Tensor]
    ) -> None:
        self.split = split
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(self.split.load(int(self.indices[i])))
