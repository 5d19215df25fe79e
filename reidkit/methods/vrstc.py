"""VRSTC (Hou et al., CVPR 2019): occlusion-free video re-ID, the building blocks.

1. **Locate occlusion.** A re-ID network trained on the tracklets gives per-region
   features (each frame cut into ``R`` horizontal regions, 3 by default); a region's score
   is the cosine similarity between its feature and the tracklet's mean feature of the
   same region (:func:`occlusion_scores`); a score below ``tau = 0.89`` marks the region
   occluded (:func:`detect_occluded`). Frames with no occluded region are "unoccluded".
2. **Complete it.** STCnet (:mod:`reidkit.models.stcnet`) fills the occluded regions
   from the frame itself and the previous / next unoccluded frames
   (:func:`adjacent_unoccluded`), through :func:`temporal_attention`. Training is
   self-supervised: regions of unoccluded frames are masked at random
   (:func:`random_region_masks`).

Regions are a *partition* of the rows: region ``i`` of ``R`` over ``S`` rows covers rows
``floor(i * S / R) .. floor((i + 1) * S / R) - 1`` (:func:`region_bounds`), both on the
feature map (:func:`region_pool`) and on the pixels (:func:`region_pixel_masks`), so a
region flagged on features maps to the same part of the frame.

The method class (registration, options, ``train_step``) comes with the method issue;
choices are listed in ``docs/vrstc.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reidkit.models.stcnet import temporal_attention

__all__ = [
    "DEFAULT_TAU",
    "adjacent_unoccluded",
    "detect_occluded",
    "occlusion_scores",
    "occlusion_scores_batched",
    "random_region_masks",
    "region_bounds",
    "region_pixel_masks",
    "region_pool",
    "regions_to_mask",
    "temporal_attention",
]

DEFAULT_TAU = 0.89  # the paper's threshold on the region score


# ----------------------------------------------------------------------------- regions
def region_bounds(size: int, num_regions: int) -> list[tuple[int, int]]:
    """Half-open row ranges ``[(start, stop), ...]`` of ``num_regions`` horizontal regions
    partitioning ``size`` rows (``start_i = floor(i * size / R)``)."""
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    if size < num_regions:
        raise ValueError(f"cannot cut {size} rows into {num_regions} non-empty regions")
    return [(i * size // num_regions, (i + 1) * size // num_regions) for i in range(num_regions)]


def _row_membership(size: int, num_regions: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(R, size)`` 0/1 matrix: row ``y`` belongs to region ``i``."""
    bounds = torch.tensor(region_bounds(size, num_regions), device=device)  # (R, 2)
    rows = torch.arange(size, device=device)
    inside = (rows[None] >= bounds[:, :1]) & (rows[None] < bounds[:, 1:])
    return inside.to(dtype)


