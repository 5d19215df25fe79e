"""CAN for re-ID: a BoT model whose ranking is re-scored with cross-attended pair features.

Hou et al., *Cross Attention Network for Few-shot Classification*, NeurIPS 2019 present the
cross-attention module (CAM) for re-ID pairs ("relevant regions of a pair") and report it
on few-shot classification; no public code applies it to re-ID, so the re-ID use below is
reidkit's documented choice (``docs/can.md``). The module itself is
:class:`reidkit.models.cross_attention.CrossAttention` (shared with ``reidkit fewshot``).

Architecture (BoT + a CAN head on the final map)::

    images -> backbone -> feat_map (B, C, h, w) -> GAP -> BNNeck   (BoT: vectors, CE + triplet)
                              |
                              +-> adaptive avg-pool to grid (gh, gw) -> 1x1 conv C -> d -> BN
                                  = can_map (B, d, gh, gw)        (kept for evaluation, fp16)

**Training**: the usual BoT losses (:class:`~reidkit.losses.ReIDLoss`) plus a pair loss on
the cross-attended features of every ordered pair of the P x K batch
(:func:`pair_similarity_matrix`): ``model.can_reid.pair_loss = softmax`` (default: for each
anchor, a cosine-softmax over the other images of the batch, scale 7 as in the CAN code's
nearest-neighbour loss, maximising the probability mass of its positives) or ``triplet``
(batch-hard on ``1 - cos``).

**Evaluation** (:meth:`CanReID.pairwise_distance`, called by the evaluator per chunk of
queries): the vector distance (``test.metric``) to the whole gallery; the ``topk`` nearest
gallery items of each query are re-scored with ``(1 - lambda) (1 - cos(f_q, f_g)) + lambda
(1 - cos(GAP(A^p * P_q), GAP(A^q * P_g)))`` (``lambda = fuse_weight``) and re-ordered
inside the top-k: the re-scored items take the k smallest vector distances of that query,
in their new order (:func:`merge_rescored`). So everything below the top-k keeps its
vector distance and order exactly, and no re-scored item can fall below a non-re-scored
one. Pairs are attended in blocks of about ``pair_chunk`` pairs, so memory is bounded by
the stored maps plus one block, whatever the gallery size.

**Memory**: only ``can_map`` is stored per image, ``d x gh x gw`` at ``map_dtype``: 256 x 8
x 4 fp16 = 16 KiB, i.e. 308 MiB for Market-1501's 19,732 gallery images (the raw ResNet-50
map, 2048 x 16 x 8 fp32, is 1 MiB per image: 19.3 GiB).

The query is ``P`` and the gallery item ``Q`` in the paper's notation; the score is
symmetric (the fusion layer is shared), so the roles only name the attention maps.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from reidkit.config import Config
from reidkit.methods.base import (
    Batch,
    MethodOptions,
    ReportView,
    Role,
    method_options,
    register_method,
)
from reidkit.methods.baseline import Baseline
from reidkit.models.cross_attention import CrossAttention

__all__ = [
    "CanReID",
    "CanReIDOptions",
    "CanEmbedding",
    "cross_attention_similarity",
    "pair_similarity_matrix",
    "pair_softmax_loss",
    "pair_triplet_loss",
    "merge_rescored",
    "vector_distance",
]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CanReIDOptions(MethodOptions):
    """``model.can_reid``: the CAN head, its pair loss and the top-k re-scoring."""

    topk: int = Field(100, ge=1)  # gallery items re-scored per query
    fuse_weight: float = Field(0.5, ge=0, le=1)  # lambda: 0 = vector order, 1 = CAN score only
    embed_dim: int = Field(256, ge=1)  # channels d of the stored map (1x1 conv from C)
    grid: tuple[int, int] = (8, 4)  # (gh, gw) the map is average-pooled to (hw = gh * gw)
    map_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage precision
    temperature: float = Field(0.025, gt=0)  # tau of the attention softmax (CAN code)
    fusion_reduction: int = Field(6, ge=1)  # meta fusion hidden width = hw // reduction
    residual: bool = True  # A = softmax + 1 (CAN code)
    pair_loss: Literal["softmax", "triplet", "none"] = "softmax"
    pair_weight: float = Field(1.0, ge=0)
    pair_scale: float = Field(7.0, gt=0)  # cosine-softmax scale (CAN code's NN loss: 7)
    pair_margin: float = Field(0.3, ge=0)  # triplet margin on 1 - cos
    pair_chunk: int = Field(2048, ge=1)  # pairs attended at once at test time
    rescore_attention: bool = True  # False: cosine of the plain GAP of the maps (ablation)

    @field_validator("grid")
    @classmethod
    def _positive_grid(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < 1:
            raise ValueError(f"grid must be two positive integers (gh, gw), got {list(v)}")
        return v


# ----------------------------------------------------------------------------- functions
def vector_distance(q: Tensor, g: Tensor, metric: str = "cosine") -> Tensor:
    """``(n, D) x (G, D) -> (n, G)`` float32 distances, as :func:`reidkit.metrics.compute_distance`
    (``cosine``: ``1 - cos``; ``euclidean``: true distance; ``sqeuclidean``)."""
    q, g = q.float(), g.float()
    if metric == "cosine":
        # scale the (n, G) product by 1 / |g| instead of normalising a copy of the gallery
        sim = F.normalize(q, dim=1) @ g.T
        return 1.0 - sim.mul_(torch.linalg.vector_norm(g, dim=1).clamp_min(1e-12).reciprocal())
    if metric not in ("euclidean", "sqeuclidean"):
        raise ValueError(f"test.metric: unknown metric '{metric}' (cosine, euclidean, sqeuclidean)")
    d = q.square().sum(1, keepdim=True) + g.square().sum(1)[None]
    d = d.addmm_(q, g.T, alpha=-2.0).clamp_min_(0.0)
    return d.sqrt_() if metric == "euclidean" else d


def cross_attention_similarity(
    attention: CrossAttention,
    q_maps: Tensor,
    g_maps: Tensor,
    return_attention: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Cosine similarity of the cross-attended features of ``n x k`` (query, gallery) pairs.

    Args:
        attention: the CAM (its ``num_positions`` must be ``h * w``).
        q_maps: ``(n, C, h, w)`` query maps ``P``.
        g_maps: ``(n, k, C, h, w)``: the ``k`` gallery maps ``Q`` paired with each query.
        return_attention: also return ``A^p (n, k, h, w)`` (on the query, given each gallery
            item) and ``A^q (n, k, h, w)`` (on each gallery item, given the query).

    Returns:
        ``(n, k)``: ``cos(GAP(A^p * P), GAP(A^q * Q))``, computed in float32; the query map
        is broadcast, never copied ``k`` times.
    """
    if q_maps.dim() != 4 or g_maps.dim() != 5 or g_maps.shape[0] != q_maps.shape[0]:
        raise ValueError(
            "cross_attention_similarity: expected q_maps (n, C, h, w) and g_maps (n, k, C, h, w), "
            f"got {tuple(q_maps.shape)} and {tuple(g_maps.shape)}"
        )
    if g_maps.shape[2:] != q_maps.shape[1:]:
        raise ValueError(
            f"cross_attention_similarity: map shapes differ: {tuple(q_maps.shape[1:])} (query) vs "
            f"{tuple(g_maps.shape[2:])} (gallery)"
        )
    n, k, c, h, w = g_maps.shape
    hw = h * w
    with torch.autocast(q_maps.device.type, enabled=False):
        q = _positions_last(q_maps.reshape(n, c, hw))  # (n, hw, C) float32
        g = _positions_last(g_maps.reshape(n, k, c, hw))  # (n, k, hw, C)
        # R[i, j] = <p_i, q_j> / (|p_i| |q_j|): one GEMM per query over its k items (the
        # query map is shared, never copied), then the norms; no normalised copy of g
        raw = q @ g.view(n, k * hw, c).transpose(1, 2)  # (n, hw, k * hw)
        r = raw.view(n, hw, k, hw).transpose(1, 2)  # (n, k, hw_p, hw_q)
        r = r * _inv_norm(q)[:, None, :, None] * _inv_norm(g)[:, :, None, :]
        ap, aq = attention.pair_attention(r)  # (n, k, hw) each
        p_feat = ap @ q / hw  # GAP(A^p * P): (n, k, C)
        q_feat = (aq.unsqueeze(-2) @ g).squeeze(-2) / hw  # GAP(A^q * Q): (n, k, C)
        sim = F.cosine_similarity(p_feat, q_feat, dim=-1)
    if return_attention:
        return sim, ap.view(n, k, h, w), aq.view(n, k, h, w)
    return sim


