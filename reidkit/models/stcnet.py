"""STCnet: the spatial-temporal completion network of VRSTC (Hou et al., CVPR 2019).

VRSTC finds the occluded regions of a tracklet's frames and fills them in before re-ID.
There is no public code; the paper (as quoted in public reading notes, see
``docs/vrstc.md``) fixes the structure, this file the layers. Frames live in ``[-1, 1]``
(the generators end in ``tanh`` by default); ``M`` is the ``(B, 1, H, W)`` occlusion mask,
1 on pixels to complete.

- :class:`SpatialStructureGenerator` ``G_s``: encoder (with dilated convolutions) and
  decoder on the frame with its occluded pixels zeroed plus the mask;
  ``x1 = M * G_s((1 - M) * x, M) + (1 - M) * x``.
- :class:`TemporalAttentionGenerator` ``G_t``: three encoders of the same design (for
  ``x1`` and the previous / next unoccluded frames), :func:`temporal_attention` of the
  current frame's features against each adjacent frame's, a fusion and the decoder;
  ``x2 = M * G_t(x1, x_prev, x_next) + (1 - M) * x``.
- :class:`GlobalDiscriminator` (whole frame) and :class:`LocalDiscriminator` (the
  occluded region, masked or cropped): one real/fake logit per frame.
- :class:`STCNet` groups the four with generator / discriminator parameter lists.

Layer plan (``w`` = ``width``; the generative-inpainting coarse network of Yu et al. 2018,
which Iizuka et al.'s dilated encoder also follows): encoder ``conv5x5 w``, ``conv3x3/2 2w``,
``conv3x3 2w``, ``conv3x3/2 4w``, ``conv3x3 4w`` x2, then ``conv3x3 4w`` dilated by each of
``dilations`` (2, 4, 8, 16); decoder ``conv3x3 4w`` x2, up x2, ``conv3x3 2w`` x2, up x2,
``conv3x3 w``, ``conv3x3 w/2``, ``conv3x3 3``. ELU activations, no normalisation.
Discriminators: ``num_layers`` ``conv5x5/2`` with widths ``w, 2w, 4w, 4w, ...`` and
LeakyReLU(0.2), spatial mean, a linear layer to one logit (size-agnostic), optional
spectral norm. Frames need ``H`` and ``W`` divisible by 4.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "GlobalDiscriminator",
    "LocalDiscriminator",
    "STCDecoder",
    "STCEncoder",
    "STCNet",
    "SpatialStructureGenerator",
    "TemporalAttention",
    "TemporalAttentionGenerator",
    "crop_boxes",
    "mask_bounding_boxes",
    "rows_per_chunk",
    "temporal_attention",
]

Combine = Literal["concat", "mean", "joint"]
LocalRegion = Literal["masked", "crop"]

# Default budget for one chunk of temporal attention: entries of the (B, rows*W, K*N)
# similarity block (32 MB in float32; the softmax doubles it while it lives).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------- attention
def _inverse_patch_norms(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``1 / max(||patch||, 1e-12)`` of every zero-padded patch: ``(N, C, H, W) -> (N, H*W)``.

    A box filter over the squared feature norms, so the ``C * patch^2`` patch vectors are
    never normalised (copied) one by one; zero patches get a finite factor (cosine 0).
    """
    sq = x.pow(2).sum(dim=1, keepdim=True)
    box = F.avg_pool2d(sq, patch, stride=1, padding=patch // 2, count_include_pad=True)
    return (box * patch * patch).clamp(min=1e-24).rsqrt().flatten(1)


def _attend_rows(
    strip: torch.Tensor,
    inv_query: torch.Tensor,
    keys: torch.Tensor,
    inv_keys: torch.Tensor,
    values: torch.Tensor,
    patch: int,
    scale: float,
) -> torch.Tensor:
    """Attention for a strip of query rows.

    ``strip (B, C, rows + patch - 1, W + patch - 1)`` is the zero-padded current map around
    the rows, ``inv_query (B, rows * W)`` its patches' inverse norms; ``keys (B, C*patch^2,
    S)`` the adjacent map(s)' raw patches, ``inv_keys (B, S)`` their inverse norms, ``values
    (B, C, S)`` their centre vectors. Returns ``(B, C, rows * W)``.
    """
    queries = F.unfold(strip, kernel_size=patch) * (scale * inv_query).unsqueeze(1)
    logits = torch.bmm(queries.transpose(1, 2), keys) * inv_keys.unsqueeze(1)  # scale * cos
    weights = torch.softmax(logits, dim=-1)  # (B, q, S)
    return torch.bmm(values, weights.transpose(1, 2))  # (B, C, q)


def rows_per_chunk(batch: int, width: int, keys: int, max_elements: int) -> int:
    """Query rows per chunk so that ``batch * rows * width * keys <= max_elements`` (>= 1)."""
    return max(1, max_elements // max(1, batch * width * keys))


def temporal_attention(
    current: torch.Tensor,
    adjacent: torch.Tensor,
    patch: int = 3,
    scale: float = 10.0,
    chunk_rows: int | None = None,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    checkpoint: bool = False,
) -> torch.Tensor:
    """VRSTC's temporal attention: rebuild the current frame's features from an adjacent
    frame's, position by position.

    For positions ``a`` of the current map ``F`` and ``b`` of the adjacent map ``R``::

        s_ab = cos(patch_F(a), patch_R(b))          patch x patch patches, zero-padded
        w_ab = softmax_b(scale * s_ab)
        out[:, a] = sum_b w_ab * R[:, b]            (R's feature vector at b)

    Computed with ``unfold`` in float32 (float64 stays float64; AMP inputs are upcast and
    the result cast back), in strips of query rows so that a strip's similarity block
    stays under ``max_chunk_elements`` entries: the full ``HW x HW`` matrix is never held
    and patch vectors are never normalised one by one (their norms come from a box
    filter). For a 64x32 map with 128 channels and batch 8 (STCnet at 256x128, width 32)
    the forward peaks at ~0.22 GB against ~0.42 GB for the one-matrix form, forward +
    backward at ~0.68 GB against ~0.87 GB (``benchmarks/bench_temporal_attention.py``).
    With ``checkpoint`` (when an input requires grad) each strip is recomputed in the
    backward instead of keeping its ``(rows*W, HW)`` softmax (~0.56 GB there, twice the time).

    Args:
        current: ``(B, C, H, W)`` features of the frame to complete.
        adjacent: ``(B, C, H', W')`` features of one adjacent frame, or
            ``(B, K, C, H', W')`` for ``K`` frames attended jointly (one softmax over
            all ``K * H' * W'`` positions).
        patch: odd patch size (3 in the paper).
        scale: softmax temperature factor (10, contextual attention's).
        chunk_rows: query rows per strip; ``None`` derives it from ``max_chunk_elements``.
        max_chunk_elements: budget for one strip's similarity block.
        checkpoint: recompute strips in the backward (saves memory, costs a forward).

    Returns:
        ``(B, C, H, W)`` in the dtype of ``current``.
    """
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"temporal_attention: patch must be a positive odd size, got {patch}")
    if current.dim() != 4:
        raise ValueError(
            f"temporal_attention: current must be (B, C, H, W), got {tuple(current.shape)}"
        )
    if adjacent.dim() == 4:
        adjacent = adjacent.unsqueeze(1)
    if adjacent.dim() != 5 or adjacent.shape[0] != current.shape[0]:
        raise ValueError(
            "temporal_attention: adjacent must be (B, C, H, W) or (B, K, C, H, W) with the "
            f"batch size of current {tuple(current.shape)}, got {tuple(adjacent.shape)}"
        )
    if adjacent.shape[2] != current.shape[1]:
        raise ValueError(
            f"temporal_attention: channel mismatch, current has {current.shape[1]}, "
            f"adjacent has {adjacent.shape[2]}"
        )
    out_dtype = current.dtype
    cur = current if current.dtype in (torch.float32, torch.float64) else current.float()
    adj = adjacent.to(cur.dtype)
    b, c, h, w = cur.shape
    k, ha, wa = adj.shape[1], adj.shape[3], adj.shape[4]
    r = patch // 2
    with torch.autocast(device_type=cur.device.type, enabled=False):
        flat_adj = adj.flatten(0, 1)  # (B*K, C, H', W')
        keys = F.unfold(flat_adj, kernel_size=patch, padding=r)  # (B*K, Cpp, N')
        keys = keys.view(b, k, -1, ha * wa).permute(0, 2, 1, 3).reshape(b, -1, k * ha * wa)
        inv_keys = _inverse_patch_norms(flat_adj, patch).view(b, -1)  # (B, K*N')
        values = flat_adj.reshape(b, k, c, ha * wa).permute(0, 2, 1, 3).reshape(b, c, -1)
        inv_query = _inverse_patch_norms(cur, patch)  # (B, H*W)
        padded = F.pad(cur, (r, r, r, r))
        step = chunk_rows or rows_per_chunk(b, w, keys.shape[-1], max_chunk_elements)
        use_ckpt = (
            checkpoint and torch.is_grad_enabled() and (cur.requires_grad or adj.requires_grad)
        )
        outs = []
        for y0 in range(0, h, step):
            y1 = min(h, y0 + step)
            args = (padded[:, :, y0 : y1 + 2 * r], inv_query[:, y0 * w : y1 * w], keys, inv_keys)
            if use_ckpt:
                outs.append(
                    _checkpoint(_attend_rows, *args, values, patch, scale, use_reentrant=False)
                )
            else:
                outs.append(_attend_rows(*args, values, patch, scale))
        out = torch.cat(outs, dim=2).view(b, c, h, w)
    return out.to(out_dtype)


class TemporalAttention(nn.Module):
    """Module form of :func:`temporal_attention` (no parameters).

    Shape: ``(B, C, H, W), (B, C, H', W') or (B, K, C, H', W') -> (B, C, H, W)``.
    """

    def __init__(
        self,
        patch: int = 3,
        scale: float = 10.0,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if patch < 1 or patch % 2 == 0:
            raise ValueError(f"TemporalAttention: patch must be a positive odd size, got {patch}")
        self.patch = patch
        self.scale = scale
        self.max_chunk_elements = max_chunk_elements
        self.checkpoint = checkpoint

    def forward(self, current: torch.Tensor, adjacent: torch.Tensor) -> torch.Tensor:
        return temporal_attention(
            current,
            adjacent,
            patch=self.patch,
            scale=self.scale,
            max_chunk_elements=self.max_chunk_elements,
            checkpoint=self.checkpoint,
        )

    def extra_repr(self) -> str:
        return f"patch={self.patch}, scale={self.scale}, checkpoint={self.checkpoint}"


# ----------------------------------------------------------------------------- generators
def _conv(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, act: bool = True
) -> nn.Sequential:
    """Same-padded convolution (+ ELU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=dilation * (kernel - 1) // 2,
            dilation=dilation,
        )
    ]
    if act:
        layers.append(nn.ELU(inplace=True))
    return nn.Sequential(*layers)


def _check_frame(x: torch.Tensor, name: str, channels: int | None = 3) -> None:
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, C, H, W)"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.shape[-2] % 4 or x.shape[-1] % 4:
        raise ValueError(
            f"{name}: STCnet needs H and W divisible by 4 (two stride-2 stages), "
            f"got {x.shape[-2]}x{x.shape[-1]}"
        )


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"mask must be (B, 1, H, W) matching the frame {tuple(x.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.shape[0] != x.shape[0]:
        raise ValueError(f"mask batch {mask.shape[0]} != frame batch {x.shape[0]}")


class STCEncoder(nn.Module):
    """Encoder with dilated convolutions: ``(B, in_channels, H, W) -> (B, 4w, H/4, W/4)``.

    Args:
        in_channels: input channels (frame 3 + mask 1 for the current frame; 3 for an
            adjacent unoccluded frame).
        width: base width ``w``.
        dilations: rates of the dilated 3x3 convolutions at 1/4 resolution.
    """

    def __init__(
        self, in_channels: int, width: int = 32, dilations: Sequence[int] = (2, 4, 8, 16)
    ) -> None:
        super().__init__()
        if width < 2:
            raise ValueError(f"STCnet width must be >= 2, got {width}")
        w = width
        layers = [
            _conv(in_channels, w, 5),
            _conv(w, 2 * w, 3, stride=2),
            _conv(2 * w, 2 * w, 3),
            _conv(2 * w, 4 * w, 3, stride=2),
            _conv(4 * w, 4 * w, 3),
            _conv(4 * w, 4 * w, 3),
        ]
        layers += [_conv(4 * w, 4 * w, 3, dilation=int(d)) for d in dilations]
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class STCDecoder(nn.Module):
    """Decoder: ``(B, 4w, H/4, W/4) -> (B, 3, H, W)`` (nearest upsampling + convs).

    ``output_activation``: ``"tanh"`` (frames in ``[-1, 1]``) or ``"none"``.
    """

    def __init__(self, width: int = 32, output_activation: Literal["tanh", "none"] = "tanh"):
        super().__init__()
        if output_activation not in ("tanh", "none"):
            raise ValueError(
                f"output_activation must be 'tanh' or 'none', got {output_activation!r}"
            )
        w = width
        self.low = nn.Sequential(_conv(4 * w, 4 * w, 3), _conv(4 * w, 4 * w, 3))
        self.mid = nn.Sequential(_conv(4 * w, 2 * w, 3), _conv(2 * w, 2 * w, 3))
        self.high = nn.Sequential(
            _conv(2 * w, w, 3), _conv(w, max(1, w // 2), 3), _conv(max(1, w // 2), 3, 3, act=False)
        )
        self.output_activation = output_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.low(x)
        x = self.mid(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self.high(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return torch.tanh(x) if self.output_activation == "tanh" else x


class SpatialStructureGenerator(nn.Module):
    """``G_s``: a coarse completion from the frame's own visible pixels.

    ``forward(x, mask)`` returns ``x1 = M * G_s((1 - M) * x, M) + (1 - M) * x``; with
    ``return_raw=True`` also the raw generator output (the whole frame).

    Shape: ``x (B, 3, H, W)``, ``mask (B, 1, H, W)`` (1 = occluded) -> ``(B, 3, H, W)``.
    """

    def __init__(
        self,
        width: int = 32,
        dilations: Sequence[int] = (2, 4, 8, 16),
        output_activation: Literal["tanh", "none"] = "tanh",
    ) -> None:
        super().__init__()
        self.encoder = STCEncoder(4, width, dilations)
        self.decoder = STCDecoder(width, output_activation)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, return_raw: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _check_frame(x, "x")
        _check_mask(mask, x)
        visible = (1 - mask) * x
        raw = self.decoder(self.encoder(torch.cat([visible, mask], dim=1)))
        completed = mask * raw + visible
        return (completed, raw) if return_raw else completed


class TemporalAttentionGenerator(nn.Module):
    """``G_t``: refine the coarse completion with the adjacent unoccluded frames.

    Three encoders of :class:`STCEncoder`'s design: the current one takes ``x1`` and the
    mask (4 channels), the adjacent ones the previous / next frames (3 channels). The
    current features ``F`` attend to each adjacent frame's features; ``combine`` says how
    the two are merged before a 1x1 fusion convolution and the decoder:

    - ``"concat"`` (default): ``fuse([F, TA(F, R_prev), TA(F, R_next)])``.
    - ``"mean"``: ``fuse([F, (TA(F, R_prev) + TA(F, R_next)) / 2])``.
    - ``"joint"``: ``fuse([F, TA(F, [R_prev, R_next])])``, one softmax over both frames'
      positions.

    ``share_adjacent_encoder`` uses one encoder for both adjacent frames (default: three
    separate encoders, as the paper's "three encoders" reads). ``forward`` returns
    ``x2 = M * G_t(x1, x_prev, x_next) + (1 - M) * frame`` where ``frame`` is the original
    ``x`` (default ``x1``, the same thing for a binary mask).

    Shape: ``x1, x_prev, x_next (B, 3, H, W)``, ``mask (B, 1, H, W)`` -> ``(B, 3, H, W)``.
    """

    def __init__(
        self,
        width: int = 32,
        dilations: Sequence[int] = (2, 4, 8, 16),
        patch: int = 3,
        scale: float = 10.0,
        combine: Combine = "concat",
        share_adjacent_encoder: bool = False,
        output_activation: Literal["tanh", "none"] = "tanh",
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        checkpoint_attention: bool = False,
    ) -> None:
        super().__init__()
        if combine not in ("concat", "mean", "joint"):
            raise ValueError(f"combine must be 'concat', 'mean' or 'joint', got {combine!r}")
        self.combine = combine
        self.current_encoder = STCEncoder(4, width, dilations)
        self.prev_encoder = STCEncoder(3, width, dilations)
        self.next_encoder = (
            self.prev_encoder if share_adjacent_encoder else STCEncoder(3, width, dilations)
        )
        self.share_adjacent_encoder = share_adjacent_encoder
        self.attention = TemporalAttention(patch, scale, max_chunk_elements, checkpoint_attention)
        c = 4 * width
        self.fuse = _conv((3 if combine == "concat" else 2) * c, c, 1)
        self.decoder = STCDecoder(width, output_activation)

    def forward(
        self,
        x1: torch.Tensor,
        mask: torch.Tensor,
        x_prev: torch.Tensor,
        x_next: torch.Tensor,
        frame: torch.Tensor | None = None,
        return_raw: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        _check_frame(x1, "x1")
        _check_mask(mask, x1)
        for name, t in (("x_prev", x_prev), ("x_next", x_next), ("frame", frame)):
            if t is not None and t.shape != x1.shape:
                raise ValueError(
                    f"{name} must have the shape of x1 {tuple(x1.shape)}, got {tuple(t.shape)}"
                )
        feats = self.current_encoder(torch.cat([x1, mask], dim=1))
        r_prev = self.prev_encoder(x_prev)
        r_next = self.next_encoder(x_next)
        if self.combine == "joint":
            parts = [feats, self.attention(feats, torch.stack([r_prev, r_next], dim=1))]
        else:
            a_prev = self.attention(feats, r_prev)
            a_next = self.attention(feats, r_next)
            if self.combine == "concat":
                parts = [feats, a_prev, a_next]
            else:
                parts = [feats, 0.5 * (a_prev + a_next)]
        raw = self.decoder(self.fuse(torch.cat(parts, dim=1)))
        visible = (1 - mask) * (x1 if frame is None else frame)
        completed = mask * raw + visible
        return (completed, raw) if return_raw else completed


# ----------------------------------------------------------------------------- discriminators
class _ConvDiscriminator(nn.Module):
    """``num_layers`` x (conv5x5 stride 2 + LeakyReLU 0.2), spatial mean, linear -> logit."""

    def __init__(self, in_channels: int, width: int, num_layers: int, spectral_norm: bool) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"discriminator num_layers must be >= 1, got {num_layers}")
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        ch = in_channels
        for i in range(num_layers):
            out = width * min(2**i, 4)
            layers += [sn(nn.Conv2d(ch, out, 5, stride=2, padding=2)), nn.LeakyReLU(0.2, True)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = sn(nn.Linear(ch, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


class GlobalDiscriminator(_ConvDiscriminator):
    """Real/fake logit of a whole frame: ``(B, 3, H, W) -> (B,)``."""

    def __init__(self, width: int = 64, num_layers: int = 4, spectral_norm: bool = False) -> None:
        super().__init__(3, width, num_layers, spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_frame(x, "x")
        return self.logits(x)


def mask_bounding_boxes(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Pixel boxes ``(B, 4)`` = ``(top, bottom, left, right)`` (inclusive) of ``mask >
    threshold`` for ``(B, 1, H, W)`` masks; an empty mask gives the whole frame."""
    on = mask[:, 0] > threshold  # (B, H, W)
    rows, cols = on.any(dim=2), on.any(dim=1)
    h, w = on.shape[1:]

    def first_last(flags: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        present = flags.any(dim=1)
        first = flags.int().argmax(dim=1)
        last = size - 1 - flags.flip(1).int().argmax(dim=1)
        return (
            torch.where(present, first, torch.zeros_like(first)),
            torch.where(present, last, torch.full_like(last, size - 1)),
        )

    top, bottom = first_last(rows, h)
    left, right = first_last(cols, w)  # an empty mask has no row and no column: whole frame
    return torch.stack([top, bottom, left, right], dim=1)


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each ``x[i]`` to its inclusive pixel box ``boxes[i]`` = ``(top, bottom, left,
    right)`` and resize it bilinearly to ``size``: ``(B, C, H, W) -> (B, C, *size)``.

    Equal to ``F.interpolate(x[i:i+1, :, top:bottom+1, left:right+1], size, "bilinear",
    align_corners=False)`` for every ``i`` (sample points are clamped to the box, so no pixel
    outside it is read), in one batched, differentiable ``grid_sample``.
    """
    b, _, h, w = x.shape
    bx = boxes.to(device=x.device, dtype=x.dtype)

    def axis(first: torch.Tensor, last: torch.Tensor, n_out: int, n_full: int) -> torch.Tensor:
        n_in = last - first + 1  # (B,)
        j = torch.arange(n_out, device=x.device, dtype=x.dtype)
        pos = first[:, None] + (j[None] + 0.5) * (n_in[:, None] / n_out) - 0.5
        pos = torch.minimum(torch.maximum(pos, first[:, None]), last[:, None])
        return (2 * pos + 1) / n_full - 1  # pixel centre -> [-1, 1], align_corners=False

    ys = axis(bx[:, 0], bx[:, 1], size[0], h)  # (B, oh)
    xs = axis(bx[:, 2], bx[:, 3], size[1], w)  # (B, ow)
    grid = torch.stack(
        [xs[:, None, :].expand(b, size[0], size[1]), ys[:, :, None].expand(b, size[0], size[1])],
        dim=-1,
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class LocalDiscriminator(_ConvDiscriminator):
    """Real/fake logit of the occluded region: ``x (B, 3, H, W), mask (B, 1, H, W) -> (B,)``.

    ``region="masked"`` (default): the discriminator sees ``M * x`` at full size (the
    paper's local term on ``M * x``). ``region="crop"``: the bounding box of the mask,
    bilinearly resized to ``crop_size`` (default ``(H // 2, W)``; a horizontal band of a
    256x128 frame becomes 128x128), as in Iizuka et al.'s local discriminator; an empty
    mask crops the whole frame.
    """

    def __init__(
        self,
        width: int = 64,
        num_layers: int = 4,
        region: LocalRegion = "masked",
        crop_size: tuple[int, int] | None = None,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__(3, width, num_layers, spectral_norm)
        if region not in ("masked", "crop"):
            raise ValueError(
                f"LocalDiscriminator region must be 'masked' or 'crop', got {region!r}"
            )
        self.region = region
        self.crop_size = tuple(crop_size) if crop_size is not None else None

    def region_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The tensor the discriminator judges (``M * x`` or the resized crop)."""
        _check_frame(x, "x")
        _check_mask(mask, x)
        if self.region == "masked":
            return mask * x
        size = self.crop_size or (x.shape[-2] // 2, x.shape[-1])
        return crop_boxes(x, mask_bounding_boxes(mask), size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.logits(self.region_input(x, mask))


# ----------------------------------------------------------------------------- STCnet
class STCNet(nn.Module):
    """The four trainable parts of STCnet (the ID guider is the method's frozen re-ID net).

    ``forward(x, mask, x_prev, x_next) -> (x1, x2)``. The method owns the losses and the
    alternating updates: :meth:`generator_parameters` and
    :meth:`discriminator_parameters` give the two optimisers' parameters. The gradient
    of a loss on ``x2`` also reaches ``G_s`` through ``x1`` (pass ``detach_x1=True`` to
    train the two generators separately).

    Args:
        width: generator base width (32 at full size; 4-8 for CPU checks).
        disc_width: discriminator base width.
        dilations, patch, scale, combine, share_adjacent_encoder, output_activation:
            see the generator classes.
        disc_layers: stride-2 layers per discriminator.
        local_region, local_crop_size: see :class:`LocalDiscriminator`.
        spectral_norm: spectral normalisation in both discriminators.
        checkpoint_attention: recompute attention strips in the backward.
    """

    def __init__(
        self,
        width: int = 32,
        disc_width: int = 64,
        dilations: Sequence[int] = (2, 4, 8, 16),
        patch: int = 3,
        scale: float = 10.0,
        combine: Combine = "concat",
        share_adjacent_encoder: bool = False,
        output_activation: Literal["tanh", "none"] = "tanh",
        disc_layers: int = 4,
        local_region: LocalRegion = "masked",
        local_crop_size: tuple[int, int] | None = None,
        spectral_norm: bool = False,
        checkpoint_attention: bool = False,
    ) -> None:
        super().__init__()
        self.spatial = SpatialStructureGenerator(width, dilations, output_activation)
        self.temporal = TemporalAttentionGenerator(
            width,
            dilations,
            patch=patch,
            scale=scale,
            combine=combine,
            share_adjacent_encoder=share_adjacent_encoder,
            output_activation=output_activation,
            checkpoint_attention=checkpoint_attention,
        )
        self.global_disc = GlobalDiscriminator(disc_width, disc_layers, spectral_norm)
        self.local_disc = LocalDiscriminator(
            disc_width, disc_layers, local_region, local_crop_size, spectral_norm
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        x_prev: torch.Tensor,
        x_next: torch.Tensor,
        detach_x1: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.spatial(x, mask)
        x2 = self.temporal(x1.detach() if detach_x1 else x1, mask, x_prev, x_next, frame=x)
        return x1, x2

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.spatial.parameters()
        yield from self.temporal.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.global_disc.parameters()
        yield from self.local_disc.parameters()
