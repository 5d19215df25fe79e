"""VRSTC (Hou et al., CVPR 2019): occlusion-free video re-ID.

1. **Locate occlusion.** A re-ID network trained on the tracklets gives per-region
   features (each frame cut into ``R`` horizontal regions, 3 by default); a region's score
   is the cosine similarity between its feature and the tracklet's mean feature of the
   same region (:func:`occlusion_scores`); a score below ``tau = 0.89`` marks the region
   occluded (:func:`detect_occluded`). Frames with no occluded region are "unoccluded".
2. **Complete it.** STCnet (:mod:`reidkit.models.stcnet`) fills the occluded regions
   from the frame itself and the previous / next unoccluded frames
   (:func:`adjacent_unoccluded`), through :func:`temporal_attention`. Training is
   self-supervised: regions of unoccluded frames are masked at random
   (:func:`random_region_masks`). :class:`STCNetMethod` (``model.name: stcnet``) trains it
   on the method contract: a discriminator step, then a generator step, with their own
   optimisers (``"d"``, ``"g"``), L1 + adversarial (global, local) + ID-guider losses.
3. **Re-identify** on the completed copy of the dataset (``reidkit vrstc complete``,
   :mod:`reidkit.analysis.vrstc`).

Regions are a *partition* of the rows: region ``i`` of ``R`` over ``S`` rows covers rows
``floor(i * S / R) .. floor((i + 1) * S / R) - 1`` (:func:`region_bounds`), both on the
feature map (:func:`region_pool`) and on the pixels (:func:`region_pixel_masks`), so a
region flagged on features maps to the same part of the frame.

STCnet works on frames in ``[-1, 1]``; the loaders give ImageNet-normalised frames:
:func:`to_gan_range` / :func:`from_gan_range` map between the two. Choices where the paper
stops are options of :class:`STCNetOptions`, listed in ``docs/vrstc.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from reidkit.config import Config
from reidkit.methods.base import (
    Batch,
    EvalExtras,
    MethodOptions,
    ReIDMethod,
    Role,
    method_options,
    register_method,
)
from reidkit.models.stcnet import STCNet, temporal_attention

if TYPE_CHECKING:  # pragma: no cover
    from reidkit.engine.optim import OptimizerSpec
    from reidkit.engine.step import StepContext

__all__ = [
    "DEFAULT_TAU",
    "Detections",
    "ReIDNetwork",
    "STCNetMethod",
    "STCNetOptions",
    "adjacent_unoccluded",
    "clip_references",
    "detect_occluded",
    "from_gan_range",
    "gan_losses",
    "load_reid_network",
    "masked_l1",
    "occlusion_scores",
    "occlusion_scores_batched",
    "random_region_masks",
    "region_bounds",
    "region_errors",
    "region_pixel_masks",
    "region_pool",
    "regions_to_mask",
    "resolve_tau",
    "robust_tau",
    "select_targets",
    "temporal_attention",
    "to_gan_range",
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


def region_pool(
    feature_map: torch.Tensor, num_regions: int = 3, image_height: int | None = None
) -> torch.Tensor:
    """Average-pool a map into horizontal region features: ``(N, C, h, w) -> (N, R, C)``.

    Default: the partition of :func:`region_bounds` of the ``h`` map rows (not the
    overlapping bins of ``adaptive_avg_pool2d`` when ``h % R != 0``).

    ``image_height=H``: pixel-aligned pooling. Map row ``y`` covers the pixel rows
    ``[y H / h, (y + 1) H / h)``; region ``r`` is the pixel region of :func:`region_bounds`
    ``(H, R)`` (the rows :func:`region_pixel_masks` and the completion use), and each map row
    weighs by the share of the region it covers. With a coarse map (4 rows at 64x32 input)
    the row partition would put pixel rows 32..63 in the last region where the pixel
    partition has 42..63; the aligned weights follow the pixels.
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (N, C, h, w), got {tuple(feature_map.shape)}")
    h = feature_map.shape[2]
    if image_height is None:
        region_bounds(h, num_regions)
        member = _row_membership(h, num_regions, feature_map.device, feature_map.dtype)
        weights = member / member.sum(dim=1, keepdim=True)  # (R, h) row averages
    else:
        weights = _aligned_row_weights(h, image_height, num_regions).to(
            device=feature_map.device, dtype=feature_map.dtype
        )
    return torch.einsum("nchw,rh->nrc", feature_map, weights) / feature_map.shape[3]


def _aligned_row_weights(rows: int, image_height: int, num_regions: int) -> torch.Tensor:
    """``(R, rows)``: the share of pixel region ``r`` covered by map row ``y``."""
    bounds = torch.tensor(region_bounds(image_height, num_regions), dtype=torch.float64)
    y = torch.arange(rows, dtype=torch.float64)
    lo, hi = y * image_height / rows, (y + 1) * image_height / rows  # (rows,)
    overlap = (
        torch.minimum(hi[None], bounds[:, 1:]) - torch.maximum(lo[None], bounds[:, :1])
    ).clamp(min=0)
    return (overlap / (bounds[:, 1:] - bounds[:, :1])).float()


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


