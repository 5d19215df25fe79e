"""Exact, vectorised single-query ranking evaluation (CMC, mAP, mINP).

Protocol (Market-1501 / DukeMTMC-reID / MSMT17 / CUHK03-NP, single query), identical to
the per-query evaluators of torchreid (``eval_market1501``), fast-reid, BoT and AGW:

1. For each query, the gallery images with the query's pid **and** camera are removed
   ("junk"). With ``q_camids=g_camids=None`` (no-camera mode) nothing is removed.
   Gallery images whose pid is in ``ignore_gallery_pids`` are removed for every query
   (the official Market-1501 script does this for pid -1).
2. The remaining gallery is ranked by increasing distance. **Ties are broken by gallery
   index** (a stable sort): of two gallery images at the same distance, the one that
   comes first in the gallery list ranks first.
3. True matches are the remaining images with the query's pid. A query with no true
   match left is skipped (not "valid").
4. ``AP`` = mean over the true matches of the precision at each hit (``ap_mode=
   "standard"``), or the trapezoid rule of the official Market-1501 MATLAB script
   (``ap_mode="trapezoid"``). ``INP`` = number of matches / rank of the last match
   (Ye et al., AGW). ``CMC[k]`` = fraction of valid queries whose first true match is at
   rank ``<= k + 1``.

Differences from the usual evaluators (bugs they have, not protocol changes): any
``max_rank`` works, also larger than what a query keeps after exclusion or than the
gallery (the CMC of a valid query is 1 from its first hit onwards, so the curve is
extended with its final value instead of crashing on ragged rows); inputs are validated.

Speed: nothing is sorted but each query's few true matches. The rank of a true match is
the number of kept gallery items closer than it (ties by index). Per cache-sized piece of
rows, each row's range from its nearest to its farthest match is split into equal
buckets: items in buckets without a match are only counted, the few sharing a bucket with
matches are compared with them exactly, and a cumulative count gives every match's rank
(O(G) per query for any distance distribution, O(piece) extra memory). When few items
can precede a row's farthest match, those candidates are gathered first. Pieces run on a
thread pool (:func:`reidkit.threads.parallel_map`); the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..threads import bounded_threads, parallel_map
from .distance import GalleryDistance, Metric, as_tensor

__all__ = [
    "EvalResult",
    "APMode",
    "evaluate_rank",
    "evaluate_features",
    "RankAccumulator",
]

APMode = Literal["standard", "trapezoid"]
AP_MODES = ("standard", "trapezoid")

# Elements of the (chunk x G) distance blocks that evaluate_features / cuhk03 compute.
_CHUNK_ELEMENTS = 1 << 22
# Elements evaluated at once: cache-sized on CPU (every pass stays in L2/L3), large on
# GPUs (fewer launches).
_PIECE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
# Most buckets per row (see _match_ranks); keeps row * bucket keys exact in float32.
_BUCKETS = 2048
# Above this (sampled) fraction of items that can precede a match, bucket every item
# instead of gathering the candidates first.
_DENSE_FRACTION = 0.25
# Column stride of that sample.
_SAMPLE_STRIDE = 37
# Below this fraction of non-zero 8-byte words, _nonzero_2d expands words.
_SPARSE_WORDS = 0.1


@dataclass
class EvalResult:
    """Result of a ranking evaluation.

    Attributes:
        cmc: ``(max_rank,)`` float64 array; ``cmc[k]`` is the fraction of valid queries
            whose first true match ranks within the top ``k + 1``.
        mAP: mean average precision over valid queries, in ``[0, 1]``.
        mINP: mean inverse negative penalty over valid queries, in ``[0, 1]``.
        num_valid: number of queries with at least one true match after exclusion.
        all_AP: ``(num_valid,)`` per-query AP, in query order.
        all_INP: ``(num_valid,)`` per-query INP, in query order.
        valid: ``(Q,)`` bool mask of the valid queries (maps ``all_AP`` back to queries).
        first_hit: ``(num_valid,)`` 0-based rank of each valid query's first true match.
        ap_mode: ``"standard"`` or ``"trapezoid"``.
        extra: free-form details (e.g. ``{"num_repeats": 10}`` for CUHK03 classic).
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    all_AP: np.ndarray
    all_INP: np.ndarray
    valid: np.ndarray
    first_hit: np.ndarray
    ap_mode: str = "standard"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_query(self) -> int:
        """Number of queries evaluated (valid or not)."""
        return int(self.valid.shape[0])

    def rank(self, k: int) -> float:
        """Rank-``k`` accuracy (``k`` is 1-based), e.g. ``rank(1)`` is R1."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank k must be in [1, {len(self.cmc)}] (max_rank), got {k}")
        return float(self.cmc[k - 1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary: fractions in ``[0, 1]`` and the CMC curve as a list."""
        out: dict[str, Any] = {
            "mAP": float(self.mAP),
            "mINP": float(self.mINP),
            "num_valid": int(self.num_valid),
            "num_query": self.num_query,
            "ap_mode": self.ap_mode,
        }
        for k in (1, 5, 10, 20):
            if k <= len(self.cmc):
                out[f"rank{k}"] = float(self.cmc[k - 1])
        out["cmc"] = [float(v) for v in self.cmc]
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    def __repr__(self) -> str:  # short: the arrays can be huge
        r = {k: round(self.rank(k) * 100, 2) for k in (1, 5, 10) if k <= len(self.cmc)}
        return (
            f"EvalResult(mAP={self.mAP * 100:.2f}%, mINP={self.mINP * 100:.2f}%, "
            f"cmc={r}, num_valid={self.num_valid}/{self.num_query})"
        )