def region_pixel_masks(
    height: int, width: int, num_regions: int = 3, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(R, H, W)`` float masks, 1 inside each horizontal region (they sum to 1)."""
    region_bounds(height, num_regions)  # validates
    member = _row_membership(height, num_regions, device)
    return member[:, :, None].expand(num_regions, height, width).contiguous()


def regions_to_mask(region_flags: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel mask of the flagged regions: ``(..., R)`` bool -> ``(..., 1, H, W)`` float
    (1 on the pixels of every flagged region)."""
    if region_flags.dim() < 1:
        raise ValueError("region_flags must be (..., R)")
    r = region_flags.shape[-1]
    region_bounds(height, r)
    member = _row_membership(height, r, region_flags.device)  # (R, H)
    rows = (region_flags.to(member.dtype) @ member).clamp(max=1)  # (..., H)
    return rows[..., None, :, None].expand(*rows.shape[:-1], 1, height, width).contiguous()


def region_pool(feature_map: torch.Tensor, num_regions: int = 3) -> torch.Tensor:
    """Average-pool a map into horizontal region features: ``(N, C, h, w) -> (N, R, C)``.

    Uses the partition of :func:`region_bounds` (not the overlapping bins of
    ``adaptive_avg_pool2d`` when ``h % R != 0``), so regions match the pixel masks.
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (N, C, h, w), got {tuple(feature_map.shape)}")
    h = feature_map.shape[2]
    region_bounds(h, num_regions)
    member = _row_membership(h, num_regions, feature_map.device, feature_map.dtype)
    weights = member / member.sum(dim=1, keepdim=True)  # (R, h) row averages
    return torch.einsum("nchw,rh->nrc", feature_map, weights) / feature_map.shape[3]


# ----------------------------------------------------------------------------- scoring
def occlusion_scores(region_feats: torch.Tensor) -> torch.Tensor:
    """Region scores of one tracklet: ``(T, R, D) -> (T, R)``.

    ``score[t, r] = cos(f_tr, mean_t' f_t'r)``: the cosine similarity of frame ``t``'s
    region-``r`` feature to the tracklet's mean feature of region ``r`` (the plain mean of
    the features, the frame itself included). A zero feature scores 0.
    """
    if region_feats.dim() != 3:
        raise ValueError(
            f"occlusion_scores: region_feats must be (T, R, D), got {tuple(region_feats.shape)}"
        )
    if region_feats.shape[0] == 0:
        raise ValueError("occlusion_scores: the tracklet has no frame")
    mean = region_feats.mean(dim=0, keepdim=True)  # (1, R, D)
    return F.cosine_similarity(region_feats, mean.expand_as(region_feats), dim=-1, eps=1e-12)


def occlusion_scores_batched(
    region_feats: torch.Tensor, frame_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`occlusion_scores` for a batch of padded tracklets.

    Args:
        region_feats: ``(B, T, R, D)``.
        frame_mask: ``(B, T)`` bool, True for real frames (a clip loader's ``clip_mask``);
            ``None``: all frames real. The mean runs over the real frames only.

    Returns:
        ``(B, T, R)`` scores; padded frames get NaN (no score; ``NaN < tau`` is False, so
        :func:`detect_occluded` never flags them). A tracklet without any real frame is
        refused.
    """
    if region_feats.dim() != 4:
        raise ValueError(
            "occlusion_scores_batched: region_feats must be (B, T, R, D), "
            f"got {tuple(region_feats.shape)}"
        )
    b, t = region_feats.shape[:2]
    if frame_mask is None:
        frame_mask = torch.ones(b, t, dtype=torch.bool, device=region_feats.device)
    if frame_mask.shape != (b, t):
        raise ValueError(f"frame_mask must be (B, T) = {(b, t)}, got {tuple(frame_mask.shape)}")
    frame_mask = frame_mask.bool()
    counts = frame_mask.sum(dim=1)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"occlusion_scores_batched: tracklets {bad} have no real frame")
    w = frame_mask.to(region_feats.dtype)[:, :, None, None]
    mean = (region_feats * w).sum(dim=1, keepdim=True) / counts.to(region_feats.dtype)[
        :, None, None, None
    ]
    scores = F.cosine_similarity(region_feats, mean.expand_as(region_feats), dim=-1, eps=1e-12)
    return scores.masked_fill(~frame_mask[:, :, None], float("nan"))


def detect_occluded(scores: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Occluded regions: ``scores < tau`` (bool, same shape; NaN scores are never occluded).
    A frame is unoccluded when none of its regions is: ``~detect_occluded(s).any(-1)``."""
    return scores < tau


def adjacent_unoccluded(unoccluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous and next unoccluded frame of every frame: ``(..., T)`` bool -> two
    ``(..., T)`` long index tensors.

    ``prev[t]`` is the last unoccluded frame before ``t``, ``next[t]`` the first after it
    (never ``t`` itself). At the ends of a tracklet the missing side falls back to the
    other one (so both point to the same frame); ``-1`` when the tracklet has no other
    unoccluded frame.
    """
    if unoccluded.dim() < 1:
        raise ValueError("unoccluded must be (..., T)")
    unoccluded = unoccluded.bool()
    t = unoccluded.shape[-1]
    idx = torch.arange(t, device=unoccluded.device).expand_as(unoccluded)
    last_upto = torch.where(unoccluded, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    prev = torch.cat([torch.full_like(idx[..., :1], -1), last_upto[..., :-1]], dim=-1)
    rev = torch.where(unoccluded, t - 1 - idx, torch.full_like(idx, -1)).flip(-1)
    first_from = (t - 1 - rev.cummax(dim=-1).values).flip(-1)  # t where none -> >= t
    first_from = torch.where(first_from >= t, torch.full_like(first_from, -1), first_from)
    nxt = torch.cat([first_from[..., 1:], torch.full_like(idx[..., :1], -1)], dim=-1)
    prev_f = torch.where(prev < 0, nxt, prev)
    next_f = torch.where(nxt < 0, prev, nxt)
    return prev_f, next_f


# ----------------------------------------------------------------------------- masks
def random_region_masks(
    num: int,
    height: int,
    width: int,
    num_regions: int = 3,
    max_masked: int = 1,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-shaped random masks for STCnet's self-supervised training.

    Each of ``num`` frames gets ``k ~ U{1..max_masked}`` distinct regions (of
    ``num_regions`` horizontal regions) masked, the shape the detector produces.

    Args:
        generator: a ``torch.Generator`` (CPU) or an int seed; the same seed gives the
            same masks on every device.

    Returns:
        ``(masks (num, 1, H, W) float, flags (num, R) bool)``.
    """
    if not 1 <= max_masked <= num_regions:
        raise ValueError(f"max_masked must be in 1..num_regions={num_regions}, got {max_masked}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    k = torch.randint(1, max_masked + 1, (num,), generator=generator)
    # The k smallest of R random keys are a uniform random k-subset.
    keys = torch.rand(num, num_regions, generator=generator)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    flags = (ranks < k[:, None]).to(device)
    return regions_to_mask(flags, height, width), flags