def pair_similarity_matrix(attention: CrossAttention, maps: Tensor) -> Tensor:
    """Cross-attended similarity of every ordered pair of a batch (training).

    Args:
        attention: the CAM.
        maps: ``(B, C, h, w)``.

    Returns:
        ``(B, B)`` symmetric: ``S[i, j] = cos(GAP(A_ij * M_i), GAP(A_ji * M_j))`` where
        ``A_ij`` is the attention over ``M_i``'s positions given ``M_j``. Equals
        :func:`cross_attention_similarity` of the pair ``(M_i, M_j)``: ``A^p`` of the pair
        ``(i, j)`` is ``A_ij`` and its ``A^q`` is ``A_ji``, so one attention call over all
        ``B^2`` correlation maps gives both directions (and, in training mode, the fusion
        BN sees the same set of maps as the code's two calls).
    """
    if maps.dim() != 4:
        raise ValueError(f"pair_similarity_matrix: expected (B, C, h, w), got {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    hw = h * w
    with torch.autocast(maps.device.type, enabled=False):
        x = _positions_last(maps.reshape(b, c, hw))  # (B, hw, C)
        flat = x * _inv_norm(x).unsqueeze(-1)
        r = (flat.view(b * hw, c) @ flat.view(b * hw, c).T).view(b, hw, b, hw)
        r = r.transpose(1, 2)  # (B, B, hw, hw): r[i, j] = corr(M_i, M_j), one GEMM
        a = attention.attention(r)  # (B, B, hw): over M_i's positions given M_j
        feats = a @ x / hw  # (B, B, C): GAP(A_ij * M_i)
        return F.cosine_similarity(feats, feats.transpose(0, 1), dim=-1)


def _positions_last(maps: Tensor) -> Tensor:
    """``(..., C, hw) -> (..., hw, C)`` contiguous float32 (one pass: the layout change is
    folded into the dtype conversion; a no-op for a float32 position-major view)."""
    t = maps.transpose(-1, -2)
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t)


