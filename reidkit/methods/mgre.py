"""MGRe: multi-granularity features from multi-granularity regions (Yang et al.,
Neurocomputing 2021), ``model.name: mgre`` (:class:`MGRe`, options :class:`MGReOptions`).

Architecture (Fig. 2-3 of the paper)::

    image -> stem -> layer1 -> L1 ─┐        layer4 output L4 ─> 1x1 conv + BN ─> bilinear up
                  -> layer2 -> L2 ─┤ (+ semantic guidance from L4 on L1 and L2)
                  -> layer3 -> L3  │
                  -> layer4 -> L4  │
    stage s = 1..3: G_s (guided map) -> location module -> boxes (Eq. 1-2, Table 1 priors)
                    G_s, boxes -> bilinear sampling of each region (Eq. 4-5, Table 1 sizes)
                    -> one unshared bottleneck block per region -> GAP + GMP per region
                    -> concatenated over the stage's regions -> Linear -> F_s (512-d)
    stage 4:        L4 -> GAP + GMP -> Linear -> F_4 (512-d)
    each F_s:       BNNeck (BN, bias frozen) -> classifier; ID loss (label smoothing) on the
                    logits, triplet on F_s (``loss.triplet_feature``), suffix ``_s``
    loss (Eq. 9):   lambda * sum_{s<=3} (L_loc + L_ID + L_tri)_s + (L_ID + L_tri)_4
    test (Eq. 6):   [0.35 F1, 0.5 F2, 0.7 F3, 0.8 F4] of the L2-normalised parts (2,048-d)

Semantic guidance is computed from the *final* layer4 map and added to the layer1 / layer2
maps that the stage-1/2 location and feature-extraction modules read; the backbone trunk
itself runs once, unchanged (layer4 only exists after layer1-3 have run, so adding it to
their outputs inside the trunk would need a second pass). The ablations of Tables 4, 5 and
7 and Fig. 5 are options of the same class (:class:`MGReOptions`); docs/mgre.md lists them.

Coordinates. Everything here is in *normalised image coordinates*: ``x`` runs from 0 (left
edge of the image) to 1 (right edge), ``y`` from 0 (top) to 1 (bottom), in the continuous
pixel convention (pixel ``i`` of a ``W``-wide map covers ``[i / W, (i + 1) / W)``). Every
stage's feature map covers the same image area, so one box is valid on every stage; the
0.05 margin of Eq. 3 only makes sense in these units. Boxes are
``(x_min, y_min, x_max, y_max)``. Keypoints come from the data pipeline in pixels of the
transformed image; :func:`reidkit.data.keypoints.normalize_keypoints` divides by its size.

Regions (Table 1): stage 1 head, left half torso, right half torso, legs; stage 2 upper
and lower body; stage 3 whole body; stage 4 uses the whole map (no location module).

- Eq. 1-2, :func:`region_boxes`: per region the location module outputs
  ``(atanh dCx, atanh dCy, log l1, log l2)``; ``dC = tanh(.)`` moves the prior centre
  ``(C_x, C_y)`` by at most one image size, ``l = exp(.)`` is the box width / height.
- Eq. 3, :func:`location_loss`: squared distance between the predicted box and the box
  of the region's visible keypoints grown by the margin.
- Eq. 4-5, :func:`sample_regions`: bilinear sampling of each box to the Table 1 size.
- Eq. 6, :func:`weighted_feature`; Eq. 9, :meth:`MGRe.compute_loss`.

Keypoint midpoints. The half-torso regions use the shoulder and hip *midpoints*
(method notes), which COCO-17 does not contain. :func:`add_midpoints` appends them as
derived points 17 (shoulder midpoint) and 18 (hip midpoint), each visible only when both
of its points are; :data:`REGION_KEYPOINTS` refers to them by those indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from reidkit.config import Config
from reidkit.losses import ReIDLoss
from reidkit.methods.base import (
    Batch,
    EvalExtras,
    MethodOptions,
    MissingBatchKeyError,
    ReIDMethod,
    Role,
    method_options,
    register_method,
)

__all__ = [
    "REGION_NAMES",
    "STAGE_REGIONS",
    "REGION_CENTERS",
    "REGION_SAMPLE_SIZES",
    "STAGE_MAP_SIZES",
    "REGION_PRIOR_SIZES",
    "REGION_KEYPOINTS",
    "SHOULDER_MIDPOINT",
    "HIP_MIDPOINT",
    "NUM_EXTENDED_KEYPOINTS",
    "add_midpoints",
    "stage_priors",
    "stage_region_keypoints",
    "region_boxes",
    "keypoint_boxes",
    "location_loss",
    "sample_regions",
    "box_iou",
    "RegionLocator",
    "STAGE_COLORS",
    "FEATURE_WEIGHTS",
    "region_sample_size",
    "keypoint_region_boxes",
    "region_iou",
    "weighted_feature",
    "SemanticGuidance",
    "MGRePart",
    "MGReOptions",
    "MGRe",
    "mean_region_iou",
    "region_iou_sums",
    "iou_means",
]

# ------------------------------------------------------------------------ Table 1
#: Regions in stage order; the location module of a stage predicts its regions in this order.
REGION_NAMES: tuple[str, ...] = (
    "head",
    "left_torso",
    "right_torso",
    "legs",
    "upper_body",
    "lower_body",
    "whole_body",
)

#: Regions located after ResNet stage 1, 2 and 3 (stage 4 uses the whole map).
STAGE_REGIONS: dict[int, tuple[str, ...]] = {
    1: ("head", "left_torso", "right_torso", "legs"),
    2: ("upper_body", "lower_body"),
    3: ("whole_body",),
}

#: Prior centres ``(C_x, C_y)`` in normalised image coordinates (Table 1). Both half
#: torsos share one prior centre in the paper; their offsets separate them.
REGION_CENTERS: dict[str, tuple[float, float]] = {
    "head": (1 / 2, 1 / 12),
    "left_torso": (1 / 2, 1 / 3),
    "right_torso": (1 / 2, 1 / 3),
    "legs": (1 / 2, 3 / 4),
    "upper_body": (1 / 2, 1 / 3),
    "lower_body": (1 / 2, 3 / 4),
    "whole_body": (1 / 2, 1 / 2),
}

#: Sampled map size ``(N, M)`` = (height, width) per region (Table 1).
REGION_SAMPLE_SIZES: dict[str, tuple[int, int]] = {
    "head": (8, 8),
    "left_torso": (32, 16),
    "right_torso": (32, 16),
    "legs": (24, 32),
    "upper_body": (16, 16),
    "lower_body": (16, 16),
    "whole_body": (16, 8),
}

#: Stage map size ``(H, W)`` at the paper's 256x128 input with last stride 1.
STAGE_MAP_SIZES: dict[int, tuple[int, int]] = {1: (64, 32), 2: (32, 16), 3: (16, 8), 4: (16, 8)}


def _prior_sizes() -> dict[str, tuple[float, float]]:
    out = {}
    for stage, names in STAGE_REGIONS.items():
        h, w = STAGE_MAP_SIZES[stage]
        for name in names:
            n, m = REGION_SAMPLE_SIZES[name]
            out[name] = (m / w, n / h)
    return out


#: Prior box size ``(l1, l2)`` = (width, height), normalised. The paper gives no prior
#: size; we read Table 1's sample size as the region's size *on its stage map* (256x128
#: input), i.e. ``l = (M / W_stage, N / H_stage)``: a prior box is then sampled at its
#: native resolution, and the boxes this gives are anatomically sensible (head 1/4 x 1/8
#: at the top, half torso 1/2 x 1/2, legs full width x 3/8 at the bottom, upper / lower
#: body full width x 1/2, whole body = the image). :class:`RegionLocator` starts from them.
REGION_PRIOR_SIZES: dict[str, tuple[float, float]] = _prior_sizes()

#: Derived keypoints appended by :func:`add_midpoints` after the 17 COCO points.
SHOULDER_MIDPOINT = 17
HIP_MIDPOINT = 18
NUM_EXTENDED_KEYPOINTS = 19

#: Region -> keypoint indices (COCO-17 order, odd = the person's left; 17 / 18 = shoulder /
#: hip midpoint). Method-notes choice: head = nose, eyes, ears; half torso = that side's
#: shoulder and hip plus both midpoints (so the box spans the centre line to that side);
#: legs = hips to ankles; upper body = nose to hips; lower body = hips to ankles.
REGION_KEYPOINTS: dict[str, tuple[int, ...]] = {
    "head": (0, 1, 2, 3, 4),
    "left_torso": (5, 11, SHOULDER_MIDPOINT, HIP_MIDPOINT),
    "right_torso": (6, 12, SHOULDER_MIDPOINT, HIP_MIDPOINT),
    "legs": (11, 12, 13, 14, 15, 16),
    "upper_body": tuple(range(13)),
    "lower_body": (11, 12, 13, 14, 15, 16),
    "whole_body": tuple(range(17)),
}


def stage_priors(
    stage: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Prior centres and sizes of a stage's regions.

    Returns:
        ``(centers, sizes)``, each (R, 2): ``(C_x, C_y)`` and ``(l1, l2)`` normalised, in
        :data:`STAGE_REGIONS` order.
    """
    if stage not in STAGE_REGIONS:
        raise ValueError(f"MGRe locates regions after stages 1-3, got stage {stage}")
    names = STAGE_REGIONS[stage]
    centers = torch.tensor([REGION_CENTERS[n] for n in names], device=device, dtype=dtype)
    sizes = torch.tensor([REGION_PRIOR_SIZES[n] for n in names], device=device, dtype=dtype)
    return centers, sizes


