"""Non-local blocks (Wang et al., CVPR 2018).

- :class:`NonLocalBlock`: dot-product form, per image, as used by AGW (Ye et al., 2021).
- :class:`SpaceTimeNonLocalBlock`: embedded-Gaussian form over a clip's frames, as used by
  TKP's video network (documented in the class).

**NonLocalBlock** (AGW).

For an input map ``x`` with ``N = H * W`` positions::

    f(i, j) = theta(x_i)^T phi(x_j) / N          (dot-product affinity, no softmax)
    y_i     = sum_j f(i, j) g(x_j)
    z       = x + W(y)                            W = 1x1 conv + BatchNorm2d

``theta``, ``phi``, ``g`` are 1x1 convolutions to ``inner_channels`` channels. The BN of
``W`` has weight and bias initialised to zero, so the block is the identity at init and
can be inserted into a pretrained backbone. The AGW public code uses a single inner
channel; that is the default here.

Because the affinity has no softmax, ``y = theta^T (phi g^T) / N`` is computed with the
associativity trick: ``O(N * C_inner^2)`` time and memory instead of the ``O(N^2)``
affinity matrix, with identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NonLocalBlock", "SpaceTimeNonLocalBlock", "set_num_frames"]


class NonLocalBlock(nn.Module):
    """Residual dot-product non-local block.

    Args:
        in_channels: channels ``C`` of the input map.
        inner_channels: bottleneck width of theta/phi/g; ``None`` means ``C // 2``
            (the non-local paper's choice). Default 1 (AGW's public code).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, in_channels: int, inner_channels: int | None = 1) -> None:
        super().__init__()
        if inner_channels is None:
            inner_channels = max(1, in_channels // 2)
        if inner_channels < 1:
            raise ValueError(f"non-local inner_channels must be >= 1, got {inner_channels}")
        self.in_channels = in_channels
        self.inner_channels = inner_channels
        self.g = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.theta = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.W = nn.Sequential(
            nn.Conv2d(inner_channels, in_channels, kernel_size=1),
            nn.BatchNorm2d(in_channels),
        )
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        g = self.g(x).flatten(2)  # (B, Ci, N)
        theta = self.theta(x).flatten(2)  # (B, Ci, N)
        phi = self.phi(x).flatten(2)  # (B, Ci, N)
        # y[:, :, i] = sum_j (theta_i . phi_j / N) g_j  ==  ((g phi^T) theta) / N
        y = torch.bmm(torch.bmm(g, phi.transpose(1, 2)), theta) / n  # (B, Ci, N)
        y = y.view(b, self.inner_channels, h, w)
        return x + self.W(y)


class SpaceTimeNonLocalBlock(nn.Module):
    """Residual embedded-Gaussian non-local block over a clip's space-time volume (TKP).

    The video network of TKP (Gu et al., ICCV 2019; authors' public code) inserts these
    after ResNet-50 blocks ``layer2[1, 3]`` and ``layer3[1, 3, 5]`` (0-based). For a clip of
    ``T`` frames with ``P = T * H * W`` positions::

        f(i, j) = softmax_j( theta(x_i)^T phi(x_j) )       (no 1/sqrt(d) scaling)
        y_i     = sum_j f(i, j) g(x_j)
        z       = x + W(y)                                  W = 1x1 conv + BatchNorm

    ``theta``, ``phi``, ``g`` are 1x1 convolutions to ``inner_channels`` (``C // 2``);
    with ``sub_sample`` the ``phi`` and ``g`` maps are 2x2 max-pooled in space only, frame
    by frame (the code's ``MaxPool3d((1, 2, 2))``), so every position attends to the
    ``T * (H/2) * (W/2)`` pooled positions of *all* frames of its clip. A spatial side of
    size 1 is not pooled (the code would fail there; it only matters for tiny test inputs).
    Convolutions are initialised ``N(0, sqrt(2 / out_channels))`` as in the code; the BN of
    ``W`` starts at weight = bias = 0, so the block is the identity at init.

    **Frames.** Inside a 2-D backbone the block sees ``(B * T, C, H, W)``: the frames of a
    clip are consecutive (``clips.flatten(0, 1)``, index ``b * T + t``). ``T`` comes from,
    in this order: the ``num_frames`` argument of :meth:`forward`, the ``num_frames``
    attribute (set it with :func:`set_num_frames` before running the backbone, since
    blocks inserted into a ``Sequential`` only receive ``x``), or a 5-D input
    ``(B, T, C, H, W)``, which is returned in the same shape. A 4-D input with no ``T``
    known is refused rather than silently treated as single frames; set ``num_frames=1``
    for per-image attention.

    Args:
        in_channels: channels ``C`` of the input map.
        inner_channels: bottleneck width; ``None`` means ``C // 2`` (at least 1).
        sub_sample: max-pool ``phi`` and ``g`` 2x2 in space (the code's default).
        num_frames: initial value of the ``num_frames`` attribute.

    Shape: ``(B*T, C, H, W) -> (B*T, C, H, W)`` or ``(B, T, C, H, W) -> (B, T, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: int | None = None,
        sub_sample: bool = True,
        num_frames: int | None = None,
    ) -> None:
        super().__init__()
        if inner_channels is None:
            inner_channels = max(1, in_channels // 2)
        if inner_channels < 1:
            raise ValueError(f"non-local inner_channels must be >= 1, got {inner_channels}")
        self.in_channels = in_channels
        self.inner_channels = inner_channels
        self.sub_sample = sub_sample
        self.num_frames = num_frames
        self.theta = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.g = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.W = nn.Sequential(
            nn.Conv2d(inner_channels, in_channels, kernel_size=1),
            nn.BatchNorm2d(in_channels),
        )
        for conv in (self.theta, self.phi, self.g, self.W[0]):
            nn.init.normal_(conv.weight, 0.0, (2.0 / conv.out_channels) ** 0.5)
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sub_sample:
            return x
        kh, kw = min(2, x.shape[-2]), min(2, x.shape[-1])
        if kh == kw == 1:
            return x
        return F.max_pool2d(x, kernel_size=(kh, kw))

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        clip_input = x.dim() == 5
        if clip_input:
            b, t = x.shape[:2]
            if num_frames is not None and num_frames != t:
                raise ValueError(f"num_frames={num_frames} but the clip input has T={t}")
            x = x.flatten(0, 1)
        elif x.dim() == 4:
            t = num_frames if num_frames is not None else self.num_frames
            if t is None:
                raise ValueError(
                    "SpaceTimeNonLocalBlock got a (B*T, C, H, W) input but does not know T: "
                    "call reidkit.models.non_local.set_num_frames(model, T) before the "
                    "forward (num_frames=1 for single images), or pass a (B, T, C, H, W) input"
                )
            if t < 1 or x.shape[0] % t:
                raise ValueError(
                    f"SpaceTimeNonLocalBlock: batch dimension {x.shape[0]} is not a multiple "
                    f"of num_frames={t} (expected (B*T, C, H, W) with the frames of a clip "
                    "consecutive)"
                )
            b = x.shape[0] // t
        else:
            raise ValueError(
                f"SpaceTimeNonLocalBlock expects (B*T, C, H, W) or (B, T, C, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        _, _, h, w = x.shape
        ci = self.inner_channels
        # (B*T, Ci, h, w) -> (B, T*h*w, Ci): one token sequence per clip, frames in order.
        theta = self.theta(x).view(b, t, ci, h * w).permute(0, 1, 3, 2).reshape(b, -1, ci)
        phi = self._pool(self.phi(x))
        g = self._pool(self.g(x))
        hp, wp = phi.shape[-2:]
        phi = phi.view(b, t, ci, hp * wp).permute(0, 1, 3, 2).reshape(b, -1, ci)
        g = g.view(b, t, ci, hp * wp).permute(0, 1, 3, 2).reshape(b, -1, ci)
        # softmax(theta phi^T) g, unscaled as in the code; SDPA picks a fused kernel on GPU.
        y = F.scaled_dot_product_attention(theta, phi, g, scale=1.0)
        y = y.view(b, t, h, w, ci).permute(0, 1, 4, 2, 3).reshape(b * t, ci, h, w)
        z = x + self.W(y)
        return z.view(b, t, *z.shape[1:]) if clip_input else z


def set_num_frames(module: nn.Module, num_frames: int | None) -> int:
    """Set ``num_frames`` on every :class:`SpaceTimeNonLocalBlock` inside ``module``.

    A video network calls this before running a 2-D backbone on ``clips.flatten(0, 1)``.
    Returns the number of blocks updated.
    """
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    count = 0
    for m in module.modules():
        if isinstance(m, SpaceTimeNonLocalBlock):
            m.num_frames = num_frames
            count += 1
    return count
