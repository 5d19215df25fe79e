"""MGRe: multi-granularity features from multi-granularity regions (Yang et al.,
Neurocomputing 2021): region geometry, location loss, region sampling and the location
module. The method class (backbone, semantic guidance, feature-extraction blocks,
embeddings, Eq. 9) builds on these.

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

Keypoint midpoints. The half-torso regions use the shoulder and hip *midpoints*
(method notes), which COCO-17 does not contain. :func:`add_midpoints` appends them as
derived points 17 (shoulder midpoint) and 18 (hip midpoint), each visible only when both
of its points are; :data:`REGION_KEYPOINTS` refers to them by those indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
) -> Tensor:
    """Eq. 3, averaged over the (sample, region) pairs that have a visible keypoint.

    ``L = (x_min - min X + m)^2 + (x_max - max X - m)^2 + (y_min - min Y + m)^2
    + (y_max - max Y - m)^2`` with X, Y the region's visible keypoints.

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
    per_pair = ((boxes - target) ** 2).sum(-1)  # (B, R)
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

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, R, 4) raw parameters (Eq. 1)."""
        x = self.pool(self.bn(self.relu(self.conv(x))))
        return self.fc(x.flatten(1)).view(-1, self.num_regions, 4)

    def boxes(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, R, 4) boxes (:func:`region_boxes` of :meth:`forward`)."""
        return region_boxes(self(x), self.centers)