def stage_region_keypoints(stage: int) -> list[list[int]]:
    """The ``region_keypoints`` argument of :func:`location_loss` for a stage."""
    if stage not in STAGE_REGIONS:
        raise ValueError(f"MGRe locates regions after stages 1-3, got stage {stage}")
    return [list(REGION_KEYPOINTS[n]) for n in STAGE_REGIONS[stage]]


# --------------------------------------------------------------------- keypoints
def add_midpoints(keypoints: Tensor) -> Tensor:
    """Append the shoulder and hip midpoints to COCO-17 keypoints.

    Args:
        keypoints: (B, 17, 3) ``(x, y, visibility)``.

    Returns:
        (B, 19, 3): point 17 = mean of the shoulders (5, 6), point 18 = mean of the hips
        (11, 12); a midpoint's visibility is the smaller of its two points' (so it is
        visible, > 0, only when both are).
    """
    if keypoints.dim() != 3 or keypoints.shape[1:] != (17, 3):
        raise ValueError(f"keypoints must be (B, 17, 3) COCO-17, got {tuple(keypoints.shape)}")
    pairs = keypoints[:, [5, 11]], keypoints[:, [6, 12]]  # (B, 2, 3) each
    xy = (pairs[0][..., :2] + pairs[1][..., :2]) / 2
    vis = torch.minimum(pairs[0][..., 2:], pairs[1][..., 2:])
    return torch.cat([keypoints, torch.cat([xy, vis], dim=-1)], dim=1)


def _extended(keypoints: Tensor) -> Tensor:
    if keypoints.dim() == 3 and keypoints.shape[1:] == (NUM_EXTENDED_KEYPOINTS, 3):
        return keypoints
    return add_midpoints(keypoints)


