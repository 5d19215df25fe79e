"""Interaction-Aggregation blocks of IANet (Hou et al., CVPR 2019).

An IA block re-aggregates a feature map ``X (B, C, H, W)`` with relations computed from the
features themselves, so a position's effective receptive field follows the body parts
under pose and scale changes:

**Spatial IA (SIA).** With positions ``p, q`` in row-major ``(h, w)`` order (index
``p = y * W + x``, ``x`` along the width) and ``X_p`` the C-vector at ``p``::

    L[p, q] = softmax_q( -(x_q - x_p)^2 / (2 ax^2) - (y_q - y_p)^2 / (2 ay^2) )   location prior
    A[p, q] = softmax_q( X_p . X_q / sqrt(C) )                                   appearance
    R[p, q] = softmax_q( L[p, q] * A[p, q] )                                     relation
    Y_p     = sum_q R[p, q] X_q;       out = X + BN(Y)

The element-wise product followed by a second softmax is what the authors' public code
does (the slides only name the two relations). Since ``L * A`` lies in [0, 1], the second
softmax keeps every row within a factor ``e`` of uniform (``max R / min R <= e``): SIA
re-weights a global average rather than selecting a few positions. ``ax, ay`` are in cells; the public code
uses ``(10, 20)`` after layer2 (32x16 at 256x128) and ``(5, 10)`` after layer3 (16x8), see
:data:`IANET_STAGE_SIGMAS`.

The slides write the appearance relation over K x K neighbourhoods:
``A[i, j] = softmax_j( sum_k p_{i,k} . p_{j,k} )`` with ``p_{i,k}`` the k-th cell of the
K x K patch centred on ``i`` (cells outside the map are zeros). ``kernel=K`` gives that
form; it is the dot product of the two unfolded ``C*K*K`` patch vectors, which we scale
by ``1 / sqrt(C * K * K)`` (the usual scaled dot-product rule for vectors of that length,
so the logits keep the same spread as K grows). ``K = 1`` is exactly the code's form.

**Channel IA (CIA)** on the SIA output ``Z (B, C, HW)``: ``Cr = softmax over each row of
Z Z^T`` (C x C, no scaling, as the code), ``Y = Cr Z``, ``out = Z + BN(Y)``.

Both BNs start with weight = bias = 0, so a block is the identity at init and can go into
a pretrained backbone. Relations are computed in float32 with autocast disabled: the
unscaled ``Z Z^T`` of post-ReLU features easily exceeds the float16 range, and the softmax
of a 512 x 512 relation needs the precision. At 32x16 a relation is 512 x 512 per image
(1 MiB in fp32), so no chunking is needed at re-ID resolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IANET_STAGE_SIGMAS",
    "location_prior",
    "appearance_relation",
    "spatial_relation",
    "channel_relation",
    "SpatialIA",
    "ChannelIA",
    "IABlock",
]

#: ``(ax, ay)`` of the authors' code for the block after each stage (cells at 256x128).
IANET_STAGE_SIGMAS: dict[str, tuple[float, float]] = {"layer2": (10.0, 20.0), "layer3": (5.0, 10.0)}

IA_PARTS = ("ia", "sia", "cia")


def _no_autocast(device: torch.device):
    """A context that turns autocast off for ``device`` (no-op where autocast is unknown)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - device types without autocast support
        return torch.autocast(device_type="cpu", enabled=False)


