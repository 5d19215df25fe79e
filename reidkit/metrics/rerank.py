"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) and average query expansion.

:func:`re_ranking` has the semantics of the original public Python version
(``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)``):

- the inputs are *plain* distances (e.g. true Euclidean); they are squared inside;
- the full ``(Q+G) x (Q+G)`` squared matrix ``D`` is normalised column-wise by its
  maximum and transposed, ``Dn[i, j] = D[j, i] / max_k D[k, i]``;
- ``R(i)`` = k-reciprocal neighbours of ``i`` among its ``k1 + 1`` nearest (itself
  included); for each ``c`` in ``R(i)`` the ``round(k1 / 2)``-reciprocal set ``R'(c)``
  is added when ``|R'(c) & R(i)| > 2/3 |R'(c)|``;
- ``V[i, j] = exp(-Dn[i, j]) / sum`` over that expanded set; local query expansion
  ``V[i] <- mean of V over the k2 nearest of i`` (skipped when ``k2 == 1``);
- Jaccard distance ``1 - s / (2 - s)`` with ``s = sum_k min(V[i, k], V[j, k])``;
- result ``(1 - lambda) * jaccard + lambda * Dn`` for the query-gallery block.

Here everything is vectorised in torch and ``V`` is kept sparse (each row has a few
dozen non-zeros), so the cost is dominated by one top-k pass over ``Dn``, whose row
blocks are built in cache-sized tiles (the transposition included) and never held whole.
Nearest-neighbour lists use a stable order (ties broken by index); the original used an
unstable sort, so both agree on inputs without ties.

:func:`re_ranking_features` does the same from features without ever forming the
``(Q+G)^2`` matrix: one chunked pass keeps the top-k neighbour lists and row maxima,
and the few distances the sparse structure needs are recomputed from the features. Its
memory is ``O((Q+G) * k1^2)`` plus the ``Q x G`` output, so an MSMT17-size run fits a
24 GB machine.

:func:`average_query_expansion` is alpha-weighted average query expansion (alpha-QE,
Radenovic et al.; alpha=0 is plain average QE of Chum et al.).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..threads import bounded_threads, parallel_map
from .distance import GalleryDistance, Metric, as_tensor, l2_normalize

__all__ = [
    "re_ranking",
    "re_ranking_features",
    "iter_re_ranking_features",
    "average_query_expansion",
    "stable_topk_smallest",
]

_PAIR_BUDGET = 1 << 20  # pairs processed at once in the sparse steps
_BITMAP_MAX = 1 << 28  # largest (Q+G)^2 for a membership bitmap (256 MB)
_BLOCK_ELEMENTS = 1 << 20  # rows of the (Q+G)^2 matrix handled at once (4 MB float32)
_TILE = 128  # side of the tiles of transposed copies