TauRule = Literal["fixed", "robust"]


def robust_tau(scores: torch.Tensor, k: float = 3.0) -> float:
    """A label-free threshold from the scores themselves: ``median - k * 1.4826 * MAD``
    (median absolute deviation, scaled to a standard deviation for normal data), i.e. a
    region is occluded when its score is a low outlier among all region scores. NaNs
    (padding) are ignored. For a re-ID network whose scores do not live where the paper's
    ``tau = 0.89`` does (a small network's cosines sit near 1)."""
    s = scores.detach().flatten().double()
    s = s[~torch.isnan(s)]
    if s.numel() == 0:
        raise ValueError("robust_tau: no score")
    med = s.median()
    mad = (s - med).abs().median()
    return float(med - k * 1.4826 * mad)


def resolve_tau(
    scores: torch.Tensor | Sequence[torch.Tensor],
    tau: float,
    rule: TauRule = "fixed",
    k: float = 3.0,
) -> float:
    """The threshold to apply: ``tau`` (``rule="fixed"``, the paper's) or
    :func:`robust_tau` of all ``scores`` (``"robust"``)."""
    if rule == "fixed":
        return float(tau)
    if rule != "robust":
        raise ValueError(f"tau rule must be 'fixed' or 'robust', got {rule!r}")
    if not isinstance(scores, torch.Tensor):
        scores = torch.cat([torch.as_tensor(x).flatten() for x in scores])
    return robust_tau(scores, k)


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


# ----------------------------------------------------------------------------- pixels
def _channel_stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return t.view(*([1] * (like.dim() - 3)), 3, 1, 1)


def to_gan_range(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], clamp: bool = True
) -> torch.Tensor:
    """ImageNet-normalised frames ``(..., 3, H, W)`` -> STCnet's ``[-1, 1]``:
    ``2 * (x * std + mean) - 1`` (clamped: erasing / jitter never leave the range)."""
    y = 2 * (x * _channel_stats(std, x) + _channel_stats(mean, x)) - 1
    return y.clamp(-1, 1) if clamp else y