# exp(-80) = 1.8e-35 is still a normal float32; exp(< -87.3) would be subnormal
_SOFTMAX_FLOOR = 80.0


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; on CPU, entries more than 80 below their row's maximum
    become exact zeros instead of subnormal numbers.

    Softmaxes of large unscaled logits (CIA's ``Z Z^T``) are mostly 0 with a tail of
    subnormals, and x86 CPUs compute with subnormals very slowly: the aggregation ``Cr Z``
    ran ~20x slower at 1024 channels, 16x8, batch 16 (measured). Each dropped entry is below 1.8e-35
    of its row's sum. GPUs do not have the problem, so the cut is skipped there.
    """
    if logits.device.type == "cpu":
        cutoff = logits.amax(dim=-1, keepdim=True) - _SOFTMAX_FLOOR
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits.softmax(dim=-1)


def location_prior(
    height: int,
    width: int,
    ax: float,
    ay: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The fixed Gaussian location relation ``L (HW, HW)``, float32, rows sum to 1.

    ``L[p, q] = softmax_q(-(x_q - x_p)^2 / (2 ax^2) - (y_q - y_p)^2 / (2 ay^2))`` with
    positions in row-major ``(h, w)`` order and ``x`` the column (width) index.
    """
    if ax <= 0 or ay <= 0:
        raise ValueError(f"location prior: ax and ay must be > 0, got ax={ax}, ay={ay}")
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    xs, ys = xs.flatten(), ys.flatten()
    logits = -((xs[None] - xs[:, None]) ** 2) / (2 * ax * ax) - (ys[None] - ys[:, None]) ** 2 / (
        2 * ay * ay
    )
    return logits.softmax(dim=-1)


def _check_kernel(kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"IA kernel must be a positive odd number (1, 3, 5...), got {kernel}")


def appearance_relation(x: torch.Tensor, kernel: int = 1) -> torch.Tensor:
    """``A (B, HW, HW)`` float32: softmax over ``q`` of the scaled (patch) dot products.

    ``kernel=1``: ``X_p . X_q / sqrt(C)``. ``kernel=K`` (odd): the sum over the K x K
    neighbourhood of ``p_{p,k} . p_{q,k}`` (zero padding), divided by ``sqrt(C K^2)``.
    """
    if x.dim() != 4:
        raise ValueError(f"appearance_relation: x must be (B, C, H, W), got {tuple(x.shape)}")
    _check_kernel(kernel)
    with _no_autocast(x.device):
        x = x.float()
        if kernel == 1:
            feats = x.flatten(2)  # (B, C, HW)
        else:
            feats = F.unfold(x, kernel_size=kernel, padding=kernel // 2)  # (B, C*K*K, HW)
        logits = torch.bmm(feats.transpose(1, 2), feats) / math.sqrt(feats.shape[1])
        return _softmax_rows(logits)


def spatial_relation(x: torch.Tensor, ax: float, ay: float, kernel: int = 1) -> torch.Tensor:
    """SIA relation ``R = softmax_q(L * A)`` of a feature map.

    Args:
        x: ``(B, C, H, W)`` features (any float dtype; computed in float32).
        ax, ay: location-prior widths in cells along the width (x) and height (y).
        kernel: odd neighbourhood size of the appearance relation (1 = the code's form).

    Returns:
        ``R (B, HW, HW)`` float32, rows summing to 1; ``R[b, p]`` is how much position
        ``p`` (row-major ``(h, w)``) aggregates from every position ``q``.
    """
    appearance = appearance_relation(x, kernel)
    prior = location_prior(x.shape[-2], x.shape[-1], ax, ay, device=x.device)
    with _no_autocast(x.device):
        return (prior * appearance).softmax(dim=-1)


def channel_relation(z: torch.Tensor) -> torch.Tensor:
    """CIA relation: ``softmax`` over each row of ``Z Z^T`` (no scaling).

    ``z``: ``(B, C, H, W)`` or ``(B, C, N)`` -> ``(B, C, C)`` float32, rows summing to 1.
    """
    if z.dim() not in (3, 4):
        raise ValueError(
            f"channel_relation: z must be (B, C, H, W) or (B, C, N), got {tuple(z.shape)}"
        )
    with _no_autocast(z.device):
        flat = z.float().flatten(2)
        return _softmax_rows(torch.bmm(flat, flat.transpose(1, 2)))


def _zero_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


class SpatialIA(nn.Module):
    """Spatial interaction-aggregation: ``out = X + BN(R X)`` (identity at init).

    Args:
        channels: ``C`` of the input.
        ax, ay: location-prior widths in cells (x along the width).
        kernel: odd K of the appearance relation's K x K neighbourhood (1 = the code).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``; any ``H, W`` (the prior is built for each input
    size, on the input's device). :meth:`relation` gives ``R (B, HW, HW)`` for visualisation.
    """

    def __init__(self, channels: int, ax: float, ay: float, kernel: int = 1) -> None:
        super().__init__()
        if ax <= 0 or ay <= 0:
            raise ValueError(f"SpatialIA: ax and ay must be > 0, got ax={ax}, ay={ay}")
        _check_kernel(kernel)
        self.channels = channels
        self.ax, self.ay, self.kernel = float(ax), float(ay), int(kernel)
        self.bn = _zero_bn(channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, ax={self.ax:g}, ay={self.ay:g}, kernel={self.kernel}"

    def relation(self, x: torch.Tensor) -> torch.Tensor:
        """``R (B, HW, HW)`` float32 of input ``x (B, C, H, W)``."""
        return spatial_relation(x, self.ax, self.ay, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"SpatialIA({self.channels}): expected (B, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        rel = self.relation(x)
        with _no_autocast(x.device):
            # Y_p = sum_q R[p, q] X_q, as (B, C, HW) = X (B, C, HW) @ R^T
            y = torch.bmm(x.float().flatten(2), rel.transpose(1, 2))
        return x + self.bn(y.view_as(x).to(x.dtype))


class ChannelIA(nn.Module):
    """Channel interaction-aggregation: ``out = Z + BN(Cr Z)`` (identity at init).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.bn = _zero_bn(channels)

    def extra_repr(self) -> str:
        return str(self.channels)

    def relation(self, z: torch.Tensor) -> torch.Tensor:
        """``Cr (B, C, C)`` float32 of input ``z (B, C, H, W)``."""
        return channel_relation(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.channels:
            raise ValueError(
                f"ChannelIA({self.channels}): expected (B, {self.channels}, H, W), got {tuple(z.shape)}"
            )
        rel = self.relation(z)
        with _no_autocast(z.device):
            y = torch.bmm(rel, z.float().flatten(2))  # (B, C, HW)
        return z + self.bn(y.view_as(z).to(z.dtype))


class IABlock(nn.Module):
    """An IA block: SIA then CIA on its output (``parts="ia"``), or one of them alone.

    Args:
        channels: ``C`` of the input map.
        ax, ay: SIA location-prior widths in cells (x along the width); see
            :data:`IANET_STAGE_SIGMAS` for the paper's values per stage.
        kernel: odd K of SIA's K x K appearance neighbourhood (1 = the authors' code).
        parts: ``"ia"`` (SIA + CIA), ``"sia"`` or ``"cia"`` (the slides' ablations).

    Attributes ``spatial`` / ``channel`` are the sub-blocks or ``None``. Identity at init.
    Shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        ax: float = 5.0,
        ay: float = 10.0,
        kernel: int = 1,
        parts: str = "ia",
    ) -> None:
        super().__init__()
        if parts not in IA_PARTS:
            raise ValueError(f"IABlock: parts must be one of {IA_PARTS}, got {parts!r}")
        self.parts = parts
        self.spatial = SpatialIA(channels, ax, ay, kernel) if parts in ("ia", "sia") else None
        self.channel = ChannelIA(channels) if parts in ("ia", "cia") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is not None:
            x = self.spatial(x)
        if self.channel is not None:
            x = self.channel(x)
        return x