# ----------------------------------------------------------------------------- inputs
def _labels(x: Any, name: str, n: int | None, device: torch.device) -> torch.Tensor:
    t = as_tensor(x, name).to(device)
    if t.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(
            f"{name}: expected {n} labels (to match the distance matrix), got {t.shape[0]}"
        )
    if torch.is_floating_point(t):
        if not bool(torch.all(t == torch.round(t))):
            raise ValueError(f"{name}: labels must be integers, got non-integral floats")
        t = t.long()
    elif t.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integers, got bool")
    return t.long()


def _check_camids(q_camids: Any, g_camids: Any) -> bool:
    if (q_camids is None) != (g_camids is None):
        raise ValueError(
            "q_camids and g_camids must both be given or both be None (no-camera mode); "
            f"got q_camids={'None' if q_camids is None else 'array'}, "
            f"g_camids={'None' if g_camids is None else 'array'}"
        )
    return q_camids is not None


def _query_gallery_labels(
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    num_query: int,
    num_gallery: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Checked long label tensors ``(qp (Q,), gp (G,), qc (Q,) | None, gc (G,) | None)`` on
    ``device`` for a ``(Q, G)`` distance matrix; the camids are both None in no-camera mode."""
    has_cam = _check_camids(q_camids, g_camids)
    qp = _labels(q_pids, "q_pids", num_query, device)
    gp = _labels(g_pids, "g_pids", num_gallery, device)
    qc = _labels(q_camids, "q_camids", num_query, device) if has_cam else None
    gc = _labels(g_camids, "g_camids", num_gallery, device) if has_cam else None
    return qp, gp, qc, gc


def _check_common(max_rank: int, ap_mode: str) -> None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, int | np.integer) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode must be one of {AP_MODES}, got {ap_mode!r}")


def _ignore_mask(g_pids: torch.Tensor, ignore: Sequence[int] | None) -> torch.Tensor | None:
    if ignore is None or len(ignore) == 0:
        return None
    bad = torch.as_tensor(list(ignore), dtype=torch.long, device=g_pids.device)
    return torch.isin(g_pids, bad)


def _check_finite(dist: torch.Tensor, offset: int = 0) -> None:
    lo, hi = torch.aminmax(dist)  # one pass; NaN propagates
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = (~torch.isfinite(dist)).nonzero()
    r, c = (int(v) for v in bad[0])
    raise ValueError(
        f"distmat contains {bad.shape[0]} non-finite value(s) (NaN or inf); first at "
        f"[query {r + offset}, gallery {c}] = {dist[r, c].item()}. Check the features "
        "(NaN features come from a diverged model or a zero-norm vector)."
    )


# ------------------------------------------------------------------------------- core
class _GalleryPids:
    """The gallery grouped by pid (built once): the same-pid images of a query are one
    contiguous range of ``order``, so the few true matches are listed without a
    ``(Q, G)`` label comparison."""

    def __init__(self, g_pids: torch.Tensor) -> None:
        self.order = torch.sort(g_pids, stable=True).indices  # by pid, then gallery index
        sorted_pids = g_pids[self.order]
        new = torch.ones_like(sorted_pids, dtype=torch.bool)
        new[1:] = sorted_pids[1:] != sorted_pids[:-1]
        self.pids = sorted_pids[new]
        self.start = new.nonzero().view(-1)
        self.count = torch.diff(self.start, append=self.start.new_tensor([g_pids.shape[0]]))

    def same_pid_pairs(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)``: every (query, gallery) pair with equal pids, sorted by
        (row, col)."""
        at = torch.searchsorted(self.pids, q_pids).clamp_max(self.pids.shape[0] - 1)
        count = torch.where(self.pids[at] == q_pids, self.count[at], 0)
        rows, pos = _expand_ranges(self.start[at], count)
        return rows, self.order[pos]


def _expand_ranges(start: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(owner, position)`` of every element of the ranges ``[start[i], start[i] +
    count[i])``, in order."""
    total = int(count.sum())
    owner = torch.repeat_interleave(
        torch.arange(count.shape[0], device=count.device), count, output_size=total
    )
    shift = start - (count.cumsum(0) - count)
    return owner, torch.arange(total, device=count.device) + shift[owner]


def _nonzero_2d(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the True entries of a contiguous ``(n, G)`` bool mask, in order.

    For very sparse masks the 8-byte words holding any True entry are found first (an
    eighth of the work of ``nonzero``) and only those are expanded.
    """
    g = mask.shape[1]
    flat = mask.view(-1)
    n8 = flat.shape[0] // 8 * 8
    words = flat[:n8].view(torch.int64)
    if int(torch.count_nonzero(words)) > _SPARSE_WORDS * words.shape[0]:
        return mask.nonzero(as_tuple=True)
    pos = words.nonzero().view(-1)
    pos = (pos[:, None] * 8 + torch.arange(8, device=flat.device)).view(-1)
    pos = pos.index_select(0, flat.index_select(0, pos).nonzero().view(-1))
    if n8 < flat.shape[0]:
        pos = torch.cat([pos, flat[n8:].nonzero().view(-1) + n8])
    rows = pos // g
    return rows, pos - rows * g


def _buckets(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Bucket ``floor((x - lo) * scale) + 1`` clamped to ``[0, k + 1]``, as floats.

    Non-decreasing in ``x`` (each float operation is), so an item in a lower bucket than
    a match distance is strictly closer. Bucket 0 holds items closer than the row's
    nearest match, bucket ``k + 1`` (the overflow) items beyond the farthest one.
    """
    u = torch.sub(x, lo).mul_(scale)
    return u.floor_().clamp_(-1.0, float(k)).add_(1.0)


def _match_ranks(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    match_rows: torch.Tensor,
    match_cols: torch.Tensor,
    junk_rows: torch.Tensor,
    junk_cols: torch.Tensor,
    g_ignore: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the true matches among the kept gallery of each row.

    The rank of a match is the number of kept gallery items before it (ties by gallery
    index). Nothing is sorted but the matches: each row's range from its nearest to its
    farthest match is split into ``_BUCKETS`` equal buckets; items in buckets holding no
    match are only counted (one ``bincount``), and the few items sharing a bucket with a
    match are compared with those matches exactly (distance, then gallery index). When
    few items can precede a row's farthest match (features that rank well), only those
    are gathered first.

    Args:
        dist: ``(n, G)`` finite distances, contiguous.
        q_pids, g_pids: ``(n,)`` and ``(G,)`` labels.
        match_rows, match_cols: ``(M,)`` positions of the true matches (row-major order).
        junk_rows, junk_cols: positions removed for their row (same pid and camera).
        g_ignore: ``(G,)`` bool, gallery entries removed for every row, or None.

    Returns:
        ``(rows, ranks)``, both ``(M,)`` long: the row of each true match and its 0-based
        rank among the kept entries, sorted by (row, rank).
    """
    n, g = dist.shape
    dev = dist.device
    m = match_rows.shape[0]
    if m == 0:
        return match_rows, match_rows
    k = min(_BUCKETS, max(16, g // 8))  # buckets per row: a small fraction of the row
    nb = k + 2  # with bucket 0 and the overflow
    # matches sorted by (row, distance, gallery index): two stable sorts of M entries
    md = dist[match_rows, match_cols]
    o = torch.sort(md, stable=True).indices
    o = o[torch.sort(match_rows[o], stable=True).indices]
    mr, mc, md = match_rows[o], match_cols[o], md[o]
    counts = torch.bincount(mr, minlength=n)
    mstart = counts.cumsum(0) - counts
    has = counts > 0
    lo = torch.where(has, md[mstart.clamp_max(m - 1)], 0.0).to(dist.dtype)
    far = torch.where(has, md[(mstart + counts - 1).clamp(0, m - 1)], -math.inf).to(dist.dtype)
    # (k - 2) / span: the farthest match lands in bucket <= k - 1, never the overflow
    span = (far - lo).double()
    scale = ((k - 2) / span).clamp_max(torch.finfo(dist.dtype).max)
    scale = torch.where(has, scale, 0.0).to(dist.dtype)  # rows without matches: bucket 1
    # (row, bucket) keys of the matches: sorted, since buckets are monotone
    mkey = (mr * nb).add_(_buckets(md, lo[mr], scale[mr], k).long())
    shared = torch.zeros(n * nb, dtype=torch.bool, device=dev)
    shared[mkey] = True  # buckets holding a match
    est = (dist[:, ::_SAMPLE_STRIDE] <= far[:, None]).float().mean()
    if float(est) > _DENSE_FRACTION:
        # every item: bucket (excluded ones to the overflow), count, find the shared ones
        key_f = _buckets(dist, lo[:, None], scale[:, None], k)
        overflow = float(k + 1)
        key_f[match_rows, match_cols] = overflow
        key_f[junk_rows, junk_cols] = overflow
        if g_ignore is not None:
            key_f.masked_fill_(g_ignore, overflow)
        key_f.add_((torch.arange(n, device=dev) * nb).to(key_f.dtype)[:, None])
        key = key_f.view(-1).to(torch.int32)  # int32 keys: cheaper to convert and count
        del key_f
        hist = torch.bincount(key, minlength=n * nb)
        xr, xc = _nonzero_2d(shared.index_select(0, key).view(n, g))
        xkey = key.view(n, g)[xr, xc].long()
    else:
        # few candidates: gather the kept items not farther than the row's farthest match
        cand = dist <= far[:, None]
        cand[match_rows, match_cols] = False
        cand[junk_rows, junk_cols] = False
        if g_ignore is not None:
            cand.masked_fill_(g_ignore, False)
        xr, xc = _nonzero_2d(cand)
        del cand
        xd = dist[xr, xc]
        xb = _buckets(xd, lo.index_select(0, xr), scale.index_select(0, xr), k)
        xkey = (xr * nb).add_(xb.long())
        hist = torch.bincount(xkey, minlength=n * nb)
        at = shared.index_select(0, xkey).nonzero().view(-1)
        xr, xc, xkey = xr[at], xc[at], xkey[at]
    xd = dist[xr, xc]
    # items in buckets without a match: all of them precede exactly the later matches
    hist[mkey] = 0
    bulk = hist.view(n, nb).cumsum(1).view(-1)[mkey - 1]  # match buckets are >= 1
    # items sharing a bucket with matches: count the matches before each, exactly
    first = torch.searchsorted(mkey, xkey)
    stop = torch.searchsorted(mkey, xkey, right=True)
    before = first.clone()
    for w in range(int((stop - first).max()) if xkey.numel() else 0):
        j = first + w
        jc = j.clamp_max(m - 1)
        dj = md[jc]
        before += (j < stop) & ((dj < xd) | ((dj == xd) & (mc[jc] < xc)))
    keep = before < mstart[xr] + counts[xr]  # after the row's last match: irrelevant
    bins = torch.bincount(before[keep], minlength=m)
    csum = bins.cumsum(0)
    shared_before = csum - (csum - bins)[mstart[mr]]  # cumulative within the row
    ranks = (torch.arange(m, device=dev) - mstart[mr]) + bulk + shared_before
    return mr, ranks


def _chunk_stats(
    dist: torch.Tensor,
    qp: torch.Tensor,
    gp: torch.Tensor,
    qc: torch.Tensor | None,
    gc: torch.Tensor | None,
    g_ignore: torch.Tensor | None,
    gallery: _GalleryPids,
    ap_mode: str,
) -> dict[str, torch.Tensor]:
    """Per-query statistics of one chunk: valid, AP, INP, first-hit rank (all ``(n,)``)."""
    dist = dist.contiguous()  # e.g. a transposed input: rows are scanned
    n = dist.shape[0]
    dev = dist.device
    pr, pc = gallery.same_pid_pairs(qp)  # few: handled sparsely from here on
    if g_ignore is not None:
        ok = ~g_ignore[pc]
        pr, pc = pr[ok], pc[ok]
    if qc is not None:
        junk = qc[pr] == gc[pc]
        mr, mc, jr, jc = pr[~junk], pc[~junk], pr[junk], pc[junk]
    else:
        mr, mc, jr, jc = pr, pc, pr[:0], pc[:0]
    rows, ranks = _match_ranks(dist, qp, gp, mr, mc, jr, jc, g_ignore)
    num_match = torch.bincount(rows, minlength=n)
    starts = num_match.cumsum(0) - num_match
    i = (torch.arange(rows.shape[0], device=dev) - starts[rows]).double()
    r = ranks.double()
    if ap_mode == "standard":
        terms = (i + 1.0) / (r + 1.0)
    else:  # trapezoid rule of the official Market-1501 script
        prev = torch.where(r > 0, i / r.clamp_min(1.0), torch.ones_like(r))
        terms = 0.5 * (prev + (i + 1.0) / (r + 1.0))
    valid = num_match > 0
    nm = num_match.double().clamp_min(1.0)
    ap = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, rows, terms) / nm
    if rows.shape[0] > 0:
        last_idx = rows.shape[0] - 1
        first = ranks[starts.clamp_max(last_idx)]
        last = ranks[(starts + num_match - 1).clamp(0, last_idx)]
    else:
        first = torch.zeros(n, dtype=torch.long, device=dev)
        last = first
    inp = num_match.double() / (last.double() + 1.0)
    return {"valid": valid, "ap": ap, "inp": inp, "first": first}


class RankAccumulator:
    """Accumulates per-query statistics chunk by chunk, then builds an :class:`EvalResult`.

    Used by :func:`evaluate_rank` and :func:`evaluate_features`; also handy for custom
    loops that produce distance rows in pieces (e.g. re-ranking in chunks).

    Args:
        g_pids: ``(G,)`` gallery pids.
        g_camids: ``(G,)`` gallery camera ids, or None for no-camera mode.
        max_rank: CMC length.
        ap_mode: ``"standard"`` or ``"trapezoid"``.
        ignore_gallery_pids: gallery pids removed for every query (e.g. ``(-1,)``).
        device: where the statistics are computed.
    """

    def __init__(
        self,
        g_pids: Any,
        g_camids: Any,
        max_rank: int = 50,
        ap_mode: APMode = "standard",
        ignore_gallery_pids: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_common(max_rank, ap_mode)
        self.device = torch.device(device)
        self.gp = _labels(g_pids, "g_pids", None, self.device)
        if self.gp.shape[0] == 0:
            raise ValueError("the gallery is empty (g_pids has length 0)")
        self.gc = (
            None
            if g_camids is None
            else _labels(g_camids, "g_camids", self.gp.shape[0], self.device)
        )
        self.g_ignore = _ignore_mask(self.gp, ignore_gallery_pids)
        self._gallery = _GalleryPids(self.gp)
        self.max_rank = int(max_rank)
        self.ap_mode = ap_mode
        self._parts: list[dict[str, torch.Tensor]] = []
        self._seen = 0

    def update(self, dist: np.ndarray | torch.Tensor, q_pids: Any, q_camids: Any = None) -> None:
        """Add a ``(n, G)`` block of distance rows for ``n`` queries (numpy or torch).

        A block that fails validation (shape, labels, NaN / inf) leaves the accumulator
        as it was.
        """
        self._update(dist, q_pids, q_camids, None)

    @bounded_threads
    def _update(self, dist: Any, q_pids: Any, q_camids: Any, piece_rows: int | None) -> None:
        dist = as_tensor(dist, "dist")
        if dist.ndim != 2 or dist.shape[1] != self.gp.shape[0]:
            raise ValueError(
                f"distance block must have shape (n, {self.gp.shape[0]}), got {tuple(dist.shape)}"
            )
        dist = dist.to(self.device)
        if dist.dtype in (torch.float16, torch.bfloat16) or not torch.is_floating_point(dist):
            dist = dist.float()
        qp = _labels(q_pids, "q_pids", dist.shape[0], self.device)
        if (q_camids is None) != (self.gc is None):
            _check_camids(q_camids, self.gc)
        qc = None if q_camids is None else _labels(q_camids, "q_camids", dist.shape[0], self.device)
        step = piece_rows or _piece_rows(dist.shape[1], self.device)

        def piece_stats(s: int) -> dict[str, torch.Tensor]:
            piece = slice(s, s + step)
            _check_finite(dist[piece], self._seen + s)  # also brings the piece into cache
            return _chunk_stats(
                dist[piece],
                qp[piece],
                self.gp,
                None if qc is None else qc[piece],
                self.gc,
                self.g_ignore,
                self._gallery,
                self.ap_mode,
            )

        # cache-sized pieces, one per thread at a time; kept only when all are valid
        parts = parallel_map(piece_stats, range(0, dist.shape[0], step), dist.device)
        self._parts.extend(parts)
        self._seen += dist.shape[0]

    def result(self) -> EvalResult:
        """Combine the chunks; raises ValueError when no query has a true match."""
        if self._seen == 0:
            raise ValueError("the query set is empty (no distance rows were given)")
        cat = {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}
        valid = cat["valid"]
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError(
                f"none of the {self._seen} queries has a true match in the gallery after "
                "removing same-pid same-camera images; check that query and gallery pids "
                "overlap and that camids are right"
            )
        first = cat["first"][valid]
        cmc = _cmc_from_first_hits(first, self.max_rank, self.gp.shape[0], num_valid)
        all_ap = cat["ap"][valid]
        all_inp = cat["inp"][valid]
        return EvalResult(
            cmc=cmc.cpu().numpy(),
            mAP=float(all_ap.mean()),
            mINP=float(all_inp.mean()),
            num_valid=num_valid,
            all_AP=all_ap.cpu().numpy(),
            all_INP=all_inp.cpu().numpy(),
            valid=valid.cpu().numpy(),
            first_hit=first.cpu().numpy(),
            ap_mode=self.ap_mode,
        )


def _cmc_from_first_hits(
    first: torch.Tensor, max_rank: int, num_gallery: int, denom: float
) -> torch.Tensor:
    """``(max_rank,)`` float64 CMC from 0-based first-hit ranks (``< num_gallery``).

    Ranks at or beyond the gallery size are all reached, so the curve is computed up to
    ``min(max_rank, num_gallery)`` and extended with its last value.
    """
    eff = min(max_rank, num_gallery)
    hist = torch.bincount(first.clamp_max(eff), minlength=eff + 1)
    cmc = hist[:eff].cumsum(0).double() / denom
    if eff < max_rank:
        cmc = torch.cat([cmc, cmc[-1:].expand(max_rank - eff)])
    return cmc


def _piece_rows(num_gallery: int, device: torch.device) -> int:
    """Rows evaluated at once: about ``_PIECE_ELEMENTS`` items, and few enough rows that
    the ``row * buckets + bucket`` keys stay exact in float32."""
    budget = _PIECE_ELEMENTS.get(device.type, _PIECE_ELEMENTS["cuda"])
    return max(1, min(budget // max(num_gallery, 1), (1 << 23) // (_BUCKETS + 2)))


def _chunk_rows(num_gallery: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, _CHUNK_ELEMENTS // max(num_gallery, 1))


@bounded_threads
def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    max_rank: int = 50,
    *,
    ap_mode: APMode = "standard",
    ignore_gallery_pids: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> EvalResult:
    """CMC, mAP and mINP of a query-gallery distance matrix (single-query protocol).

    Args:
        distmat: ``(Q, G)`` distances (smaller = more similar), numpy or torch (CPU or
            CUDA); must be finite.
        q_pids: ``(Q,)`` query identity labels (ints).
        g_pids: ``(G,)`` gallery identity labels.
        q_camids: ``(Q,)`` query camera ids, or None (no-camera mode, with ``g_camids``).
        g_camids: ``(G,)`` gallery camera ids, or None.
        max_rank: length of the CMC curve; any positive value is valid.
        ap_mode: ``"standard"`` (mean precision at each hit, as torchreid/fast-reid) or
            ``"trapezoid"`` (the official Market-1501 MATLAB script).
        ignore_gallery_pids: gallery pids removed for every query, e.g. ``(-1,)`` for the
            official Market-1501 junk images. Default: none.
        chunk_size: queries per chunk (default: about 4M distance entries per chunk).

    Returns:
        :class:`EvalResult`. Ties in distance are broken by gallery index (stable sort).

    Raises:
        ValueError: on shape mismatches, non-finite distances, an empty query set, or when
            no query has a true match.
    """
    for name, labels in zip(
        ("q_pids", "g_pids", "q_camids", "g_camids"), (q_pids, g_pids, q_camids, g_camids)
    ):
        if labels is not None and not isinstance(labels, torch.Tensor):
            if np.asarray(labels).dtype.kind in "USO":  # strings / objects: not label ids
                raise ValueError(
                    f"{name}: labels must be integers, got {np.asarray(labels).dtype} values "
                    f"(e.g. {np.asarray(labels).flat[0]!r}); map them to ints first, e.g. "
                    "{p: i for i, p in enumerate(sorted(set(pids)))}"
                )
    dist = as_tensor(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D (Q, G) matrix, got shape {tuple(dist.shape)}")
    nq, ng = dist.shape
    if nq == 0:
        raise ValueError("the query set is empty (distmat has 0 rows)")
    if ng == 0:
        raise ValueError("the gallery is empty (distmat has 0 columns)")
    dev = dist.device
    qp, gp, qc, gc = _query_gallery_labels(q_pids, g_pids, q_camids, g_camids, nq, ng, dev)
    acc = RankAccumulator(gp, gc, max_rank, ap_mode, ignore_gallery_pids, dev)
    acc._update(dist, qp, qc, None if chunk_size is None else _chunk_rows(ng, chunk_size))
    return acc.result()


@bounded_threads
def evaluate_features(
    qf: np.ndarray | torch.Tensor,
    gf: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    metric: Metric = "cosine",
    max_rank: int = 50,
    *,
    ap_mode: APMode = "standard",
    ignore_gallery_pids: Sequence[int] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    rerank: bool = False,
    rerank_k1: int = 20,
    rerank_k2: int = 6,
    rerank_lambda: float = 0.3,
) -> EvalResult:
    """Like :func:`evaluate_rank`, from features, never holding the full ``Q x G`` matrix.

    Distances are computed for ``chunk_size`` queries at a time and evaluated at once, so
    the extra memory is ``O(chunk_size * G)`` (a few hundred MB by default) on top of
    the features.

    Args:
        qf: ``(Q, D)`` query features.
        gf: ``(G, D)`` gallery features.
        q_pids, g_pids, q_camids, g_camids, max_rank, ap_mode, ignore_gallery_pids: as in
            :func:`evaluate_rank`.
        metric: ``"cosine"`` (``1 - cos``), ``"euclidean"`` (true, not squared) or
            ``"sqeuclidean"``; the ranking of the last two is identical.
        chunk_size: queries per distance block (default: about 16M distances).
        device: where to compute (default: ``qf``'s device).
        rerank: apply k-reciprocal re-ranking first (sparse, from features:
            :func:`~reidkit.metrics.iter_re_ranking_features` with ``metric`` as the
            plain distance), still block by block. Names match ``cfg.test``.
        rerank_k1, rerank_k2, rerank_lambda: re-ranking ``k1``, ``k2``, ``lambda_value``.
    """
    q = as_tensor(qf, "qf")
    g = as_tensor(gf, "gf")
    if q.ndim != 2 or g.ndim != 2:
        raise ValueError(
            f"qf and gf must be 2-D (N, D) feature matrices, got {tuple(q.shape)} and {tuple(g.shape)}"
        )
    if q.shape[0] == 0:
        raise ValueError("the query set is empty (qf has 0 rows)")
    dev = torch.device(device) if device is not None else q.device
    q = q.to(dev)
    g = g.to(dev)
    has_cam = _check_camids(q_camids, g_camids)
    qp = _labels(q_pids, "q_pids", q.shape[0], dev)
    qc = _labels(q_camids, "q_camids", q.shape[0], dev) if has_cam else None
    gp = _labels(g_pids, "g_pids", g.shape[0], dev)
    acc = RankAccumulator(
        gp, g_camids if has_cam else None, max_rank, ap_mode, ignore_gallery_pids, dev
    )
    # distance blocks 4x larger than the evaluation pieces: better matrix products
    step = chunk_size or max(1, 4 * _CHUNK_ELEMENTS // max(g.shape[0], 1))
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rerank:
        from .rerank import iter_re_ranking_features

        blocks = iter_re_ranking_features(
            q, g, rerank_k1, rerank_k2, rerank_lambda, metric, chunk_size, dev
        )
        for s, block in blocks:
            e = s + block.shape[0]
            acc.update(block, qp[s:e], None if qc is None else qc[s:e])
        return acc.result()
    to_gallery = GalleryDistance(g, metric)  # no copy of the gallery
    for s in range(0, q.shape[0], step):
        dist = to_gallery(q[s : s + step])
        acc.update(dist, qp[s : s + step], None if qc is None else qc[s : s + step])
        del dist
    return acc.result()