def from_gan_range(y: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """STCnet's ``[-1, 1]`` frames ``(..., 3, H, W)`` -> ImageNet-normalised (the ID
    guider's and the re-ID network's input): ``((y + 1) / 2 - mean) / std``."""
    return ((y + 1) / 2 - _channel_stats(mean, y)) / _channel_stats(std, y)


# ----------------------------------------------------------------------------- targets
def clip_references(valid: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous / next reference position of every position of a batch of clips.

    Args:
        valid: ``(B, T)`` bool, True for real, unoccluded frames.
        frames: ``(B, T)`` frame index of each position in its tracklet (a clip drawn with
            replacement may show a frame twice: a position never references its own frame).

    Returns:
        ``(prev, next)`` ``(B, T)`` long: the nearest valid position before / after ``t``
        that shows another frame; a missing side falls back to the other one (as
        :func:`adjacent_unoccluded` does at a tracklet's ends); ``-1`` when there is none.
    """
    if valid.shape != frames.shape or valid.dim() != 2:
        raise ValueError(
            f"clip_references: valid {tuple(valid.shape)} and frames {tuple(frames.shape)} "
            "must both be (B, T)"
        )
    t = valid.shape[1]
    pos = torch.arange(t, device=valid.device)
    ok = valid.bool()[:, None, :] & (frames[:, None, :] != frames[:, :, None])  # (B, t, p)
    before = ok & (pos[None, None, :] < pos[None, :, None])
    after = ok & (pos[None, None, :] > pos[None, :, None])
    prev = torch.where(before, pos, -1).amax(dim=-1)
    nxt = torch.where(after, pos, t).amin(dim=-1)
    nxt = torch.where(nxt >= t, -1, nxt)
    return torch.where(prev < 0, nxt, prev), torch.where(nxt < 0, prev, nxt)


def select_targets(
    valid: torch.Tensor, frames: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training target per clip for STCnet's self-supervised step.

    A position can be the target when it is valid (real, unoccluded) and has a reference
    (:func:`clip_references`); the target is drawn uniformly among those (``generator``,
    CPU). Returns ``(target, prev, next, ok)``, each ``(B,)``: positions in the clip and
    ``ok`` False for clips without any possible target (their positions are 0 and the
    method gives them zero weight).
    """
    prev, nxt = clip_references(valid, frames)
    cand = valid.bool() & (prev >= 0)
    keys = torch.rand(valid.shape, generator=generator).to(valid.device)
    target = torch.where(cand, keys, -1.0).argmax(dim=1)
    ok = cand.any(dim=1)
    rows = torch.arange(valid.shape[0], device=valid.device)
    zero = torch.zeros_like(target)
    return (
        torch.where(ok, target, zero),
        torch.where(ok, prev[rows, target], zero),
        torch.where(ok, nxt[rows, target], zero),
        ok,
    )


# ----------------------------------------------------------------------------- losses
def masked_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    over: Literal["region", "frame"] = "region",
) -> torch.Tensor:
    """L1 reconstruction ``||target - pred||_1`` of a batch (``(B, C, H, W)``, mask
    ``(B, 1, H, W)``), inside the mask, averaged over the samples with ``weight > 0``.

    ``over="region"``: each sample's sum over the masked pixels divided by their number
    (``C * sum(M)``), so a small region weighs as much as a large one; ``"frame"``: divided by
    ``C * H * W`` (the plain norm of the paper's ``||x - x_k||_1`` per pixel).
    """
    diff = ((pred - target).abs() * mask).flatten(1).sum(1)
    if over == "region":
        denom = (mask.flatten(1).sum(1) * pred.shape[1]).clamp(min=1)
    elif over == "frame":
        denom = torch.full_like(diff, float(pred[0].numel()))
    else:
        raise ValueError(f"masked_l1: over must be 'region' or 'frame', got {over!r}")
    per = diff / denom
    return _weighted_mean(per, weight)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp(min=1)


GanLoss = Literal["vanilla", "hinge", "lsgan"]


def gan_losses(
    kind: GanLoss,
    real: torch.Tensor | None,
    fake: torch.Tensor,
    weight: torch.Tensor | None = None,
    for_discriminator: bool = True,
) -> torch.Tensor:
    """Adversarial losses on ``(B,)`` logits, averaged with ``weight``.

    - ``vanilla`` (non-saturating): D ``softplus(-real) + softplus(fake)``, G
      ``softplus(-fake)``;
    - ``hinge``: D ``relu(1 - real) + relu(1 + fake)``, G ``-fake``;
    - ``lsgan``: D ``((real - 1)^2 + fake^2) / 2``, G ``(fake - 1)^2 / 2``.
    """
    if kind == "vanilla":
        if for_discriminator:
            per = F.softplus(-real) + F.softplus(fake)
        else:
            per = F.softplus(-fake)
    elif kind == "hinge":
        per = F.relu(1 - real) + F.relu(1 + fake) if for_discriminator else -fake
    elif kind == "lsgan":
        per = (
            0.5 * ((real - 1).pow(2) + fake.pow(2))
            if for_discriminator
            else 0.5 * (fake - 1).pow(2)
        )
    else:
        raise ValueError(f"gan_loss must be 'vanilla', 'hinge' or 'lsgan', got {kind!r}")
    return _weighted_mean(per, weight)


def region_errors(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame L1 and PSNR inside a mask, on frames in ``[0, 1]``, reported on the
    0-255 scale: ``l1 = 255 * mean|pred - target|`` and ``psnr = 10 log10(1 / mse)`` over the
    masked pixels (all channels). ``(N, C, H, W)`` x2, mask ``(N, 1, H, W)`` -> two ``(N,)``
    (NaN for an empty mask; PSNR capped at 100 dB for an exact match)."""
    m = mask.expand_as(pred).to(pred.dtype)
    count = m.flatten(1).sum(1)
    diff = (pred - target) * m
    l1 = 255 * diff.abs().flatten(1).sum(1) / count
    mse = diff.pow(2).flatten(1).sum(1) / count
    psnr = (10 * torch.log10(1 / mse.clamp(min=1e-10))).clamp(max=100.0)
    nan = torch.full_like(l1, float("nan"))
    return torch.where(count > 0, l1, nan), torch.where(count > 0, psnr, nan)


# ----------------------------------------------------------------------------- re-ID net
class ReIDNetwork(NamedTuple):
    """A trained re-ID network loaded by :func:`load_reid_network`."""

    net: ReIDMethod
    cfg: Config
    num_classes: int
    path: Path


def load_reid_network(
    weights: str | os.PathLike, device: str | torch.device = "cpu"
) -> ReIDNetwork:
    """A trained re-ID network (the temporal baseline), its config and number of
    identities, from a reidkit checkpoint (``best.pt`` / ``last.pt`` of a run, or a run
    folder), loaded with ``weights_only=True``, frozen and in eval mode: VRSTC's occlusion
    scorer and ID guider.

    Raises:
        FileNotFoundError / ValueError naming the file (no embedded config, mismatched keys).
    """
    from reidkit.config import config_from_dict
    from reidkit.engine.checkpoint import extract_state_dict, load_checkpoint, resolve_weights
    from reidkit.methods.base import build_method

    path = resolve_weights(weights)
    obj = load_checkpoint(path)
    if not isinstance(obj.get("config"), dict) or not isinstance(obj.get("num_classes"), int):
        raise ValueError(
            f"{path}: not a reidkit training checkpoint (it needs the embedded 'config' and "
            "'num_classes' of the re-ID run: pass its checkpoints/best.pt or last.pt)"
        )
    cfg = config_from_dict(obj["config"], f"{path} (embedded config)")
    cfg.model.pretrained = None  # the weights replace any ImageNet initialisation
    net = build_method(cfg, obj["num_classes"])
    state = extract_state_dict(obj)
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match model '{cfg.model.name}': missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    for p in net.parameters():
        p.requires_grad_(False)
    return ReIDNetwork(net.to(device).eval(), cfg, int(obj["num_classes"]), path)


def reid_logits(net: ReIDMethod, frames: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Identity logits of a re-ID method for single frames ``(B, 3, H, W)`` (normalised
    for it): as one-frame clips for a clip method, as images otherwise."""
    b = frames.shape[0]
    if "clips" in net.requires:
        batch = {
            "clips": frames[:, None],
            "clip_mask": torch.ones(b, 1, dtype=torch.bool, device=frames.device),
        }
    else:
        batch = {"images": frames}
    batch.update(pids=pids, camids=torch.zeros_like(pids), index=torch.arange(b))
    out = net(batch)
    logits = out.get("logits") if isinstance(out, dict) else None
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"the ID guider ({type(net).__name__}) returns no 'logits' from forward(batch)"
        )
    return logits


# ----------------------------------------------------------------------------- detections
class Detections:
    """Occlusion detections of a dataset (the ``scores.json`` of ``reidkit vrstc detect``)
    as a frame lookup: ``occluded(path)`` is True when a region of the frame scored below
    the threshold: ``tau`` with ``rule="fixed"`` (the file's own when ``tau`` is None), or
    :func:`robust_tau` of all the file's scores with ``rule="robust"``. Frames are matched
    by their path relative to the dataset folder, so the lookup works wherever the dataset
    is mounted."""

    def __init__(
        self,
        path: str | os.PathLike,
        tau: float | None = None,
        rule: TauRule = "fixed",
        k: float = 3.0,
    ) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
            tracklets = data["tracklets"]
            file_tau = float(data["tau"])
        except FileNotFoundError:
            raise FileNotFoundError(f"detections file not found: {self.path}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{self.path}: not a detections file of `reidkit vrstc detect` (expected "
                f"'tau' and 'tracklets'): {exc}"
            ) from None
        rows: dict[str, list[float]] = {}
        for split, items in tracklets.items():
            for i, item in enumerate(items):
                frames, scores = item.get("frames"), item.get("scores")
                if (
                    not isinstance(frames, list)
                    or not isinstance(scores, list)
                    or len(frames) != len(scores)
                ):
                    raise ValueError(
                        f"{self.path}: tracklets.{split}[{i}] needs 'frames' and 'scores' of "
                        "the same length"
                    )
                rows.update(zip(frames, scores))
        values = torch.tensor(
            [float("nan") if v is None else float(v) for row in rows.values() for v in row]
        )
        self.tau = resolve_tau(values, file_tau if tau is None else tau, rule, k)
        self.flags: dict[str, bool] = {
            frame: any(v is not None and v < self.tau for v in row) for frame, row in rows.items()
        }
        self.depths = sorted({f.count("/") + 1 for f in self.flags})
        self.misses = 0

    def __len__(self) -> int:
        return len(self.flags)

    def occluded(self, path: str) -> bool | None:
        """True / False for a frame of the file, ``None`` for an unknown frame."""
        parts = Path(path).parts
        for d in self.depths:
            key = "/".join(parts[-d:])
            if key in self.flags:
                return self.flags[key]
        self.misses += 1
        return None


# ----------------------------------------------------------------------------- the method
class STCNetOptions(MethodOptions):
    """``model.stcnet``: STCnet's architecture, losses and data (see ``docs/vrstc.md``)."""

    # architecture (reidkit.models.stcnet.STCNet)
    width: int = Field(32, ge=2)  # generator base width (paper size: 32)
    disc_width: int = Field(64, ge=1)
    disc_layers: int = Field(4, ge=1)
    dilations: tuple[int, ...] = (2, 4, 8, 16)
    combine: Literal["concat", "mean", "joint"] = "concat"
    share_adjacent_encoder: bool = False
    attention_patch: int = Field(3, ge=1)
    attention_scale: float = Field(10.0, gt=0)
    checkpoint_attention: bool = False
    local_region: Literal["masked", "crop"] = "masked"
    spectral_norm: bool = False
    # occlusion regions: detection threshold and the shape of the training masks
    num_regions: int = Field(3, ge=1)
    tau: float = 0.89
    # "fixed": tau as given (the paper's 0.89); "robust": median - tau_mad * MAD of all
    # region scores of the dataset (label-free; for networks whose scores sit elsewhere)
    tau_rule: Literal["fixed", "robust"] = "fixed"
    tau_mad: float = Field(3.0, gt=0)
    max_masked: int = Field(1, ge=1)  # regions masked per training frame: U{1..max_masked}
    # losses (weights: not published; docs/vrstc.md)
    l1_x1: float = Field(1.0, ge=0)
    l1_x2: float = Field(1.0, ge=0)
    l1_over: Literal["region", "frame"] = "region"
    adv_global: float = Field(0.001, ge=0)
    adv_local: float = Field(0.001, ge=0)
    gan_loss: Literal["vanilla", "hinge", "lsgan"] = "vanilla"
    adv_target: Literal["x2", "both"] = "x2"  # completions the discriminators judge
    id_weight: float = Field(0.1, ge=0)  # ID guider CE on the completed frame
    id_target: Literal["x2", "both"] = "x2"
    detach_x1: bool = False  # stop x2's gradient at x1 (train G_s by its own loss only)
    # the trained re-ID network: occlusion scoring and the ID guider
    reid_weights: str | None = None
    # occlusion detections of the training set (`reidkit vrstc detect`): occluded frames
    # are never targets or references; None: every frame counts as unoccluded
    detections: str | None = None
    # optimisation: Adam per network; the lr follows the solver's schedule shape
    g_lr: float = Field(1e-4, gt=0)
    d_lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)
    # validation (evaluation): self-supervised completion of held-out tracklets
    val_tracklets: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> STCNetOptions:
        if self.max_masked > self.num_regions:
            raise ValueError(
                f"max_masked ({self.max_masked}) must be <= num_regions ({self.num_regions})"
            )
        if self.attention_patch % 2 == 0:
            raise ValueError(f"attention_patch must be odd, got {self.attention_patch}")
        return self


_STCNET_PRESETS = {
    # consecutive frames: the references of a target are its neighbours in the clip
    # (data.clip_stride sets their distance); no erasing or padding: they would be
    # reconstruction targets
    "data": {
        "seq_len": 5,
        "clip_sampling": "tkp",
        "clip_stride": 1,
        "sampler": "random",
        "random_erasing_p": 0.0,
        "pad": 0,
    },
    "solver": {"scheduler": "constant", "warmup_epochs": 0, "weight_decay": 0.0},
    "loss": {"metric": "none"},
}


@register_method("stcnet", options=STCNetOptions, section="stcnet", presets=_STCNET_PRESETS)
class STCNetMethod(ReIDMethod):
    """VRSTC's spatial-temporal completion network (D step then G step; not a re-ID model).

    Training batches are clips (``data.seq_len`` consecutive frames, see the presets): one
    unoccluded target frame per clip (:func:`select_targets`; occluded frames come from
    ``model.stcnet.detections``), its previous / next unoccluded frames in the clip, and a
    random region mask (:func:`random_region_masks`, seeded by ``(seed, global step,
    rank)``). The frozen ID guider (``reid_weights``) is held outside the module tree: it is
    neither in the state dict nor in :meth:`parameters`, and stays in eval mode.

    Evaluation (``evaluates_reid = False``): completion of random regions of held-out
    (query / gallery) tracklets, L1 / PSNR of ``x1`` and ``x2`` (``best_metric``:
    ``psnr_x2``).
    """

    requires: ClassVar[frozenset[str]] = frozenset({"clips"})
    eval_requires: ClassVar[frozenset[str]] = frozenset()
    exportable: ClassVar[bool] = False
    evaluates_reid: ClassVar[bool] = False
    best_metric: ClassVar[str] = "psnr_x2"

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        o = method_options(cfg, STCNetOptions, "stcnet")
        self.opts = o
        self.cfg = cfg
        self.num_classes = num_classes
        h, w = cfg.data.height, cfg.data.width
        if h % 4 or w % 4 or h < o.num_regions:
            raise ValueError(
                f"stcnet: data.height x data.width = {h}x{w} must be divisible by 4 (two "
                f"stride-2 stages) with at least num_regions={o.num_regions} rows"
            )
        self.stcnet = STCNet(
            width=o.width,
            disc_width=o.disc_width,
            dilations=o.dilations,
            patch=o.attention_patch,
            scale=o.attention_scale,
            combine=o.combine,
            share_adjacent_encoder=o.share_adjacent_encoder,
            disc_layers=o.disc_layers,
            local_region=o.local_region,
            spectral_norm=o.spectral_norm,
            checkpoint_attention=o.checkpoint_attention,
        )
        self.mean = tuple(cfg.data.mean)
        self.std = tuple(cfg.data.std)
        self.seed = int(cfg.seed)
        # held in a list: not a submodule (no state dict entry, never trained, eval mode);
        # loaded on first use (the first training step), so a config builds without the file
        self._guider: list[ReIDNetwork] = []
        if o.id_weight > 0 and not o.reid_weights:
            raise ValueError(
                "model.stcnet.reid_weights is not set: the ID guider needs the trained "
                "re-ID network (the temporal baseline's checkpoint); or set "
                "model.stcnet.id_weight=0"
            )
        self._detections: Detections | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def guider(self) -> ReIDMethod | None:
        """The frozen ID guider (loaded from ``reid_weights`` on first access, on the
        method's device); ``None`` when ``id_weight`` is 0."""
        o = self.opts
        if not self._guider and o.id_weight > 0 and o.reid_weights:
            device = next(self.parameters()).device
            guider = load_reid_network(o.reid_weights, device)
            if self.num_classes and guider.num_classes != self.num_classes:
                raise ValueError(
                    f"model.stcnet.reid_weights={o.reid_weights}: the re-ID network has "
                    f"{guider.num_classes} identities, the STCnet training set "
                    f"{self.num_classes}: train both on the same dataset"
                )
            self._guider.append(guider)
        return self._guider[0].net if self._guider else None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module API
        super()._apply(fn, recurse)
        if self._guider:  # .to(device) / .half() reach the frozen guider too
            self._guider[0].net._apply(fn)
        return self

    @property
    def detections(self) -> Detections | None:
        if self._detections is None and self.opts.detections:
            o = self.opts
            self._detections = Detections(o.detections, o.tau, o.tau_rule, o.tau_mad)
        return self._detections

    def unoccluded(self, batch: Batch) -> torch.Tensor:
        """``(B, T)`` bool: real frames the detections do not flag (all real frames when
        no detections file is configured; frames missing from the file count as occluded)."""
        mask = batch["clip_mask"].bool()
        det = self.detections
        if det is None:
            return mask
        flags = torch.zeros_like(mask)
        for b, paths in enumerate(batch["paths"]):
            real = torch.nonzero(mask[b]).flatten().tolist()
            for pos, path in zip(real, paths):
                flags[b, pos] = det.occluded(str(path)) is False
        if det.misses and not bool(flags.any()):
            raise ValueError(
                f"model.stcnet.detections={det.path}: none of the batch's frames is in the "
                f"file (e.g. {batch['paths'][0][0]}); was it written for this dataset?"
            )
        return flags

    def prepare_inputs(self, batch: Batch, seed: int) -> dict[str, torch.Tensor]:
        """Target / reference frames in ``[-1, 1]``, region masks and sample weights of a
        clip batch: ``x, x_prev, x_next (B, 3, H, W)``, ``mask (B, 1, H, W)``, ``regions
        (B, R)``, ``weight (B,)`` (0 for clips without a usable target), ``pids (B,)``."""
        clips = batch["clips"]
        if clips.dim() != 5:
            raise ValueError(f"stcnet needs clip batches (B, T, 3, H, W), got {tuple(clips.shape)}")
        b, t, _, h, w = clips.shape
        frames = batch.get("frames")
        if frames is None:
            frames = torch.arange(t, device=clips.device).expand(b, t)
        gen = torch.Generator().manual_seed(seed)
        target, prev, nxt, ok = select_targets(self.unoccluded(batch), frames.to(clips.device), gen)
        rows = torch.arange(b, device=clips.device)
        mask, regions = random_region_masks(
            b, h, w, self.opts.num_regions, self.opts.max_masked, gen, device=clips.device
        )
        pick = lambda pos: to_gan_range(clips[rows, pos], self.mean, self.std)  # noqa: E731
        return {
            "x": pick(target),
            "x_prev": pick(prev),
            "x_next": pick(nxt),
            "mask": mask.to(clips.dtype),
            "regions": regions,
            "weight": ok.to(clips.dtype),
            "pids": batch["pids"],
        }

    def _step_seed(self, step: int) -> int:
        from reidkit.data.loader import sample_seed

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return sample_seed(self.seed, step, rank)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Inputs (:meth:`prepare_inputs`, seeded by ``batch["seed"]`` or ``seed``) and the
        completions ``x1``, ``x2`` (``[-1, 1]``)."""
        inputs = self.prepare_inputs(batch, int(batch.get("seed", self.seed)))
        x1, x2 = self.stcnet(
            inputs["x"], inputs["mask"], inputs["x_prev"], inputs["x_next"], self.opts.detach_x1
        )
        return {**inputs, "x1": x1, "x2": x2}

    def _fakes(self, outputs: dict[str, torch.Tensor], key: str) -> list[torch.Tensor]:
        return [outputs["x2"]] if key == "x2" else [outputs["x1"], outputs["x2"]]

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """The generator's weighted terms: ``l1_x1``, ``l1_x2`` (inside the mask), and,
        when their weights are > 0, ``adv_global``, ``adv_local`` (through the current
        discriminators) and ``id`` (the ID guider's CE on the completion)."""
        o = self.opts
        x, m, wt = outputs["x"], outputs["mask"], outputs["weight"]
        terms: dict[str, torch.Tensor] = {}
        if o.l1_x1 > 0:
            terms["l1_x1"] = o.l1_x1 * masked_l1(outputs["x1"], x, m, wt, o.l1_over)
        if o.l1_x2 > 0:
            terms["l1_x2"] = o.l1_x2 * masked_l1(outputs["x2"], x, m, wt, o.l1_over)
        fakes = self._fakes(outputs, o.adv_target)
        n = len(fakes)
        if o.adv_global > 0:
            logit = self.stcnet.global_disc(torch.cat(fakes))
            terms["adv_global"] = o.adv_global * gan_losses(
                o.gan_loss, None, logit, wt.repeat(n), for_discriminator=False
            )
        if o.adv_local > 0:
            logit = self.stcnet.local_disc(torch.cat(fakes), m.repeat(n, 1, 1, 1))
            terms["adv_local"] = o.adv_local * gan_losses(
                o.gan_loss, None, logit, wt.repeat(n), for_discriminator=False
            )
        if o.id_weight > 0 and self.guider is not None:
            terms["id"] = o.id_weight * self.id_loss(
                self._fakes(outputs, o.id_target), outputs["pids"], wt
            )
        if not terms:
            raise ValueError("model.stcnet: every generator loss weight is 0")
        return terms

    def id_loss(
        self, completions: list[torch.Tensor], pids: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """The ID guider's CE on completed frames (``[-1, 1]``), mapped to its input size
        and normalisation; gradients reach the frames, never the frozen guider."""
        net = self.guider
        assert net is not None
        net_cfg = self._guider[0].cfg
        x = torch.cat(completions)
        size = (net_cfg.data.height, net_cfg.data.width)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = from_gan_range(x, net_cfg.data.mean, net_cfg.data.std)
        logits = reid_logits(net, x, pids.repeat(len(completions)))
        ce = F.cross_entropy(logits.float(), pids.repeat(len(completions)), reduction="none")
        return _weighted_mean(ce, weight.repeat(len(completions)))

    def discriminator_loss(
        self, outputs: dict[str, torch.Tensor], ctx: Any = None
    ) -> dict[str, torch.Tensor]:
        """The discriminators' terms ``d_global`` / ``d_local`` on the real target and the
        (detached) completions, each network called once (DDP-safe)."""
        o = self.opts
        x, m, wt = outputs["x"], outputs["mask"], outputs["weight"]
        fakes = [f.detach() for f in self._fakes(outputs, o.adv_target)]
        n = len(fakes)
        b = x.shape[0]
        both = torch.cat([x, *fakes])
        wrap = (lambda mod: ctx.wrap(mod)) if ctx is not None else (lambda mod: mod)
        autocast = ctx.autocast() if ctx is not None else contextlib.nullcontext()
        terms = {}
        with autocast:
            logit_g = wrap(self.stcnet.global_disc)(both) if o.adv_global > 0 else None
            logit_l = (
                wrap(self.stcnet.local_disc)(both, m.repeat(n + 1, 1, 1, 1))
                if o.adv_local > 0
                else None
            )
        for name, logit in (("d_global", logit_g), ("d_local", logit_l)):
            if logit is None:
                continue
            logit = logit.float()
            real, fake = logit[:b], logit[b:]
            terms[name] = gan_losses(
                o.gan_loss, real.repeat(n), fake, wt.repeat(n), for_discriminator=True
            )
        return terms

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """Generators forward (once), discriminator step (``"d"``), generator step
        (``"g"``, the discriminators frozen). Sub-networks go through ``ctx.wrap`` (DDP,
        compile) and ``ctx.autocast`` (AMP)."""
        from reidkit.engine.step import cast_float

        o = self.opts
        inputs = self.prepare_inputs(batch, self._step_seed(ctx.global_step))
        spatial, temporal = ctx.wrap(self.stcnet.spatial), ctx.wrap(self.stcnet.temporal)
        with ctx.autocast():
            x1 = spatial(inputs["x"], inputs["mask"])
            x2 = temporal(
                x1.detach() if o.detach_x1 else x1,
                inputs["mask"],
                inputs["x_prev"],
                inputs["x_next"],
                frame=inputs["x"],
            )
        outputs = {**inputs, **cast_float({"x1": x1, "x2": x2})}
        if o.adv_global > 0 or o.adv_local > 0:
            ctx.step(self.discriminator_loss(outputs, ctx), optimizers=["d"])
        with _frozen(self.stcnet.discriminator_parameters()), ctx.autocast():
            g_terms = cast_float(self.compute_loss(outputs, batch))
        with torch.no_grad():
            _, psnr = region_errors(
                (outputs["x2"].detach() + 1) / 2, (outputs["x"] + 1) / 2, outputs["mask"]
            )
            keep = outputs["weight"] > 0
            psnr_x2 = psnr[keep].mean() if bool(keep.any()) else torch.tensor(float("nan"))
        ctx.step(g_terms, optimizers=["g"], extras={"psnr_x2": psnr_x2})
        return ctx.stats

    def optimizers(self, cfg: Config) -> dict[str, OptimizerSpec]:
        """``"g"`` (both generators) and ``"d"`` (both discriminators): Adam at ``g_lr`` /
        ``d_lr`` with ``betas``, no weight decay unless ``solver.weight_decay`` says so; the
        lr follows the solver's schedule shape (warm-up, milestones, cosine) scaled to
        each base lr. Neither is a default optimiser: :meth:`train_step` steps them."""
        from reidkit.engine.optim import OptimizerSpec, lr_at

        o = self.opts

        def spec(params: Iterator[nn.Parameter], lr: float) -> OptimizerSpec:
            opt = torch.optim.Adam(
                [p for p in params if p.requires_grad],
                lr=lr,
                betas=o.betas,
                weight_decay=cfg.solver.weight_decay,
            )
            return OptimizerSpec(
                opt, functools.partial(_scaled_lr, cfg.solver, lr, lr_at), default=False
            )

        return {
            "g": spec(self.stcnet.generator_parameters(), o.g_lr),
            "d": spec(self.stcnet.discriminator_parameters(), o.d_lr),
        }

    # ------------------------------------------------------------------ evaluation
    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, torch.Tensor]:
        raise NotImplementedError(
            "stcnet is a completion network, not a re-ID model: use `reidkit vrstc complete` "
            "to write the completed dataset, then train / evaluate the re-ID network on it"
        )

    @torch.no_grad()
    def complete(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        x_prev: torch.Tensor | None,
        x_next: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x1, x2)`` for frames in ``[-1, 1]``; without references (a tracklet with no
        unoccluded frame) ``x2 = x1``."""
        x1 = self.stcnet.spatial(x, mask)
        if x_prev is None or x_next is None:
            return x1, x1
        x2 = self.stcnet.temporal(x1, mask, x_prev, x_next, frame=x)
        return x1, x2

    @torch.no_grad()
    def eval_extras(self, cfg: Config, dataset: Any, device: torch.device) -> EvalExtras:
        """Self-supervised completion of held-out tracklets (query + gallery, up to
        ``val_tracklets`` of them, evenly spaced): one target frame per tracklet, a random
        region mask (seeded by ``seed``), L1 / PSNR (0-255 scale, inside the mask) of
        ``x1``, ``x2`` and of copying the region from the nearest reference frame."""
        from reidkit.data.clips import ClipOptions, build_clip_test_loader, clip_options_from_config

        records = [r for r in [*dataset.query, *dataset.gallery] if len(r) >= 2]
        if not records:
            raise ValueError("stcnet evaluation: no held-out tracklet with 2 or more frames")
        n = min(self.opts.val_tracklets, len(records))
        picked = [records[(i * len(records)) // n] for i in range(n)]
        base = clip_options_from_config(cfg.data)
        clip = ClipOptions(
            seq_len=base.seq_len,
            sampling=base.sampling,
            stride=base.stride,
            short=base.short,
            test_sampling="tkp",
            test_seq_len=base.seq_len,
        )
        loader = build_clip_test_loader(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0})}),
            picked,
            clip,
        )
        was = self.training
        self.eval()
        sums: dict[str, list[torch.Tensor]] = {}
        try:
            for i, batch in enumerate(loader):
                batch = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                }
                inp = self.prepare_inputs(batch, self.seed + 7919 * i)
                x1, x2 = self.complete(inp["x"], inp["mask"], inp["x_prev"], inp["x_next"])
                keep = inp["weight"] > 0
                truth = (inp["x"] + 1) / 2
                for name, pred in (
                    ("x1", x1),
                    ("x2", x2),
                    ("copy", _paste(inp["x_prev"], inp["x"], inp["mask"])),
                ):
                    l1, psnr = region_errors((pred + 1) / 2, truth, inp["mask"])
                    sums.setdefault(f"l1_{name}", []).append(l1[keep].cpu())
                    sums.setdefault(f"psnr_{name}", []).append(psnr[keep].cpu())
        finally:
            self.train(was)
        metrics = {k: float(torch.cat(v).mean()) for k, v in sums.items()}
        count = int(torch.cat(sums["l1_x2"]).numel())
        notes = [
            f"stcnet validation: {count} held-out frames, random region masks: "
            + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items())
        ]
        return EvalExtras(metrics=metrics, notes=notes)


def _paste(source: torch.Tensor, frame: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask * source + (1 - mask) * frame


def _scaled_lr(solver: Any, base_lr: float, lr_at: Any, epoch: float) -> float:
    """The solver's schedule shape (``lr_at(solver, e) / solver.lr``) scaled to ``base_lr``."""
    return base_lr * lr_at(solver, epoch) / solver.lr


@contextlib.contextmanager
def _frozen(params: Iterator[nn.Parameter]) -> Iterator[None]:
    """Parameters without gradient inside the block (the discriminators during the
    generator step: their gradients would be computed for nothing)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