def _inv_norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``1 / max(|x|, eps)`` over the last dimension (as ``F.normalize``)."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(eps).reciprocal()


def _pair_masks(pids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(pos, neg, valid)``: (B, B) masks without the diagonal; anchors with a positive and
    a negative are valid; invalid rows get all-True masks (no -inf rows)."""
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos, neg = same & ~eye, ~same
    has_pos, has_neg = pos.any(1, keepdim=True), neg.any(1, keepdim=True)
    valid = (has_pos & has_neg).squeeze(1)
    return pos | ~has_pos, neg | ~has_neg, valid


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp(min=1)


def pair_softmax_loss(sim: Tensor, pids: Tensor, scale: float = 7.0) -> Tensor:
    """Pairwise cosine-softmax: for each anchor ``i``, the softmax over the other images ``j``
    of ``scale * sim[i, j]``; loss ``-log(sum of the probabilities of i's positives)``.
    Mean over anchors with a positive and a negative. ``sim (B, B)``, ``pids (B,)``."""
    pos, neg, valid = _pair_masks(pids)
    logits = scale * sim.float()
    lse_all = torch.logsumexp(logits.masked_fill(~(pos | neg), float("-inf")), dim=1)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    return _masked_mean(lse_all - lse_pos, valid)


def pair_triplet_loss(sim: Tensor, pids: Tensor, margin: float = 0.3) -> Tensor:
    """Batch-hard triplet on the cross-attended distance ``1 - sim``: ``relu(max_pos d -
    min_neg d + margin)``, mean over anchors with a positive and a negative."""
    pos, neg, valid = _pair_masks(pids)
    dist = 1.0 - sim.float()
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(dim=1)
    return _masked_mean(F.relu(d_ap - d_an + margin), valid)


def merge_rescored(dist: Tensor, top_index: Tensor, top_dist: Tensor, scores: Tensor) -> Tensor:
    """Put re-scored top-k items in their new order without moving anything else.

    Args:
        dist: ``(n, G)`` vector distances.
        top_index: ``(n, k)`` each row's ``k`` nearest gallery indices.
        top_dist: ``(n, k)`` their distances, ascending (``dist.topk(k, largest=False)``).
        scores: ``(n, k)`` new scores of those items (smaller = closer).

    Returns:
        ``(n, G)``: ``dist`` with the top-k entries re-assigned: the item with the r-th
        smallest score (ties: vector order) gets ``top_dist[r]``. Entries outside the top-k
        are unchanged, and every re-scored entry is ``<= top_dist[k-1] <=`` any of them.
    """
    order = scores.argsort(dim=1, stable=True)
    out = dist.clone()
    out.scatter_(1, top_index.gather(1, order), top_dist.to(out.dtype))
    return out


# -------------------------------------------------------------------------------- modules
class CanEmbedding(nn.Module):
    """The map kept for pair scoring: adaptive average pooling to ``grid``, then a 1x1 conv
    ``C -> d`` (no bias) and BatchNorm2d. ``(B, C, h, w) -> (B, d, gh, gw)``.

    Pooling first (it commutes with the 1x1 conv) makes the conv ``hw / (gh gw)`` times
    cheaper and keeps the BN statistics the same in training and at test time."""

    def __init__(self, in_channels: int, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.conv = nn.Conv2d(in_channels, dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feat_map: Tensor) -> Tensor:
        x = feat_map
        if tuple(x.shape[-2:]) != self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        return self.bn(self.conv(x))

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


@register_method("can_reid", options=CanReIDOptions)
class CanReID(Baseline):
    """BoT + CAN: top-k re-scoring of the vector ranking with cross-attended pair features.

    Args:
        cfg: the config (``model.can_reid``: :class:`CanReIDOptions`).
        num_classes: training identities (0: inference only).
        backbone: use this trunk instead of ``cfg.model.backbone`` (tests, custom trunks).
    """

    keep_for_eval = ("can_map",)
    exportable = False

    def __init__(self, cfg: Config, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__(cfg, num_classes, backbone=backbone)
        self.opts: CanReIDOptions = method_options(cfg, CanReIDOptions, "can_reid")
        o = self.opts
        self.can_embed = CanEmbedding(self.feat_dim, o.embed_dim, o.grid)
        self.cross_attention = CrossAttention(
            o.grid[0] * o.grid[1], o.fusion_reduction, o.temperature, o.residual
        )
        self.vector_metric: str = cfg.test.metric
        self.map_dtype = _DTYPES[o.map_dtype]

    # ------------------------------------------------------------------------- training
    def forward_train(self, images: Tensor) -> dict[str, Tensor]:
        """BoT outputs plus ``can_map (B, d, gh, gw)`` and ``pair_sim (B, B)``."""
        out = super().forward_train(images)
        can_map = self.can_embed(out["feat_map"])
        out["can_map"] = can_map
        if self.opts.pair_loss != "none" and self.opts.pair_weight > 0:
            out["pair_sim"] = pair_similarity_matrix(self.cross_attention, can_map)
        return out

    def compute_loss(self, outputs: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """BoT terms (``ce``, ``triplet``, ...) plus ``pair`` (the CAN pair loss)."""
        losses = super().compute_loss(outputs, batch)
        o = self.opts
        if "pair_sim" in outputs:
            sim, pids = outputs["pair_sim"], batch["pids"]
            if o.pair_loss == "softmax":
                term = pair_softmax_loss(sim, pids, o.pair_scale)
            else:
                term = pair_triplet_loss(sim, pids, o.pair_margin)
            losses["pair"] = o.pair_weight * term
        return losses

    # ------------------------------------------------------------------------ evaluation
    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, Tensor]:
        """``pre_bn``/``post_bn`` ``(B, C)`` and ``can_map (B, d, gh, gw)`` at ``map_dtype``."""
        feat_map = self.extract(batch["images"])
        global_feat = self.pool(feat_map)
        return {
            "pre_bn": global_feat,
            "post_bn": self.neck.bn(global_feat),
            "can_map": self.can_embed(feat_map).to(self.map_dtype),
        }

    @torch.no_grad()
    def pairwise_distance(self, query, gallery) -> Tensor:
        """``(q, G)`` distances of a chunk of queries to the gallery (see the module doc).

        Args:
            query: :class:`~reidkit.engine.extract.FeatureSet` of ``q`` queries with
                ``extras["can_map"]`` ``(q, d, gh, gw)``.
            gallery: the gallery ``FeatureSet`` (``G`` items, same extras).

        Returns:
            ``(q, G)`` float32 on the model's device: vector distances (``test.metric``)
            with each row's top-k re-ordered by the fused score (:func:`merge_rescored`).
        """
        for fs, role in ((query, "query"), (gallery, "gallery")):
            if "can_map" not in fs.extras:
                raise ValueError(
                    f"can_reid: the {role} FeatureSet has no 'can_map' extra; extract it with "
                    "this method (keep_for_eval) or save it with its extras"
                )
        dev = self._device()
        dist = vector_distance(query.feats.to(dev), gallery.feats.to(dev), self.vector_metric)
        k = min(self.opts.topk, len(gallery))
        if k == 0 or len(query) == 0 or self.opts.fuse_weight == 0:
            return dist
        top_dist, top_index = dist.topk(k, dim=1, largest=False, sorted=True)
        # scoring is a test-time operation: the fusion layer's BN must use its running
        # statistics (and not update them with test pairs) even if the caller left the
        # model in training mode
        was_training = self.cross_attention.training
        self.cross_attention.eval()
        try:
            scores = self.rescore(query, gallery, top_index)
        finally:
            self.cross_attention.train(was_training)
        return merge_rescored(dist, top_index, top_dist, scores)

    @torch.no_grad()
    def rescore(self, query, gallery, top_index: Tensor) -> Tensor:
        """Fused distance ``(1 - lambda) (1 - cos(f_q, f_g)) + lambda (1 - s_CAN)`` of the
        pairs ``(query i, gallery top_index[i, j])``: ``(q, k)`` on ``top_index``'s device.

        Blocks of ``max(1, pair_chunk // k)`` queries: the gathered gallery maps of a block
        are converted to float32 on the model's device, so the extra memory is about
        ``pair_chunk * d * hw * 4`` bytes (x3 with the normalised copy and products)."""
        o = self.opts
        dev = top_index.device
        q, k = top_index.shape
        lam = float(o.fuse_weight)
        qmaps, gmaps = query.extras["can_map"], gallery.extras["can_map"]
        if qmaps.dim() != 4 or gmaps.shape[1:] != qmaps.shape[1:]:
            raise ValueError(
                f"can_reid: can_map must be (N, d, gh, gw) for query and gallery alike, got "
                f"{tuple(qmaps.shape)} and {tuple(gmaps.shape)}"
            )
        d, gh, gw = gmaps.shape[1:]
        g_pos = gmaps.view(len(gmaps), d, gh * gw).transpose(1, 2)  # a view, no copy
        qf, gf = query.feats, gallery.feats
        out = torch.empty(q, k, device=dev, dtype=torch.float32)
        step = max(1, o.pair_chunk // k)
        for s in range(0, q, step):
            idx = top_index[s : s + step]
            flat = idx.reshape(-1)
            # gathered position-major (the transpose rides on the gather), so the float32
            # conversion inside the scoring is a plain pass
            g_blk = g_pos.index_select(0, flat.to(g_pos.device)).to(dev)  # (n k, hw, d)
            g_blk = g_blk.transpose(1, 2).view(idx.shape[0], k, d, gh, gw)
            q_blk = qmaps[s : s + step].to(dev)
            if o.rescore_attention:
                s_can = cross_attention_similarity(self.cross_attention, q_blk, g_blk)
            else:
                s_can = F.cosine_similarity(
                    q_blk.float().mean((-2, -1)).unsqueeze(1), g_blk.float().mean((-2, -1)), dim=-1
                )
            # cosine of the vectors, normalising only the gathered rows
            g_vec = gf.index_select(0, flat.to(gf.device)).to(dev).float()
            g_vec = F.normalize(g_vec, dim=1).view(idx.shape[0], k, -1)
            q_vec = F.normalize(qf[s : s + step].to(dev).float(), dim=1)
            s_vec = (q_vec.unsqueeze(1) * g_vec).sum(-1)
            out[s : s + step] = (1.0 - lam) * (1.0 - s_vec) + lam * (1.0 - s_can)
        return out

    @torch.no_grad()
    def report_views(self, images: Tensor) -> list[ReportView]:
        """The ranking report's CAN views for one row: ``images[0]`` the query, ``images[1:]``
        its ranked gallery items (normalised ``(1 + k, 3, H, W)``).

        - ``can_pair``: each gallery cell shows the query attending given that item
          (``A^p``) next to the item attending given the query (``A^q``); the query cell
          shows its mean ``A^p`` over the row.
        - ``can_gallery``: ``A^q`` on each gallery item only.

        Heat is the softmax part of the attention (``A - 1`` with the residual), on one
        colour scale per row (0 to the row's maximum)."""
        was_training = self.training
        self.eval()
        try:
            maps = self.can_embed(self.extract(images)).float()  # (1 + k, d, gh, gw)
        finally:
            self.train(was_training)
        if maps.shape[0] < 2:
            return []
        _, ap, aq = cross_attention_similarity(
            self.cross_attention, maps[:1], maps[1:].unsqueeze(0), return_attention=True
        )
        ap, aq = ap[0], aq[0]  # (k, gh, gw)
        if self.opts.residual:
            ap, aq = ap - 1.0, aq - 1.0
        vmax = float(torch.maximum(ap.max(), aq.max()))
        heat = torch.cat([ap.mean(0, keepdim=True), aq])  # (1 + k, gh, gw)
        partner = torch.cat([ap.mean(0, keepdim=True), ap])
        return [
            ReportView(
                "can_pair",
                "CAN: query | item (A^p | A^q)",
                heat.cpu(),
                partner_heat=partner.cpu(),
                vmin=0.0,
                vmax=vmax,
            ),
            ReportView(
                "can_gallery", "CAN: item given query (A^q)", heat.cpu(), vmin=0.0, vmax=vmax
            ),
        ]

    def _device(self) -> torch.device:
        return next(self.parameters()).device