# ----------------------------------------------------------------------------- helpers
def stable_topk_smallest(d: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of each row, ordered by (value, index).

    Equivalent to ``torch.sort(d, dim=1, stable=True).indices[:, :k]`` but only uses a
    full sort for rows with a tie at the k-th value.

    Args:
        d: ``(n, m)`` tensor, ``k <= m``.
        k: number of neighbours.

    Returns:
        ``(n, k)`` long tensor.
    """
    n, m = d.shape
    k = min(k, m)
    # one extra neighbour tells whether the k-th value is tied outside the selection
    vals, idx = torch.topk(d, min(k + 1, m), dim=1, largest=False, sorted=True)
    tied = (
        vals[:, k] == vals[:, k - 1] if k < m else torch.zeros(n, dtype=torch.bool, device=d.device)
    )
    vals, idx = vals[:, :k], idx[:, :k]
    # order the selected entries by (value, index): sort by index, then stably by value
    o = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, o), vals.gather(1, o)
    idx = idx.gather(1, torch.sort(vals, dim=1, stable=True).indices)
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)[0]
        for s in range(0, rows.shape[0], 1024):
            r = rows[s : s + 1024]
            idx[r] = torch.sort(d[r], dim=1, stable=True).indices[:, :k]
    return idx


def _unique(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the inverse map (faster than ``torch.unique`` on CPU).

    Keys below 2**31 are sorted as int32 (about twice as fast as int64).
    """
    small = keys.numel() == 0 or int(keys.max()) < 2**31
    sk, order = torch.sort(keys.int() if small else keys)
    new = torch.ones_like(sk, dtype=torch.bool)
    new[1:] = sk[1:] != sk[:-1]
    uniq = sk[new].long()
    inv = torch.empty_like(order)
    inv[order] = new.long().cumsum(0) - 1
    return uniq, inv


def _reciprocal(nbr: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``recip[i, t]`` = ``i`` is among the neighbours of ``nbr[i, t]`` (``(N, k)`` bool)."""
    n, k = nbr.shape
    out = torch.empty((n, k), dtype=torch.bool, device=nbr.device)
    for s in range(0, n, chunk):
        f = nbr[s : s + chunk]
        me = torch.arange(s, s + f.shape[0], device=nbr.device)
        out[s : s + chunk] = (nbr[f] == me[:, None, None]).any(-1)
    return out


def _expansion_sets(rank: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded k-reciprocal sets as sorted, unique (row, col) pairs.

    Args:
        rank: ``(N, K)`` nearest-neighbour indices (stable order), ``K >= k1 + 1``.
        k1: the k of k-reciprocal.
    """
    n = rank.shape[0]
    dev = rank.device
    f = rank[:, : k1 + 1]
    kh = int(np.around(k1 / 2.0))
    fh = rank[:, : kh + 1]
    recip = _reciprocal(f)
    recip_h = _reciprocal(fh)
    size_h = recip_h.sum(1).double()  # |R'(c)|
    rows_all = torch.arange(n, device=dev)
    # R(i) as sorted keys i * n + j, for membership tests by binary search
    rkey = (rows_all[:, None] * n + f)[recip]
    # membership "j in R(i)" for keys i * n + j: a bitmap when (Q+G)^2 bytes are cheap,
    # else a binary search in the sorted keys
    bitmap = None
    if n * n <= _BITMAP_MAX:
        bitmap = torch.zeros(n * n, dtype=torch.bool, device=dev)
        bitmap[rkey] = True
    else:
        rkey = torch.sort(rkey).values
    keys = []
    chunk = max(1, _PAIR_BUDGET // ((k1 + 1) * (kh + 1) * 4))
    for s in range(0, n, chunk):
        fi, ri = f[s : s + chunk], recip[s : s + chunk]  # candidates c = F[i, t] where ri
        rows = rows_all[s : s + fi.shape[0]]
        flat = fi.reshape(-1)
        c_nbr = fh.index_select(0, flat).view(*fi.shape, kh + 1)  # neighbours of each c
        c_ok = recip_h.index_select(0, flat).view(*fi.shape, kh + 1)  # ... in R'(c)
        q = c_nbr.add_((rows * n)[:, None, None])
        if bitmap is not None:
            member = bitmap.index_select(0, q.view(-1)).view(q.shape)
        else:
            pos = torch.searchsorted(rkey, q).clamp_max(rkey.shape[0] - 1)
            member = rkey.index_select(0, pos.view(-1)).view(q.shape) == q
        inter = (member & c_ok).sum(-1)  # |R'(c) & R(i)|
        accepted = ri & (inter.double() > (2.0 / 3.0) * size_h.index_select(0, flat).view(fi.shape))
        k_rec = (rows[:, None] * n + fi)[ri]
        k_add = q[accepted[..., None] & c_ok]
        # chunk-relative keys (small enough for a fast int32 sort), then back
        keys.append(_unique(torch.cat([k_rec, k_add]) - s * n)[0] + s * n)
    key = torch.cat(keys)
    return key // n, key % n


def _row_normalised_weights(rows: torch.Tensor, dn: torch.Tensor, n: int) -> torch.Tensor:
    """``exp(-dn) / row sum`` for sparse entries (float32, like the original)."""
    w = torch.exp(-dn.float())
    s = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, rows, w)
    return w / s[rows]


def _segment_expand(
    counts: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments with ``counts`` starting at ``starts``: (segment id, position) pairs."""
    total = int(counts.sum())
    seg = torch.repeat_interleave(
        torch.arange(counts.shape[0], device=counts.device), counts, output_size=total
    )
    # pos = starts[seg] + (arange - first[seg]); index_select is much faster than x[idx]
    offset = starts - (counts.cumsum(0) - counts)
    pos = torch.arange(total, device=counts.device).add_(offset.index_select(0, seg))
    return seg, pos


def _query_expand(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, rank: torch.Tensor, k2: int, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse ``V_qe[i] = mean_{t < k2} V[rank[i, t]]``; inputs sorted by (row, col)."""
    counts = torch.bincount(rows, minlength=n)
    starts = counts.cumsum(0) - counts
    out_keys, out_vals = [], []
    nbr = rank[:, :k2]
    per_row = max(1, int(counts.max()) * k2)
    chunk = max(1, _PAIR_BUDGET // per_row)
    for s in range(0, n, chunk):
        src = nbr[s : s + chunk].reshape(-1)  # rows of V to average
        dst = torch.arange(
            s, s + nbr[s : s + chunk].shape[0], device=rows.device
        ).repeat_interleave(k2)
        seg, pos = _segment_expand(counts[src], starts[src])
        key = (dst[seg] - s) * n + cols[pos]  # chunk-relative: a fast int32 sort
        uk, inv = _unique(key)
        uk += s * n
        acc = torch.zeros(uk.shape[0], dtype=vals.dtype, device=vals.device).index_add_(
            0, inv, vals[pos]
        )
        out_keys.append(uk)
        out_vals.append(acc / k2)
    key = torch.cat(out_keys)
    return key // n, key % n, torch.cat(out_vals)


def _budget_edges(cum: torch.Tensor, budget: int) -> list[int]:
    """Cut points ``[0, ..., m]`` splitting items with inclusive work prefix sums ``cum``
    into pieces of about ``budget`` work each."""
    m = cum.shape[0]
    total = int(cum[-1]) if m else 0
    if total <= budget:
        return [0, m]
    targets = torch.arange(1, total // budget + 1, device=cum.device, dtype=cum.dtype) * budget
    cuts = (torch.searchsorted(cum, targets) + 1).clamp_max(m).tolist()
    return sorted({0, m, *cuts})


class _Jaccard:
    """The ``(Q, G)`` Jaccard distance of the sparse ``V``, block by block of queries.

    ``s[i, j] = sum_k min(V[i, k], V[j, k])`` over ``V`` given as ``(rows, cols, vals)``
    sorted by (row, col); only pairs sharing a column are visited. Blocks are independent
    (:meth:`block` may run on several threads at once).
    """

    def __init__(
        self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, num_query: int, n: int
    ) -> None:
        self.num_query, self.num_gallery = num_query, n - num_query
        g = rows >= num_query
        gr, gcol, gv = rows[g], cols[g], vals[g]
        o = torch.sort(gcol.int(), stable=True).indices
        # gallery entries grouped by column: rows (int32: cheaper to gather) and values
        self.gr, self.gv = (gr[o] - num_query).int(), gv[o]
        self.ccount = torch.bincount(gcol, minlength=n)
        self.cstart = self.ccount.cumsum(0) - self.ccount
        rcount = torch.bincount(rows, minlength=n)
        self.rend = rcount.cumsum(0)
        self.rows, self.cols, self.vals = rows, cols, vals

    def block(self, s: int, e: int) -> torch.Tensor:
        """``(e - s, G)`` float32 Jaccard distances of queries ``s:e``."""
        ng = self.num_gallery
        temp = torch.zeros((e - s) * ng, dtype=self.vals.dtype, device=self.vals.device)
        lo = int(self.rend[s - 1]) if s > 0 else 0
        hi = int(self.rend[e - 1])
        qr, qc, qv = self.rows[lo:hi], self.cols[lo:hi], self.vals[lo:hi]
        small = (e - s) * ng < 2**31  # int32 target positions
        # split the query entries so each piece visits about _PAIR_BUDGET pairs
        edges = _budget_edges(self.ccount[qc].cumsum(0), _PAIR_BUDGET)
        for a, b in zip(edges[:-1], edges[1:]):
            cols_ab = qc[a:b]
            seg, pos = _segment_expand(
                self.ccount.index_select(0, cols_ab), self.cstart.index_select(0, cols_ab)
            )
            mins = torch.minimum(qv[a:b].index_select(0, seg), self.gv.index_select(0, pos))
            base = (qr[a:b] - s).mul_(ng)
            if small:
                base = base.int()
            target = base.index_select(0, seg).add_(self.gr.index_select(0, pos))
            temp.index_add_(0, target, mins)
        temp = temp.view(e - s, ng)
        return temp.neg_().add_(2.0).reciprocal_().mul_(-2.0).add_(2.0)  # 1 - t/(2-t)

    def blocks(self, query_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, block)`` for consecutive chunks of ``query_chunk`` queries."""
        for s in range(0, self.num_query, query_chunk):
            yield s, self.block(s, min(s + query_chunk, self.num_query))


class _TransposedDistances:
    """``D^T`` for ``D = [[q_q, q_g], [q_g^T, g_g]]``, read in float32 pieces.

    Transposed reads are done in square tiles small enough for the cache: a whole-matrix
    transposed copy strides through memory and is several times slower than a plain one.
    """

    def __init__(self, qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor) -> None:
        self.qq, self.qg, self.gg = qq, qg, gg
        self.nq = qq.shape[0]
        self.n = self.nq + gg.shape[0]

    @staticmethod
    def _copy_transposed(out: torch.Tensor, src: torch.Tensor) -> None:
        """``out[:] = src.T`` tile by tile (``out``: ``(r, c)``, ``src``: ``(c, r)``)."""
        for c in range(0, src.shape[0], _TILE):
            out[:, c : c + _TILE].copy_(src[c : c + _TILE].T)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """``D^T[start:stop]`` as a new contiguous ``(stop - start, Q + G)`` float32 tensor."""
        nq = self.nq
        out = torch.empty((stop - start, self.n), dtype=torch.float32, device=self.qg.device)
        if start < nq:  # query rows i: D^T[i] = [q_q[:, i], q_g[i]]
            e = min(stop, nq)
            part = out[: e - start]
            for c in range(0, e - start, _TILE):
                self._copy_transposed(
                    part[c : c + _TILE, :nq], self.qq[:, start + c : min(e, start + c + _TILE)]
                )
            part[:, nq:] = self.qg[start:e]
        if stop > nq:  # gallery rows j: D^T[nq + j] = [q_g[:, j], g_g[:, j]]
            s = max(start, nq)
            part = out[s - start :]
            for c in range(0, stop - s, _TILE):
                cols = slice(s - nq + c, min(stop, s + c + _TILE) - nq)
                sub = part[c : c + _TILE]
                self._copy_transposed(sub[:, :nq], self.qg[:, cols])
                self._copy_transposed(sub[:, nq:], self.gg[:, cols])
        return out

    def values(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``D^T[rows, cols]`` (float32) for index pairs."""
        nq = self.nq
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        rq, cq = rows < nq, cols < nq
        for sel, mat, r_of, c_of in (
            (rq & cq, self.qq, lambda r, c: c, lambda r, c: r),  # q_q[c, r]
            (~rq & cq, self.qg, lambda r, c: c, lambda r, c: r - nq),  # q_g[c, r - nq]
            (rq & ~cq, self.qg, lambda r, c: r, lambda r, c: c - nq),  # q_g[r, c - nq]
            (~rq & ~cq, self.gg, lambda r, c: c - nq, lambda r, c: r - nq),  # g_g^T
        ):
            at = sel.nonzero().view(-1)
            r, c = rows[at], cols[at]
            out[at] = mat[r_of(r, c), c_of(r, c)].float()
        return out


def _check_rowmax(rowmax: torch.Tensor, nan_message: str) -> None:
    if not bool(torch.isfinite(rowmax).all()):
        raise ValueError(nan_message)
    if bool((rowmax <= 0).any()):
        raise ValueError(
            "re_ranking: a column of the distance matrix is all zeros (duplicate features?)"
        )


# --------------------------------------------------------------------------- dense API
@bounded_threads
def re_ranking(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray | torch.Tensor:
    """k-reciprocal re-ranking from distance matrices (original public version's semantics).

    Args:
        q_g_dist: ``(Q, G)`` plain (not squared) query-gallery distances.
        q_q_dist: ``(Q, Q)`` query-query distances.
        g_g_dist: ``(G, G)`` gallery-gallery distances.
        k1: k-reciprocal neighbourhood size.
        k2: local query expansion size (1 disables it).
        lambda_value: weight of the original distance (0: Jaccard only).

    Returns:
        ``(Q, G)`` float32 re-ranked distances; a numpy array if ``q_g_dist`` is one,
        else a torch tensor on its device.

    Memory: the three inputs plus the ``Q x G`` output and ``O((Q+G) * k1^2)``; the
    ``(Q+G)^2`` normalised matrix is never held (row blocks of it are built, reduced to
    top-k lists and dropped). The original holds several ``(Q+G)^2`` float32 copies.
    """
    is_np = not isinstance(q_g_dist, torch.Tensor)
    qg = as_tensor(q_g_dist, "q_g_dist")
    dev = qg.device
    qq = as_tensor(q_q_dist, "q_q_dist").to(dev)
    gg = as_tensor(g_g_dist, "g_g_dist").to(dev)
    nq, ng = qg.shape if qg.ndim == 2 else (-1, -1)
    if qg.ndim != 2 or qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(
            "re_ranking: expected q_g_dist (Q, G), q_q_dist (Q, Q), g_g_dist (G, G); got "
            f"{tuple(qg.shape)}, {tuple(qq.shape)}, {tuple(gg.shape)}"
        )
    _check_params(k1, k2, lambda_value, nq + ng)
    n = nq + ng
    # Dn = transpose(D / colmax(D)) = D^T / rowmax(D^T), D squared. Dn is never held:
    # row blocks of D^T are built in cache-sized tiles (no slow whole-matrix transposed
    # copy), reduced to their row maxima and stable top-k lists, and the few entries
    # needed later are read back from the inputs (with exactly the same float ops).
    dt = _TransposedDistances(qq, qg, gg)
    kk = max(k1 + 1, k2)
    rank = torch.empty((n, kk), dtype=torch.long, device=dev)
    rowmax = torch.empty(n, dtype=torch.float32, device=dev)
    step = max(1, _BLOCK_ELEMENTS // n)

    def neighbours(s: int) -> None:  # blocks are independent: one per thread at a time
        e = min(n, s + step)
        block = dt.rows(s, e).square_()
        rowmax[s:e] = block.amax(1)  # NaN and inf propagate here: a free finiteness check
        _check_rowmax(rowmax[s:e], "re_ranking: the distance matrices contain NaN or inf")
        rank[s:e] = stable_topk_smallest(block.div_(rowmax[s:e, None]), kk)

    parallel_map(neighbours, range(0, n, step), dev)
    rows, cols = _expansion_sets(rank, k1)
    vals = _row_normalised_weights(rows, dt.values(rows, cols).square_() / rowmax[rows], n)
    if k2 != 1:
        rows, cols, vals = _query_expand(rows, cols, vals, rank, k2, n)
    out = torch.empty((nq, ng), dtype=torch.float32, device=dev)
    chunk = max(1, _BLOCK_ELEMENTS // max(ng, 1))
    jaccard = _Jaccard(rows, cols, vals, nq, n)

    def final(s: int) -> None:
        e = min(nq, s + chunk)
        base = qg[s:e].float().square().div_(rowmax[s:e, None])  # Dn[s:e, nq:]; input untouched
        out[s:e] = jaccard.block(s, e).mul_(1 - lambda_value).add_(base, alpha=lambda_value)

    parallel_map(final, range(0, nq, chunk), dev)
    return out.cpu().numpy() if is_np else out


def _check_params(k1: int, k2: int, lambda_value: float, n: int) -> None:
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re_ranking: lambda_value must be in [0, 1], got {lambda_value}")
    if max(k1 + 1, k2) > n:
        raise ValueError(
            f"re_ranking: k1 + 1 = {k1 + 1} and k2 = {k2} must not exceed the number of "
            f"images (query + gallery = {n})"
        )


# ------------------------------------------------------------------------ features API
def _pair_sqdist(
    x: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric: str
) -> torch.Tensor:
    """Squared distances of the given pairs from features (float32)."""
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    step = max(1, (1 << 24) // x.shape[1])
    for s in range(0, rows.shape[0], step):
        r, c = rows[s : s + step], cols[s : s + step]
        dot = (x[r] * x[c]).sum(1)
        if metric == "cosine":
            dd = 1.0 - dot
        else:
            dd = (sq[r] + sq[c] - 2.0 * dot).clamp_min(0.0)
            if metric == "euclidean":
                dd = dd.sqrt()
        out[s : s + step] = dd.float()
    return out.square()


@bounded_threads
def iter_re_ranking_features(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Re-ranked distances from features, yielded as ``(start, (n, G) block)`` of queries.

    Feed the blocks to :class:`~reidkit.metrics.RankAccumulator` to evaluate an
    MSMT17-size re-ranking without holding the ``Q x G`` result. Arguments as in
    :func:`re_ranking_features`.
    """
    q = as_tensor(qf, "qf")
    dev = torch.device(device) if device is not None else q.device
    q = q.to(dev)
    g = as_tensor(gf, "gf").to(dev)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"re_ranking_features: qf (Q, D) and gf (G, D) must share D; got {tuple(q.shape)}, {tuple(g.shape)}"
        )
    if metric not in ("euclidean", "sqeuclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean', 'sqeuclidean' or 'cosine', got {metric!r}")
    x = torch.cat([q, g]).float()
    if metric == "cosine":
        x = l2_normalize(x)
    nq, n = q.shape[0], x.shape[0]
    ng = n - nq
    _check_params(k1, k2, lambda_value, n)
    kk = max(k1 + 1, k2)
    step = chunk_size or max(1, (1 << 24) // n)
    to_all = GalleryDistance(x, metric)
    rank = torch.empty((n, kk), dtype=torch.long, device=dev)
    rowmax = torch.empty(n, dtype=torch.float32, device=dev)
    for s in range(0, n, step):
        d = to_all(x[s : s + step]).square_()
        rowmax[s : s + step] = d.amax(1)  # NaN / inf propagate: checked below
        rank[s : s + step] = stable_topk_smallest(d, kk)
        del d
    if not bool(torch.isfinite(rowmax).all()):
        raise ValueError("re_ranking_features: the features give NaN or inf distances")
    if bool((rowmax <= 0).any()):
        raise ValueError("re_ranking_features: some feature is at distance 0 from all others")
    sq = torch.linalg.vector_norm(x, dim=1).square()
    rows, cols = _expansion_sets(rank, k1)
    dn = _pair_sqdist(x, sq, rows, cols, metric) / rowmax[rows]
    vals = _row_normalised_weights(rows, dn, n)
    del dn
    if k2 != 1:
        rows, cols, vals = _query_expand(rows, cols, vals, rank, k2, n)
    del rank
    qchunk = chunk_size or max(1, (1 << 22) // max(ng, 1))
    to_gallery = GalleryDistance(x[nq:], metric)
    for s, jac in _Jaccard(rows, cols, vals, nq, n).blocks(qchunk):
        e = s + jac.shape[0]
        base = to_gallery(x[s:e]).float().square_().div_(rowmax[s:e, None])
        yield s, jac.mul_(1 - lambda_value).add_(base, alpha=lambda_value)


@bounded_threads
def re_ranking_features(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """k-reciprocal re-ranking from features, sparse: for large query + gallery sets.

    Equal to ``re_ranking(d(q, g), d(q, q), d(g, g))`` with ``d`` =
    :func:`~reidkit.metrics.compute_distance` and the same ``metric`` (up to float
    rounding), but only the top-``max(k1+1, k2)`` neighbour
    lists, row maxima and the sparse ``V`` are stored.

    Args:
        qf: ``(Q, D)`` query features.
        gf: ``(G, D)`` gallery features.
        k1, k2, lambda_value: as in :func:`re_ranking`.
        metric: the plain distance that is squared inside: ``"euclidean"`` (true, as the
            original is normally used), ``"sqeuclidean"`` or ``"cosine"`` (``1 - cos``).
        chunk_size: rows per chunk of the neighbour pass / queries per output block.
        device: where to compute (default: ``qf``'s device).

    Returns:
        ``(Q, G)`` float32 tensor of re-ranked distances.
    """
    q = as_tensor(qf, "qf")
    nq = q.shape[0]
    ng = as_tensor(gf, "gf").shape[0]
    out = None
    for s, block in iter_re_ranking_features(
        qf, gf, k1, k2, lambda_value, metric, chunk_size, device
    ):
        if out is None:
            out = torch.empty((nq, ng), dtype=torch.float32, device=block.device)
        out[s : s + block.shape[0]] = block
    assert out is not None
    return out


# ------------------------------------------------------------------------------ alpha-QE
@bounded_threads
def average_query_expansion(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    k: int = 5,
    alpha: float = 3.0,
    expand_gallery: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha-weighted average query expansion (alpha-QE).

    Features are L2-normalised; each query becomes
    ``normalise(q + sum_{i<=k} max(cos(q, g_i), 0)^alpha * g_i)`` over its ``k`` most
    similar gallery features (``alpha = 0``: plain average QE). No camera filtering is
    applied to the neighbours. With ``expand_gallery`` the gallery is expanded the same
    way with its own ``k`` nearest gallery neighbours (itself included, as usual for
    database-side augmentation).

    Args:
        qf: ``(Q, D)`` query features.
        gf: ``(G, D)`` gallery features.
        k: neighbours used (``k >= 1``, at most ``G``).
        alpha: similarity exponent (``>= 0``).
        expand_gallery: also expand the gallery features.
        chunk_size: rows per similarity block.

    Returns:
        ``(qf', gf')``: ``(Q, D)`` and ``(G, D)`` L2-normalised float tensors (``gf'`` is
        the normalised input when ``expand_gallery`` is False). Use cosine distance next.
    """
    q = l2_normalize(as_tensor(qf, "qf").float())
    g = l2_normalize(as_tensor(gf, "gf").float().to(q.device))
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"qf (Q, D) and gf (G, D) must share D; got {tuple(q.shape)}, {tuple(g.shape)}"
        )
    if not 1 <= k <= g.shape[0]:
        raise ValueError(f"k must be in [1, G={g.shape[0]}], got {k}")
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")

    def expand(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        step = chunk_size or max(1, (1 << 22) // g.shape[0])
        for s in range(0, x.shape[0], step):
            sim = x[s : s + step] @ g.T
            top, idx = torch.topk(sim, k, dim=1)
            w = top.clamp_min(0.0).pow(alpha) if alpha > 0 else torch.ones_like(top)
            out[s : s + step] = x[s : s + step] + (w[..., None] * g[idx]).sum(1)
        return l2_normalize(out)

    q2 = expand(q)
    g2 = expand(g) if expand_gallery else g
    return q2, g2
