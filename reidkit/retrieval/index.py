"""A gallery index on FAISS with its metadata (path, pid, camid) kept beside it.

Similarity is the inner product of L2-normalised features (= cosine similarity; set
``normalize=False`` to index raw inner products). Kinds:

- ``"flat"``: exact search (``IndexFlatIP``); equals brute force.
- ``"ivf"``: inverted lists over ``nlist`` k-means cells, ``nprobe`` cells visited per
  query (``IndexIVFFlat``); approximate, exact distances within the visited cells.
- ``"ivfpq"``: IVF with product quantisation (``m`` sub-vectors of ``nbits`` bits), for
  galleries that do not fit in memory as float32; approximate scores. ``refine=True``
  re-scores the ``refine_factor * k`` best candidates exactly (keeps the raw vectors).

Saved as a folder: ``index.faiss`` (FAISS's own binary format) and ``meta.json`` (kind,
parameters, paths, pids, camids). Loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["GalleryIndex", "SearchResult", "IndexKind"]

IndexKind = Literal["flat", "ivf", "ivfpq"]
KINDS = ("flat", "ivf", "ivfpq")
_FORMAT_VERSION = 1


def _faiss() -> Any:
    from reidkit.errors import require_extra

    require_extra("faiss", "reidkit.retrieval (the FAISS gallery index)")
    import faiss

    return faiss


def _as_float32(x: np.ndarray | torch.Tensor, name: str, dim: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name}: expected feature dimension {dim}, got {a.shape[1]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def check_vector_method(method: Any) -> None:
    """Refuse a method whose query-gallery score is not a distance between its vectors."""
    if method is not None and not getattr(method, "exportable", True):
        name = method.__name__ if isinstance(method, type) else type(method).__name__
        raise ValueError(
            f"{name} scores query-gallery pairs itself (not a distance between vectors); a "
            "FAISS index of its features would not rank as the method does"
        )


def _normalize(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(n, 1e-12)


@dataclass
class SearchResult:
    """Top-k results of a batch of queries.

    Attributes:
        scores: ``(Q, k)`` similarities, best first (inner products; cosine when the index
            normalises).
        indices: ``(Q, k)`` gallery positions (``-1`` where fewer than k were found).
        pids: ``(Q, k)`` gallery pids (``-1`` for missing entries or unknown).
        camids: ``(Q, k)`` gallery camera ids (``-1`` likewise).
        paths: ``Q`` lists of ``k`` gallery paths (``""`` for missing entries).
    """

    scores: np.ndarray
    indices: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: list[list[str]]


class GalleryIndex:
    """FAISS gallery index with metadata.

    Args:
        dim: feature dimension.
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"ivfpq"``.
        nlist: IVF cells (default: ``4 * sqrt(N)`` at training time, at most ``N / 39``).
        nprobe: cells visited per query (IVF kinds).
        m: PQ sub-vectors (must divide ``dim``; default: the largest of 64, 32, 16, 8, 4,
            2, 1 that divides ``dim`` and leaves at least 4 dimensions each).
        nbits: bits per PQ code.
        normalize: L2-normalise gallery and query features (cosine similarity).
        refine: for ``"ivfpq"``, re-score candidates exactly (stores raw vectors too).
        refine_factor: candidates re-scored per result when ``refine``.
    """

    def __init__(
        self,
        dim: int,
        kind: IndexKind = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        m: int | None = None,
        nbits: int = 8,
        normalize: bool = True,
        refine: bool = False,
        refine_factor: int = 4,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        _faiss()  # a missing FAISS is reported now, not after the features are computed
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if m is not None and dim % m != 0:
            raise ValueError(f"PQ m={m} must divide the feature dimension {dim}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.dim = int(dim)
        self.kind = kind
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.m = m
        self.nbits = int(nbits)
        self.normalize = bool(normalize)
        self.refine = bool(refine)
        self.refine_factor = int(refine_factor)
        self.paths: list[str] = []
        self.pids: list[int] = []
        self.camids: list[int] = []
        self._index: Any = None
        if kind == "flat":
            self._index = _faiss().IndexFlatIP(self.dim)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        feats: np.ndarray | torch.Tensor,
        paths: Sequence[str] | None = None,
        pids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        camids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        method: Any = None,
        **kwargs: Any,
    ) -> GalleryIndex:
        """Create, train (IVF kinds) and fill an index from ``(N, D)`` features.

        ``method``: the re-ID method (or its class) that produced the features; one whose
        score is not a vector distance (``exportable = False``, e.g. pairwise re-scoring)
        is refused, since a vector index would rank differently from its evaluation.
        """
        check_vector_method(method)
        a = _as_float32(feats, "feats")
        index = cls(a.shape[1], **kwargs)
        if not index.is_trained:
            index.train(a)
        index.add(a, paths, pids, camids)
        return index

    @property
    def is_trained(self) -> bool:
        """Whether the index can take vectors (flat: always)."""
        return self._index is not None and bool(self._index.is_trained)

    def _default_m(self) -> int:
        for m in (64, 32, 16, 8, 4, 2, 1):
            if self.dim % m == 0 and self.dim // m >= 4:
                return m
        return 1

    def train(self, feats: np.ndarray | torch.Tensor) -> None:
        """Train the IVF (and PQ) quantisers on ``(N, D)`` sample features."""
        faiss = _faiss()
        a = _as_float32(feats, "feats", self.dim)
        if self.normalize:
            a = _normalize(a)
        if self.kind == "flat":
            return
        n = a.shape[0]
        nlist = self.nlist or int(max(1, min(4 * math.sqrt(n), n // 39)))
        if nlist > n:
            raise ValueError(f"nlist={nlist} needs at least as many training vectors, got {n}")
        self.nlist = nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            self.m = self.m or self._default_m()
            if n < 2**self.nbits:
                raise ValueError(
                    f"ivfpq with nbits={self.nbits} needs at least {2**self.nbits} training "
                    f"vectors, got {n}; lower nbits or use kind='ivf'"
                )
            index = faiss.IndexIVFPQ(
                quantizer, self.dim, nlist, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT
            )
        index.train(a)
        if self.kind == "ivfpq" and self.refine:
            index = faiss.IndexRefineFlat(index)
            index.k_factor = float(self.refine_factor)
        self._index = index
        self._set_nprobe()

    def _set_nprobe(self) -> None:
        faiss = _faiss()
        if self._index is None or self.kind == "flat":
            return
        base = (
            self._index.base_index
            if isinstance(self._index, faiss.IndexRefineFlat)
            else self._index
        )
        faiss.extract_index_ivf(base).nprobe = self.nprobe

    def set_nprobe(self, nprobe: int) -> None:
        """Change the number of IVF cells visited per query (speed / recall trade-off)."""
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.nprobe = int(nprobe)
        self._set_nprobe()

    def add(
        self,
        feats: np.ndarray | torch.Tensor,
        paths: Sequence[str] | None = None,
        pids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        camids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Append ``(N, D)`` gallery features with their metadata (missing: ``""`` / -1)."""
        if not self.is_trained:
            raise RuntimeError(
                f"the {self.kind} index must be trained before add(); call train(feats)"
            )
        a = _as_float32(feats, "feats", self.dim)
        n = a.shape[0]

        def col(values: Any, name: str, default: Any) -> list:
            if values is None:
                return [default] * n
            v = values.tolist() if isinstance(values, np.ndarray | torch.Tensor) else list(values)
            if len(v) != n:
                raise ValueError(f"{name}: expected {n} entries (one per feature), got {len(v)}")
            return v

        new_paths = [str(p) for p in col(paths, "paths", "")]
        new_pids = [int(p) for p in col(pids, "pids", -1)]
        new_camids = [int(c) for c in col(camids, "camids", -1)]
        self._index.add(_normalize(a) if self.normalize else a)
        self.paths += new_paths
        self.pids += new_pids
        self.camids += new_camids

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    # ----------------------------------------------------------------------- search
    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> SearchResult:
        """Top-``k`` gallery entries per query, best (highest similarity) first.

        Args:
            queries: ``(Q, D)`` features.
            k: results per query (at most the gallery size is filled).
        """
        if len(self) == 0:
            raise RuntimeError("the index is empty; add() gallery features first")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_float32(queries, "queries", self.dim)
        if self.normalize:
            q = _normalize(q)
        scores, idx = self._index.search(q, int(k))
        pids = np.asarray(self.pids + [-1], dtype=np.int64)[idx]  # idx -1 -> the sentinel
        camids = np.asarray(self.camids + [-1], dtype=np.int64)[idx]
        paths = [[self.paths[j] if j >= 0 else "" for j in row] for row in idx.tolist()]
        return SearchResult(
            scores=scores, indices=idx.astype(np.int64), pids=pids, camids=camids, paths=paths
        )

    # ------------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``meta.json`` into ``directory`` (created)."""
        if self._index is None:
            raise RuntimeError("cannot save an untrained index")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self._index, str(d / "index.faiss"))
        meta = {
            "format": "reidkit.gallery_index",
            "version": _FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "m": self.m,
            "nbits": self.nbits,
            "normalize": self.normalize,
            "refine": self.refine,
            "refine_factor": self.refine_factor,
            "ntotal": len(self),
            "paths": self.paths,
            "pids": self.pids,
            "camids": self.camids,
        }
        (d / "meta.json").write_text(json.dumps(meta))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> GalleryIndex:
        """Read an index written by :meth:`save`."""
        d = Path(directory)
        meta_path, index_path = d / "meta.json", d / "index.faiss"
        for p in (meta_path, index_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: missing (expected a folder written by GalleryIndex.save)"
                )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "reidkit.gallery_index":
            raise ValueError(
                f"{meta_path}: not a reidkit gallery index (format={meta.get('format')!r})"
            )
        if meta.get("version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format version {meta['version']} is newer than this reidkit"
            )
        index = cls(
            meta["dim"],
            meta["kind"],
            meta["nlist"],
            meta["nprobe"],
            meta["m"],
            meta["nbits"],
            meta["normalize"],
            meta.get("refine", False),
            meta.get("refine_factor", 4),
        )
        index._index = _faiss().read_index(str(index_path))
        if index._index.d != index.dim:
            raise ValueError(
                f"{index_path}: dimension {index._index.d} != meta.json dim {index.dim}"
            )
        index.paths, index.pids, index.camids = meta["paths"], meta["pids"], meta["camids"]
        if not len(index.paths) == len(index.pids) == len(index.camids) == len(index):
            raise ValueError(
                f"{meta_path}: metadata has {len(index.paths)} entries but the index holds {len(index)} vectors"
            )
        index._set_nprobe()
        return index