def _membership(region_keypoints: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    member = torch.zeros(len(region_keypoints), NUM_EXTENDED_KEYPOINTS, dtype=torch.bool)
    for r, indices in enumerate(region_keypoints):
        for i in indices:
            if not 0 <= int(i) < NUM_EXTENDED_KEYPOINTS:
                raise ValueError(
                    f"region_keypoints[{r}] holds index {i}; valid: 0-16 (COCO-17), "
                    f"{SHOULDER_MIDPOINT} (shoulder midpoint), {HIP_MIDPOINT} (hip midpoint)"
                )
            member[r, int(i)] = True
    return member.to(device)


# ------------------------------------------------------------------------ Eq. 1-3
def region_boxes(params: Tensor, centers: Tensor) -> Tensor:
    """Eq. 2: boxes from the location module's raw outputs (Eq. 1).

    Args:
        params: (B, R, 4) raw outputs ``(atanh dCx, atanh dCy, log l1, log l2)``.
        centers: (R, 2) prior centres ``(C_x, C_y)`` in [0, 1].

    Returns:
        (B, R, 4) boxes ``(x_min, y_min, x_max, y_max)`` in normalised image coordinates:
        centre ``C + tanh(params[..., :2])``, size ``exp(params[..., 2:])``. Not clipped to
        the image (sampling outside it reads zeros).
    """
    if params.dim() != 3 or params.shape[-1] != 4:
        raise ValueError(f"params must be (B, R, 4), got {tuple(params.shape)}")
    if centers.shape != (params.shape[1], 2):
        raise ValueError(
            f"centers must be (R, 2) = ({params.shape[1]}, 2), got {tuple(centers.shape)}"
        )
    center = centers.to(params) + torch.tanh(params[..., :2])
    half = torch.exp(params[..., 2:]) / 2
    return torch.cat([center - half, center + half], dim=-1)


def keypoint_boxes(
    keypoints: Tensor, region_keypoints: Sequence[Sequence[int]], margin: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Per region the box of its visible keypoints, grown by ``margin`` on every side.

    Args:
        keypoints: (B, 17, 3) (or (B, 19, 3) with :func:`add_midpoints` applied)
            ``(x, y, visibility)`` in normalised coordinates; visible means > 0.
        region_keypoints: per region, its keypoint indices (0-16 COCO-17, 17/18 midpoints).
        margin: added outside the keypoints' extent (Eq. 3 uses 0.05).

    Returns:
        ``(boxes, valid)``: (B, R, 4) ``(min x - m, min y - m, max x + m, max y + m)`` and
        (B, R) bool, False where the region has no visible keypoint (its box is then 0).
    """
    kp = _extended(keypoints)
    member = _membership(region_keypoints, kp.device)  # (R, K)
    mask = member[None] & (kp[:, None, :, 2] > 0)  # (B, R, K)
    x = kp[:, None, :, 0].expand(mask.shape)
    y = kp[:, None, :, 1].expand(mask.shape)
    inf = torch.tensor(math.inf, dtype=kp.dtype, device=kp.device)
    boxes = torch.stack(
        [
            torch.where(mask, x, inf).amin(-1) - margin,
            torch.where(mask, y, inf).amin(-1) - margin,
            torch.where(mask, x, -inf).amax(-1) + margin,
            torch.where(mask, y, -inf).amax(-1) + margin,
        ],
        dim=-1,
    )
    valid = mask.any(-1)
    # no inf leaves this function: 0 * inf in a later gradient would be NaN
    return torch.where(valid[..., None], boxes, torch.zeros_like(boxes)), valid


def location_loss(
    boxes: Tensor,
    keypoints: Tensor,
    region_keypoints: Sequence[Sequence[int]],
    margin: float = 0.05,
    scale: tuple[float, float] = (1.0, 1.0),
) -> Tensor:
    """Eq. 3, averaged over the (sample, region) pairs that have a visible keypoint.

    ``L = (x_min - min X + m)^2 + (x_max - max X - m)^2 + (y_min - min Y + m)^2
    + (y_max - max Y - m)^2`` with X, Y the region's visible keypoints.

    ``scale = (W, H)`` measures the differences in units of a ``W x H`` map (the x terms
    are multiplied by ``W^2``, the y terms by ``H^2``): Eq. 2 places the boxes on the stage
    map, ``(c_x + dc_x) x W``, so MGRe measures Eq. 3 in that map's pixels by default
    (``model.mgre.loc_units``); the margin stays a fraction of the image.

    Args:
        boxes: (B, R, 4) predicted boxes (:func:`region_boxes`), normalised.
        keypoints: (B, 17, 3) keypoints in normalised coordinates, visibility > 0 = visible.
        region_keypoints: per region (R lists), its keypoint indices (COCO-17 0-16, and
            17 / 18 for the shoulder / hip midpoints of :func:`add_midpoints`).
        margin: the boundary margin (0.05 in the paper).

    Returns:
        Scalar: the sum of the four squares per counted pair, averaged over counted pairs.
        A pair whose region has no visible keypoint adds nothing and is not counted. When
        no pair counts the result is ``0 * boxes.sum()``: an exact zero that stays in the
        graph (zero gradients, so backward / DDP see every parameter used).
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, R, 4), got {tuple(boxes.shape)}")
    if keypoints.shape[0] != boxes.shape[0]:
        raise ValueError(f"keypoints batch {keypoints.shape[0]} != boxes batch {boxes.shape[0]}")
    if len(region_keypoints) != boxes.shape[1]:
        raise ValueError(
            f"region_keypoints has {len(region_keypoints)} regions, boxes {boxes.shape[1]}"
        )
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))  # AMP: fp16 boxes
    target, valid = keypoint_boxes(keypoints.to(boxes.dtype), region_keypoints, margin)
    sx, sy = float(scale[0]), float(scale[1])
    weights = torch.tensor([sx * sx, sy * sy, sx * sx, sy * sy], dtype=boxes.dtype)
    per_pair = ((boxes - target) ** 2 * weights.to(boxes.device)).sum(-1)  # (B, R)
    per_pair = torch.where(valid, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------ Eq. 4-5
def sample_regions(feature_map: Tensor, boxes: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Eqs. 4-5: bilinear sampling of every box to an ``N x M`` map (differentiable in both
    the map and the boxes).

    Output pixel ``(i, j)`` reads the map at the box point ``(x_min + (j + 0.5) / M *
    (x_max - x_min), y_min + (i + 0.5) / N * (y_max - y_min))`` (Eq. 4 at pixel centres)
    with the bilinear kernel of Eq. 5; points outside the map read zeros. A box covering
    the whole map sampled at the map's own size reproduces the map (``align_corners=False``
    matches the pixel-centre convention).

    Args:
        feature_map: (B, C, H, W).
        boxes: (B, R, 4) ``(x_min, y_min, x_max, y_max)``, normalised.
        out_size: ``(N, M)`` = (height, width) of the sampled maps.

    Returns:
        (B, R, C, N, M) (a permuted view; call ``.contiguous()`` if needed).
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (B, C, H, W), got {tuple(feature_map.shape)}")
    b, c = feature_map.shape[:2]
    if boxes.dim() != 3 or boxes.shape[0] != b or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B={b}, R, 4), got {tuple(boxes.shape)}")
    n, m = int(out_size[0]), int(out_size[1])
    if n < 1 or m < 1:
        raise ValueError(f"out_size must be positive (N, M), got {tuple(out_size)}")
    r = boxes.shape[1]
    boxes = boxes.to(feature_map.dtype)
    ty = (torch.arange(n, device=boxes.device, dtype=boxes.dtype) + 0.5) / n
    tx = (torch.arange(m, device=boxes.device, dtype=boxes.dtype) + 0.5) / m
    x0, y0, x1, y1 = boxes.unbind(-1)  # (B, R)
    xs = x0[..., None] + tx * (x1 - x0)[..., None]  # (B, R, M)
    ys = y0[..., None] + ty * (y1 - y0)[..., None]  # (B, R, N)
    gx, gy = torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None])  # (B, R, N, M)
    # regions stacked along the output height: one grid_sample, no copy of the map per region
    grid = (torch.stack([gx, gy], dim=-1) * 2 - 1).reshape(b, r * n, m, 2)
    out = F.grid_sample(
        feature_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (B, C, R * N, M)
    return out.view(b, c, r, n, m).permute(0, 2, 1, 3, 4)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of ``(..., 4)`` boxes ``(x_min, y_min, x_max, y_max)`` -> ``(...)``.

    Degenerate boxes (zero area) have IoU 0 with everything.
    """
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


# ------------------------------------------------------------------ location module
class RegionLocator(nn.Module):
    """The location module (Eq. 1): conv, ReLU, BN, max pooling, FC -> (B, R, 4) raw
    ``(atanh dCx, atanh dCy, log l1, log l2)`` per region.

    The max pooling is adaptive to a small grid (``pool_size``) rather than global, so the
    FC still sees *where* things are. The FC weight starts at zero and its bias at
    ``(0, 0, log l1, log l2)`` of the prior sizes, so the first boxes are exactly the
    priors (prior centre, :data:`REGION_PRIOR_SIZES`) and the module learns offsets from
    them (as STN localisation nets start from the identity).

    Args:
        in_channels: channels of the stage's feature map.
        centers: (R, 2) prior centres (see :func:`stage_priors`).
        sizes: (R, 2) prior sizes ``(l1, l2)``.
        mid_channels: channels of the conv.
        kernel_size: conv kernel size (odd; padded to keep the map size).
        pool_size: ``(h, w)`` of the adaptive max pooling.
    """

    def __init__(
        self,
        in_channels: int,
        centers: Tensor,
        sizes: Tensor,
        mid_channels: int = 64,
        kernel_size: int = 3,
        pool_size: tuple[int, int] = (8, 4),
    ) -> None:
        super().__init__()
        centers = torch.as_tensor(centers, dtype=torch.float32)
        sizes = torch.as_tensor(sizes, dtype=torch.float32)
        if centers.dim() != 2 or centers.shape[1] != 2 or sizes.shape != centers.shape:
            raise ValueError(
                f"centers and sizes must both be (R, 2), got {tuple(centers.shape)} and "
                f"{tuple(sizes.shape)}"
            )
        if (sizes <= 0).any():
            raise ValueError(f"prior sizes must be positive, got {sizes.tolist()}")
        self.num_regions = centers.shape[0]
        self.conv = nn.Conv2d(
            in_channels, mid_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(mid_channels)
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.fc = nn.Linear(mid_channels * pool_size[0] * pool_size[1], self.num_regions * 4)
        self.register_buffer("centers", centers, persistent=False)
        self.register_buffer("prior_sizes", sizes, persistent=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.reset_to_priors()

    @classmethod
    def for_stage(cls, stage: int, in_channels: int, **kwargs) -> RegionLocator:
        """The location module of MGRe stage 1, 2 or 3 with the Table 1 priors."""
        centers, sizes = stage_priors(stage)
        return cls(in_channels, centers, sizes, **kwargs)

    def reset_to_priors(self) -> None:
        """Zero the FC weight and set its bias so that the predicted boxes are the priors."""
        nn.init.zeros_(self.fc.weight)
        bias = torch.cat(
            [torch.zeros_like(self.prior_sizes), self.prior_sizes.log()], dim=1
        )  # (R, 4)
        with torch.no_grad():
            self.fc.bias.copy_(bias.reshape(-1))

    def _max_pool(self, x: Tensor) -> Tensor:
        # a plain max pooling when the grid divides the map (the same bins as the adaptive
        # pooling; ONNX-exportable), the adaptive pooling otherwise
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = self.pool.output_size
        if h % ph == 0 and w % pw == 0:
            return F.max_pool2d(x, (h // ph, w // pw))
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, R, 4) raw parameters (Eq. 1)."""
        x = self._max_pool(self.bn(self.relu(self.conv(x))))
        return self.fc(x.flatten(1)).view(-1, self.num_regions, 4)

    def boxes(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, R, 4) boxes (:func:`region_boxes` of :meth:`forward`)."""
        return region_boxes(self(x), self.centers)


# --------------------------------------------------------------------- helpers
#: Eq. 6 weights ``lambda^F`` of the stage 1-4 parts (the paper's grid-search result).
FEATURE_WEIGHTS: tuple[float, float, float, float] = (0.35, 0.5, 0.7, 0.8)

#: Box colours (RGB) per stage for drawings: stage 1 red, stage 2 green, stage 3 blue.
STAGE_COLORS: dict[int, tuple[int, int, int]] = {
    1: (230, 40, 40),
    2: (30, 170, 60),
    3: (40, 90, 230),
}

#: Stage of each region of :data:`REGION_NAMES`.
REGION_STAGE: dict[str, int] = {n: s for s, names in STAGE_REGIONS.items() for n in names}


def region_sample_size(
    name: str, map_size: tuple[int, int], mode: Literal["scaled", "table1"] = "scaled"
) -> tuple[int, int]:
    """The ``(N, M)`` a region is sampled to on a map of ``map_size = (H, W)``.

    ``table1``: Table 1's size whatever the map. ``scaled`` (default): Table 1's size scaled
    by the map's size relative to the region's own stage map at the paper's 256x128 input,
    i.e. the prior box at the map's own resolution: ``round(l2 * H) x round(l1 * W)`` with
    the prior size ``(l1, l2)`` of :data:`REGION_PRIOR_SIZES`. Both agree at 256x128 on the
    region's own stage; ``scaled`` keeps the sampling native at other input sizes and when a
    region is sampled from another stage (Table 5, single-grained features).
    """
    if name not in REGION_SAMPLE_SIZES:
        raise ValueError(
            f"unknown MGRe region '{name}' (expected one of {', '.join(REGION_NAMES)})"
        )
    if mode == "table1":
        return REGION_SAMPLE_SIZES[name]
    if mode != "scaled":
        raise ValueError(f"sample size mode must be 'scaled' or 'table1', got {mode!r}")
    l1, l2 = REGION_PRIOR_SIZES[name]
    h, w = int(map_size[0]), int(map_size[1])
    return max(1, int(l2 * h + 0.5)), max(1, int(l1 * w + 0.5))


def keypoint_region_boxes(
    keypoints: Tensor,
    region_keypoints: Sequence[Sequence[int]],
    centers: Tensor,
    sizes: Tensor,
    margin: float = 0.05,
) -> Tensor:
    """Regions placed from keypoints (Table 7, "MGRe w/o JO"): the box of each region's
    visible keypoints grown by ``margin`` (the target of Eq. 3); a region without a visible
    keypoint gets its prior box (prior centre and size).

    Args:
        keypoints: (B, 17, 3) normalised ``(x, y, visibility)``.
        region_keypoints: per region (R lists) its keypoint indices.
        centers, sizes: (R, 2) prior centres and sizes (:func:`stage_priors`).

    Returns:
        (B, R, 4) boxes, normalised (no gradient flows to the keypoints' positions anyway).
    """
    boxes, valid = keypoint_boxes(keypoints, region_keypoints, margin)
    centers = centers.to(boxes)
    half = sizes.to(boxes) / 2
    prior = torch.cat([centers - half, centers + half], dim=-1).expand_as(boxes)
    return torch.where(valid[..., None], boxes, prior)


def region_iou(
    boxes: Tensor,
    keypoints: Tensor,
    region_keypoints: Sequence[Sequence[int]],
    margin: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """IoU of predicted boxes with the keypoint boxes they are trained towards (Eq. 3's
    target: the region's visible keypoints grown by ``margin``).

    Args:
        boxes: (B, R, 4) predicted boxes, normalised.
        keypoints: (B, 17, 3) normalised keypoints.
        region_keypoints: per region its keypoint indices.

    Returns:
        ``(iou, valid)``: (B, R) IoU and (B, R) bool, False where the region has no visible
        keypoint (its IoU is then 0 and should not be counted).
    """
    target, valid = keypoint_boxes(keypoints.to(boxes.dtype), region_keypoints, margin)
    iou = box_iou(boxes, target)
    return torch.where(valid, iou, torch.zeros_like(iou)), valid


def weighted_feature(parts: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Eq. 6: ``[w_1 F_1 / |F_1|, ..., w_n F_n / |F_n|]``.

    Args:
        parts: n tensors (B, D_i).
        weights: n weights ``lambda^F_i``.

    Returns:
        (B, sum D_i).
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"weighted_feature: {len(parts)} parts but {len(weights)} weights")
    return torch.cat([w * F.normalize(p, dim=-1) for p, w in zip(parts, weights)], dim=-1)


class SemanticGuidance(nn.Module):
    """Semantic guidance of a fine-grained stage map by the final (layer4) map: the top map
    bilinearly upsampled to the stage map's size and projected by a 1x1 conv (+ BN) to its
    channels, added element-wise.

    The 1x1 conv and BN run *before* the upsampling: per-pixel channel mixing commutes with
    bilinear interpolation (whose weights sum to 1), so the result is the same as upsampling
    first (exactly in eval mode) at a fraction of the cost. The BN weight starts at zero, so
    at initialisation the guided map is the stage map itself (a pretrained backbone's
    features are not disturbed) and the guidance is learned.

    ``forward(stage_map (B, C, H, W), top_map (B, C4, h, w)) -> (B, C, H, W)``.
    """

    def __init__(self, top_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(top_channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, stage_map: Tensor, top_map: Tensor) -> Tensor:
        guide = self.bn(self.conv(top_map))
        if guide.shape[-2:] != stage_map.shape[-2:]:
            guide = F.interpolate(
                guide, size=stage_map.shape[-2:], mode="bilinear", align_corners=False
            )
        return stage_map + guide


def _scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward."""
    if scale == 1.0:
        return x
    detached = x.detach()
    return detached if scale == 0.0 else detached + scale * (x - detached)


def _region_block(channels: int) -> nn.Module:
    """One bottleneck residual block ``channels -> channels`` (width ``channels / 4``), the
    feature-extraction module of one region; its last BN starts at zero, so a new block is
    the identity on its non-negative input and starts from the backbone's features."""
    from reidkit.models.resnet import Bottleneck

    planes = max(1, channels // Bottleneck.expansion)
    downsample = None
    if planes * Bottleneck.expansion != channels:
        downsample = nn.Sequential(
            nn.Conv2d(channels, planes * Bottleneck.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
    block = Bottleneck(channels, planes, downsample=downsample)
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if downsample is None:
        nn.init.zeros_(block.bn3.weight)
    return block


@dataclass(frozen=True)
class MGRePart:
    """One part of the test feature.

    Attributes:
        stage: 1-4, its place in the feature and its Eq. 6 weight.
        source: 1-4, the backbone stage whose (guided) map it reads.
        regions: its Table 1 regions; ``()``: the whole map.
    """

    stage: int
    source: int
    regions: tuple[str, ...]


# --------------------------------------------------------------------- options
class MGReOptions(MethodOptions):
    """``model.mgre``: MGRe's options. The defaults are the paper's MGRe."""

    #: lambda of Eq. 9: weight of the stage 1-3 terms (location, ID, triplet)
    lam: float = Field(1.0, ge=0)
    #: stages 1-3 that get modules (Table 4: [1], [2], [3], [2, 3], [1, 2, 3]); stage 4
    #: (the whole layer4 map) is always a part
    stages: list[int] = Field(default_factory=lambda: [1, 2, 3])
    #: Table 5: ``multi`` (MGRe), ``single_features`` (location, sampling and feature
    #: modules of every stage on the layer4 map), ``single_regions`` (each stage's whole
    #: map, no location module)
    granularity: Literal["multi", "single_features", "single_regions"] = "multi"
    #: stages whose part is their whole map instead of located regions (the paper's remark
    #: after Table 5: the whole layer3 map did slightly better than the whole-body region)
    whole_map_stages: list[int] = Field(default_factory=list)
    #: Table 7: ``locator`` (joint optimisation) or ``keypoints`` ("MGRe w/o JO": regions
    #: placed from keypoints at training *and* test time, no location module)
    regions_from: Literal["locator", "keypoints"] = "locator"
    #: False: "Baseline+JO" of Table 7 (location modules and loss only; the test feature is
    #: the stage-4 part alone, no sampling / feature modules)
    region_features: bool = True
    #: stage-4 part: ``embedding`` (GAP + GMP -> Linear -> part_dim, MGRe) or ``bnneck``
    #: (BoT's head: model.pooling -> BNNeck at full width, for Baseline+JO)
    global_head: Literal["embedding", "bnneck"] = "embedding"
    #: layer4 -> 1x1 conv -> upsampled, added to the layer1 / layer2 maps
    semantic_guidance: bool = True
    #: width of each part (Fig. 5: final dimension = part_dim x number of parts)
    part_dim: int = Field(512, gt=0)
    #: Eq. 6 weights lambda^F of stages 1..4 (Fig. 6)
    feature_weights: list[float] = Field(default_factory=lambda: list(FEATURE_WEIGHTS))
    #: per region: GAP + GMP summed (``sum``) or concatenated (``concat``)
    region_pool: Literal["sum", "concat"] = "sum"
    #: extra weight of L_loc inside Eq. 9 (1 = the paper); 0 turns the location loss off
    #: (regions learned from the ID / triplet losses alone; no keypoints needed)
    loc_weight: float = Field(1.0, ge=0)
    #: boundary margin of Eq. 3 (a fraction of the image)
    loc_margin: float = Field(0.05, ge=0)
    #: units of Eq. 3: ``map_pixels`` (pixels of the map the stage's location module reads,
    #: as Eq. 2 places the boxes: (c + dc) x W) or ``normalized`` (fractions of the image)
    loc_units: Literal["map_pixels", "normalized"] = "map_pixels"
    #: region -> COCO-17 keypoint indices (17 / 18: shoulder / hip midpoint), replacing the
    #: defaults of REGION_KEYPOINTS for the regions given
    region_keypoints: dict[str, list[int]] = Field(default_factory=dict)
    #: sampled size: ``scaled`` (Table 1 at 256x128, scaled with the map) or ``table1``
    sample_size: Literal["scaled", "table1"] = "scaled"
    #: scale of the ID / triplet gradient that reaches the box coordinates through the
    #: sampling module (1: fully joint, as a spatial transformer; 0: the boxes learn from
    #: the location loss alone, the sampled features still train the backbone)
    reid_box_grad: float = Field(1.0, ge=0)
    #: learning-rate factor of the location modules (times solver.lr and the schedule).
    #: Their FC regresses 4 numbers per region from a 64 x 8 x 4 = 2,048-d input; Adam moves
    #: every weight by up to ~lr per step, so an output can move by lr x sum|x| (~1e-3 x
    #: 3,000 = 3 in atanh / log units at lr 1e-3): the boxes jump, tanh saturates and the
    #: location loss stops teaching them (observed). 0.01 bounds that step to ~0.03.
    locator_lr_factor: float = Field(0.01, gt=0)
    #: location module: conv channels and adaptive max-pooling grid (h, w)
    locator_channels: int = Field(64, gt=0)
    locator_pool: tuple[int, int] = (8, 4)
    #: a feature-extraction block on the stage-4 map too (the paper: none)
    stage4_block: bool = False
    #: evaluation extra: mean region IoU against the keypoint boxes on this many query
    #: batches (0: off)
    eval_iou_batches: int = Field(4, ge=0)

    @field_validator("stages", "whole_map_stages")
    @classmethod
    def _check_stages(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if s not in (1, 2, 3)]
        if bad:
            raise ValueError(f"stages must be among 1, 2, 3 (stage 4 is always used), got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"stages listed twice: {value}")
        return sorted(value)

    @field_validator("feature_weights")
    @classmethod
    def _check_weights(cls, value: list[float]) -> list[float]:
        if len(value) != 4 or any(w <= 0 for w in value):
            raise ValueError(f"feature_weights: 4 positive weights (stages 1-4), got {value}")
        return value

    @field_validator("region_keypoints")
    @classmethod
    def _check_region_keypoints(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, indices in value.items():
            if name not in REGION_NAMES:
                raise ValueError(
                    f"region_keypoints: unknown region '{name}' (regions: {', '.join(REGION_NAMES)})"
                )
            bad = [i for i in indices if not 0 <= i < NUM_EXTENDED_KEYPOINTS]
            if not indices or bad:
                raise ValueError(
                    f"region_keypoints.{name}: give COCO-17 indices 0-16 (17 / 18: shoulder / "
                    f"hip midpoint), got {indices}"
                )
        return value

    @field_validator("locator_pool")
    @classmethod
    def _check_pool(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"locator_pool must be positive (h, w), got {value}")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> MGReOptions:
        extra = [s for s in self.whole_map_stages if s not in self.stages]
        if extra:
            raise ValueError(f"whole_map_stages {extra} are not in stages {self.stages}")
        if self.regions_from == "keypoints" and not self.region_features:
            raise ValueError(
                "regions_from=keypoints places the regions of the feature modules; with "
                "region_features=false there are none (Baseline+JO uses regions_from=locator)"
            )
        if (
            self.regions_from == "locator"
            and self.located_stages
            and self.reid_box_grad == 0
            and (self.loc_weight == 0 or self.lam == 0)
        ):
            raise ValueError(
                "reid_box_grad=0 with the location loss off (loc_weight or lam = 0): nothing "
                "would train the location modules"
            )
        if not self.region_features and self.granularity == "single_regions":
            raise ValueError(
                "granularity=single_regions has no location modules; with region_features=false "
                "nothing would be added to the baseline (use model.name=bot)"
            )
        return self

    # ------------------------------------------------------------ derived settings
    @property
    def located_stages(self) -> list[int]:
        """Stages 1-3 whose regions are located (by location modules or keypoints)."""
        if self.granularity == "single_regions":
            return []
        return [s for s in self.stages if s not in self.whole_map_stages]

    @property
    def location_loss_on(self) -> bool:
        """The location loss is part of Eq. 9 (so training needs keypoints)."""
        return (
            self.regions_from == "locator"
            and bool(self.located_stages)
            and self.loc_weight > 0
            and self.lam > 0
        )

    @property
    def needs_test_keypoints(self) -> bool:
        """Regions are placed from keypoints at test time (MGRe w/o JO)."""
        return self.regions_from == "keypoints" and bool(self.located_stages)


# ---------------------------------------------------------------------- method
@register_method("mgre", options=MGReOptions)
class MGRe(ReIDMethod):
    """MGRe: multi-granularity features from located multi-granularity body regions.

    Args:
        cfg: the experiment config (``model.*``, ``model.mgre``, ``loss.*``).
        num_classes: training identities (0: inference only, no classifiers).
        backbone: optional pre-built staged backbone (four stages); by default
            :func:`reidkit.models.backbone_from_config` builds it from ``cfg.model``.

    Attributes:
        parts: the :class:`MGRePart` s of the test feature, in stage order.
        locators: ``{"1": RegionLocator, ...}`` of the located stages (JO).
        guidance: ``{"1": SemanticGuidance, "2": ...}`` for the stage maps read.
        region_blocks: ``{"s": ModuleList}`` one feature-extraction block per region.
        reductions: ``{"s": Linear}`` the embedding of each part to ``part_dim``.
        necks: ``{"s": BNNeck}`` per part.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"images", "keypoints"})
    eval_requires: ClassVar[frozenset[str]] = frozenset({"images"})
    feature_names: ClassVar[tuple[str, ...]] = ("post_bn", "pre_bn")
    keep_for_eval: ClassVar[tuple[str, ...]] = ("boxes",)

    @classmethod
    def batch_requirements(cls, cfg: Config) -> tuple[frozenset[str], frozenset[str]]:
        """Keypoints are needed for training while the location loss is on or regions are
        placed from keypoints, and at test time only for the latter (MGRe w/o JO)."""
        opts = method_options(cfg, MGReOptions, "mgre")
        train = {"images"}
        if opts.location_loss_on or opts.needs_test_keypoints:
            train.add("keypoints")
        test = {"images", "keypoints"} if opts.needs_test_keypoints else {"images"}
        return frozenset(train), frozenset(test)

    def __init__(self, cfg: Config, num_classes: int, backbone: nn.Module | None = None) -> None:
        super().__init__()
        from reidkit.models import BNNeck, build_pooling
        from reidkit.models.backbone import Backbone

        opts = method_options(cfg, MGReOptions, "mgre")
        self.opts = opts
        self.num_classes = num_classes
        if backbone is None:
            from reidkit.models import backbone_from_config

            backbone = backbone_from_config(cfg.model)
        if not isinstance(backbone, Backbone) or len(backbone.stage_names) != 4:
            raise ValueError(
                f"model.backbone='{cfg.model.backbone}': MGRe needs a staged backbone with four "
                "stages (reidkit.models.backbone.Backbone, e.g. a ResNet) to read every stage"
            )
        self.backbone = backbone
        channels = [int(c) for c in backbone.stage_channels]
        self.stage_channels = channels
        self.triplet_feature = cfg.loss.triplet_feature
        self.region_keypoints: dict[int, list[list[int]]] = {
            s: [list(opts.region_keypoints.get(n, REGION_KEYPOINTS[n])) for n in names]
            for s, names in STAGE_REGIONS.items()
        }

        located = opts.located_stages
        source_of = {s: (4 if opts.granularity == "single_features" else s) for s in (1, 2, 3)}
        self.located_source = {s: source_of[s] for s in located}
        parts = []
        if opts.region_features:
            for s in opts.stages:
                regions = STAGE_REGIONS[s] if s in located else ()
                parts.append(MGRePart(s, source_of[s], regions))
        parts.append(MGRePart(4, 4, ()))
        self.parts: tuple[MGRePart, ...] = tuple(parts)

        # location modules (joint optimisation) of the located stages
        self.locators = nn.ModuleDict()
        if opts.regions_from == "locator":
            for s in located:
                self.locators[str(s)] = RegionLocator.for_stage(
                    s,
                    channels[source_of[s] - 1],
                    mid_channels=opts.locator_channels,
                    pool_size=tuple(opts.locator_pool),
                )
        for s in located:
            centers, sizes = stage_priors(s)
            self.register_buffer(f"prior_centers_{s}", centers, persistent=False)
            self.register_buffer(f"prior_sizes_{s}", sizes, persistent=False)

        # semantic guidance of the stage-1/2 maps that something reads
        read = {p.source for p in self.parts} | set(self.located_source.values())
        self.guidance = nn.ModuleDict()
        if opts.semantic_guidance:
            for s in (1, 2):
                if s in read:
                    self.guidance[str(s)] = SemanticGuidance(channels[3], channels[s - 1])

        # feature extraction, embedding, heads and losses per part
        self.region_blocks = nn.ModuleDict()
        self.reductions = nn.ModuleDict()
        self.necks = nn.ModuleDict()
        self.part_losses = nn.ModuleDict()
        if opts.global_head == "bnneck":  # BoT's pooling (GeM's p is a parameter)
            self.global_pool = build_pooling(cfg.model.pooling, p=cfg.model.gem_p)
        pool_factor = 2 if opts.region_pool == "concat" else 1
        self.part_dims: dict[int, int] = {}
        for part in self.parts:
            key = str(part.stage)
            c = channels[part.source - 1]
            bnneck_head = part.stage == 4 and opts.global_head == "bnneck"
            if part.stage < 4 or (opts.stage4_block and not bnneck_head):
                n_blocks = max(1, len(part.regions))
                self.region_blocks[key] = nn.ModuleList(_region_block(c) for _ in range(n_blocks))
            if bnneck_head:
                dim = c
            else:
                dim = opts.part_dim
                in_dim = max(1, len(part.regions)) * c * pool_factor
                self.reductions[key] = nn.Linear(in_dim, dim, bias=False)
                nn.init.kaiming_normal_(self.reductions[key].weight, mode="fan_out")
            self.part_dims[part.stage] = dim
            self.necks[key] = BNNeck(dim, num_classes)
            self.part_losses[key] = ReIDLoss(cfg.loss, num_classes, dim)

    # ------------------------------------------------------------------ geometry
    def priors(self, stage: int) -> tuple[Tensor, Tensor]:
        """(R, 2) prior centres and sizes of a located stage (on the model's device)."""
        return getattr(self, f"prior_centers_{stage}"), getattr(self, f"prior_sizes_{stage}")

    def _keypoints(self, batch: Batch, images: Tensor, what: str) -> Tensor:
        kp = batch.get("keypoints")
        if not isinstance(kp, Tensor):
            from reidkit.methods.base import KEY_HINTS

            raise MissingBatchKeyError(f"mgre needs 'keypoints' {what}: {KEY_HINTS['keypoints']}")
        if kp.dim() != 3 or kp.shape[1:] != (17, 3) or kp.shape[0] != images.shape[0]:
            raise ValueError(
                f"mgre: batch['keypoints'] must be ({images.shape[0]}, 17, 3), got "
                f"{tuple(kp.shape)}"
            )
        from reidkit.data.keypoints import normalize_keypoints

        return normalize_keypoints(kp.float(), images.shape[-2], images.shape[-1])

    def _stage_boxes(
        self, stage: int, source_map: Tensor, keypoints: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Boxes (B, R, 4) of a located stage and the location module's raw outputs."""
        if self.opts.regions_from == "locator":
            params = self.locators[str(stage)](source_map)
            return region_boxes(params.float(), self.priors(stage)[0]), params
        assert keypoints is not None
        centers, sizes = self.priors(stage)
        boxes = keypoint_region_boxes(
            keypoints, self.region_keypoints[stage], centers, sizes, self.opts.loc_margin
        )
        return boxes, None

    def _pool(self, x: Tensor) -> Tensor:
        """GAP + GMP of a region map: (B, C, N, M) -> (B, C) (sum) or (B, 2C) (concat)."""
        avg, mx = x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))
        return avg + mx if self.opts.region_pool == "sum" else torch.cat([avg, mx], dim=-1)

    # ------------------------------------------------------------------ forward
    def run(self, images: Tensor, keypoints: Tensor | None = None) -> dict[str, Any]:
        """The shared computation of training and test.

        Args:
            images: (B, 3, H, W).
            keypoints: (B, 17, 3) normalised; needed when regions come from keypoints.

        Returns:
            ``stage_maps`` (the four backbone maps), ``sources`` ``{s: map}`` (guided maps
            read by the modules), ``boxes`` ``{s: (B, R, 4)}`` and ``params`` ``{s: (B, R,
            4)}`` of the located stages, ``feats`` ``{s: (B, D_s)}`` the parts before
            their BNNeck.
        """
        maps = self.backbone.forward_stages(images)
        if len(maps) != 4:
            raise RuntimeError(f"MGRe: the backbone returned {len(maps)} stage maps, expected 4")
        top = maps[3]
        needed = {p.source for p in self.parts} | set(self.located_source.values())
        sources: dict[int, Tensor] = {}
        for s in sorted(needed):
            guide = self.guidance[str(s)] if str(s) in self.guidance else None
            sources[s] = guide(maps[s - 1], top) if guide is not None else maps[s - 1]
        boxes: dict[int, Tensor] = {}
        params: dict[int, Tensor] = {}
        for s, src in self.located_source.items():
            boxes[s], p = self._stage_boxes(s, sources[src], keypoints)
            if p is not None:
                params[s] = p
        feats: dict[int, Tensor] = {}
        for part in self.parts:
            x = sources[part.source]
            key = str(part.stage)
            if part.stage == 4 and self.opts.global_head == "bnneck":
                feats[4] = self.global_pool(x)
                continue
            blocks = self.region_blocks[key] if key in self.region_blocks else None
            pooled = []
            if part.regions:
                part_boxes = _scale_gradient(boxes[part.stage], self.opts.reid_box_grad)
                for r, name in enumerate(part.regions):
                    size = region_sample_size(name, x.shape[-2:], self.opts.sample_size)
                    region = sample_regions(x, part_boxes[:, r : r + 1], size)[:, 0]
                    pooled.append(self._pool(blocks[r](region)))
            else:
                pooled.append(self._pool(blocks[0](x) if blocks is not None else x))
            feats[part.stage] = self.reductions[key](torch.cat(pooled, dim=-1))
        return {
            "stage_maps": maps,
            "sources": sources,
            "boxes": boxes,
            "params": params,
            "feats": feats,
        }

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Training outputs: per part ``feat_s`` (B, D) (pre-BN), ``bn_feat_s``,
        ``logits_s`` (B, C); per located stage ``boxes_s`` (B, R, 4) and ``map_size_s``
        ((W, H) of the map its location module reads); ``logits`` = the stage-4 logits
        (for the accuracy log)."""
        images = batch["images"]
        kp = None
        if self.opts.regions_from == "keypoints" and self.located_source:
            kp = self._keypoints(batch, images, "to place its regions (regions_from=keypoints)")
        out = self.run(images, kp)
        result: dict[str, Tensor] = {}
        for part in self.parts:
            s = part.stage
            bn, logits = self.necks[str(s)](out["feats"][s])
            result[f"feat_{s}"] = out["feats"][s]
            result[f"bn_feat_{s}"] = bn
            if logits is not None:
                result[f"logits_{s}"] = logits
        for s, b in out["boxes"].items():
            result[f"boxes_{s}"] = b
            size = out["sources"][self.located_source[s]].shape[-2:]
            result[f"map_size_{s}"] = torch.tensor([size[1], size[0]], device=b.device)
        if "logits_4" in result:
            result["logits"] = result["logits_4"]
        return result

    def compute_loss(self, outputs: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 9: ``ce_s``, ``triplet_s`` (``loss.metric``) for every part and ``loc_s`` for
        every located stage, the stage 1-3 terms multiplied by ``lam`` (``loc_s`` also by
        ``loc_weight``)."""
        if "logits_4" not in outputs:
            raise RuntimeError("compute_loss needs logits; the model was built with num_classes=0")
        pids = batch["pids"]
        lam = self.opts.lam
        terms: dict[str, Tensor] = {}
        for part in self.parts:
            s = part.stage
            feat = outputs[f"feat_{s}" if self.triplet_feature == "pre_bn" else f"bn_feat_{s}"]
            part_terms = self.part_losses[str(s)](pids, outputs[f"logits_{s}"], feat, suffix=str(s))
            scale = 1.0 if s == 4 else lam
            terms.update({k: scale * v for k, v in part_terms.items()})
        if self.opts.location_loss_on:
            images = batch["images"]
            kp = self._keypoints(batch, images, "for the location loss (Eq. 3)")
            for s in self.located_source:
                scale = (1.0, 1.0)
                if self.opts.loc_units == "map_pixels":
                    w, h = (float(v) for v in outputs[f"map_size_{s}"])
                    scale = (w, h)
                loss = location_loss(
                    outputs[f"boxes_{s}"],
                    kp,
                    self.region_keypoints[s],
                    self.opts.loc_margin,
                    scale=scale,
                )
                terms[f"loc_{s}"] = lam * self.opts.loc_weight * loss
        return terms

    # ---------------------------------------------------------------- evaluation
    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, Tensor]:
        """``post_bn`` / ``pre_bn``: Eq. 6 over the parts (L2-normalised BN'd / raw parts,
        weighted by ``feature_weights``), (B, sum D_s); ``boxes``: (B, 7, 4) the regions in
        :data:`REGION_NAMES` order (normalised; NaN for regions this variant does not
        locate)."""
        images = batch["images"]
        kp = None
        if self.opts.needs_test_keypoints:
            kp = self._keypoints(batch, images, "at test time (regions_from=keypoints)")
        out = self.run(images, kp)
        pre = [out["feats"][p.stage] for p in self.parts]
        post = [self.necks[str(p.stage)].bn(f) for p, f in zip(self.parts, pre)]
        weights = [self.opts.feature_weights[p.stage - 1] for p in self.parts]
        return {
            "post_bn": weighted_feature(post, weights),
            "pre_bn": weighted_feature(pre, weights),
            "boxes": self._all_boxes(out["boxes"], images),
        }

    def _all_boxes(self, boxes: dict[int, Tensor], images: Tensor) -> Tensor:
        out = torch.full(
            (images.shape[0], len(REGION_NAMES), 4), float("nan"), device=images.device
        )
        for s, b in boxes.items():
            idx = [REGION_NAMES.index(n) for n in STAGE_REGIONS[s]]
            out[:, idx] = b.float()
        return out

    @torch.no_grad()
    def predict_boxes(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """The seven regions of :data:`REGION_NAMES` for a batch, (B, 7, 4) normalised
        (NaN for regions this variant does not locate). ``keypoints`` (B, 17, 3) in pixels
        of ``images`` (only used with ``regions_from=keypoints``). Current train/eval mode."""
        kp = None
        if self.opts.needs_test_keypoints:
            kp = self._keypoints({"keypoints": keypoints}, images, "to place its regions")
        return self._all_boxes(self.run(images, kp)["boxes"], images)

    def located_region_keypoints(self) -> dict[int, list[list[int]]]:
        """``{stage: region keypoint lists}`` of the located stages."""
        return {s: self.region_keypoints[s] for s in self.located_source}

    def forward_maps(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """Maps for the ranking report's activation maps (Eq. 10 of CAMA): the layer4 map of
        the global part as one branch, ``feat_maps`` = ``raw_maps`` ``(1, B, C4, h, w)``.
        Per-stage class activation maps are :meth:`stage_activation_maps`."""
        top = self.backbone.forward_stages(images)[3]
        return {"feat_maps": top[None], "raw_maps": top[None]}

    def stage_activation_maps(
        self, images: Tensor, targets: Tensor | None = None, keypoints: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-part class activation maps (the paper's Fig. 4) as Grad-CAM: for part ``s``
        the gradient of its logit of class ``targets`` (default: its predicted class) with
        respect to the map the part reads (the guided stage map), channel-weighted and
        rectified, each map scaled to [0, 1].

        Returns:
            ``{"stage1": (B, h1, w1), ..., "stage4": (B, h4, w4), "final": (B, H, W)}``;
            ``final`` is the Eq. 6-weighted mean of the per-stage maps upsampled to the
            image, scaled to [0, 1]. Runs in the current mode; call under ``eval()``.
        """
        if self.num_classes < 1:
            raise ValueError("stage_activation_maps needs the classifiers (num_classes > 0)")
        kp = None
        if self.opts.needs_test_keypoints:
            kp = self._keypoints({"keypoints": keypoints}, images, "to place its regions")
        with torch.enable_grad():
            out = self.run(images, kp)
            maps: dict[str, Tensor] = {}
            up = []
            weights = []
            for part in self.parts:
                s = part.stage
                src = out["sources"][part.source]
                logits = self.necks[str(s)](out["feats"][s])[1]
                assert logits is not None
                idx = logits.detach().argmax(1) if targets is None else targets.to(logits.device)
                score = logits.gather(1, idx.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, src, retain_graph=True)
                cam = torch.einsum("bk,bkhw->bhw", grad.mean(dim=(-2, -1)), src).clamp_min(0)
                cam = cam.detach().float()
                peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
                cam = cam / peak
                maps[f"stage{s}"] = cam
                up.append(
                    F.interpolate(
                        cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
                    )[:, 0]
                )
                weights.append(self.opts.feature_weights[s - 1])
        final = sum(w * m for w, m in zip(weights, up)) / sum(weights)
        maps["final"] = final / final.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return maps

    def optimizers(self, cfg: Config) -> dict[str, Any]:
        """The default optimisers; with ``locator_lr_factor != 1`` the location modules'
        parameters get their own groups whose learning rate is scaled by it."""
        specs = super().optimizers(cfg)
        factor = self.opts.locator_lr_factor
        if factor == 1.0 or not self.locators:
            return specs
        main = specs["main"]
        ids = {id(p) for p in self.locators.parameters()}
        groups = []
        for group in main.optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in ids]
            own = [p for p in group["params"] if id(p) in ids]
            options = {k: v for k, v in group.items() if k != "params"}
            if rest:
                groups.append({**options, "params": rest})
            if own:
                name = f"locator_{group.get('group_name', 'params')}"
                lr_factor = group.get("lr_factor", 1.0) * factor
                groups.append(
                    {
                        **options,
                        "params": own,
                        "group_name": name,
                        "lr_factor": lr_factor,
                        "lr": cfg.solver.lr * lr_factor,
                    }
                )
        main.optimizer = type(main.optimizer)(groups, **main.optimizer.defaults)
        return specs

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The parts' BNNecks (BN + classifier)."""
        for neck in self.necks.values():
            yield from (p for p in neck.parameters() if p.requires_grad)

    def eval_extras(self, cfg: Config, dataset: Any, device: torch.device) -> EvalExtras | None:
        """Mean IoU of the predicted regions with their keypoint boxes per stage on the first
        ``eval_iou_batches`` query batches (when the query images have keypoints)."""
        if not self.locators or self.opts.eval_iou_batches <= 0:
            return None
        from reidkit.data.loader import batch_keys, build_test_loader

        if "keypoints" not in batch_keys(dataset.query):
            return None
        loader = build_test_loader(cfg, dataset.query)
        ious = mean_region_iou(self, loader, device, max_batches=self.opts.eval_iou_batches)
        metrics = {f"region_iou_s{s}": v for s, v in ious.items()}
        shown = ", ".join(f"stage {s} {v:.3f}" for s, v in ious.items())
        return EvalExtras(
            metrics=metrics,
            notes=[
                f"MGRe region IoU with the keypoint boxes (first {self.opts.eval_iou_batches} "
                f"query batches): {shown}"
            ],
        )


@torch.no_grad()
def region_iou_sums(
    model: MGRe, loader: Any, device: torch.device | str, max_batches: int | None = None
) -> dict[str, tuple[float, int]]:
    """``{region name: (sum of IoU, number of pairs)}`` of ``model``'s predicted regions
    with their keypoint boxes (:func:`region_iou`) over the (sample, region) pairs with
    visible keypoints of ``loader``'s batches (which must carry ``keypoints``), eval mode."""
    from reidkit.data.keypoints import normalize_keypoints

    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums: dict[str, tuple[float, int]] = {}
    prepare = getattr(loader, "prepare", None)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if prepare is not None:
                batch = prepare(batch, device)
            else:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            if "keypoints" not in batch:
                raise ValueError("region IoU: the batches carry no keypoints")
            images = batch["images"]
            kp = normalize_keypoints(batch["keypoints"].float(), *images.shape[-2:])
            boxes = model.predict_boxes(images, batch["keypoints"])
            for s, region_kps in model.located_region_keypoints().items():
                names = STAGE_REGIONS[s]
                idx = [REGION_NAMES.index(n) for n in names]
                iou, valid = region_iou(boxes[:, idx], kp, region_kps, model.opts.loc_margin)
                for r, name in enumerate(names):
                    total, count = sums.get(name, (0.0, 0))
                    sums[name] = (
                        total + float(iou[:, r][valid[:, r]].sum()),
                        count + int(valid[:, r].sum()),
                    )
    finally:
        model.train(was_training)
    return sums


def iou_means(sums: dict[str, tuple[float, int]], per_region: bool = False) -> dict[Any, float]:
    """Means of :func:`region_iou_sums`: ``{stage: IoU}`` (pairs of all its regions
    pooled) or, with ``per_region``, ``{region: IoU}``; NaN where nothing counted."""
    groups: dict[Any, tuple[float, int]] = {}
    for name, (total, count) in sums.items():
        key = name if per_region else REGION_STAGE[name]
        t, c = groups.get(key, (0.0, 0))
        groups[key] = (t + total, c + count)
    return {k: t / c if c else float("nan") for k, (t, c) in sorted(groups.items(), key=str)}


def mean_region_iou(
    model: MGRe,
    loader: Any,
    device: torch.device | str,
    max_batches: int | None = None,
    per_region: bool = False,
) -> dict[Any, float]:
    """Mean IoU of ``model``'s predicted regions with the keypoint boxes they are trained
    towards (:func:`region_iou`), over the (sample, region) pairs with visible keypoints
    of ``loader``'s batches (which must carry ``keypoints``), in eval mode.

    Returns:
        ``{stage: mean IoU}`` for the located stages, or with ``per_region``
        ``{region name: mean IoU}``.
    """
    return iou_means(region_iou_sums(model, loader, device, max_batches), per_region)
