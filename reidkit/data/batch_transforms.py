"""The re-ID transforms run on whole batches on the training device, seeded per sample.

Per-sample transforms in loader workers cost about a millisecond per image on a CPU core;
a GPU training BoT / ResNet-50 at 256x128 eats thousands of images per second. So with
``device_transforms=True`` the loader workers only decode files to uint8 tensors and
*draw* each sample's random decisions (flip, crop offset, colour-jitter factors and order,
erasing box and noise) from its own generator, in exactly the order
:meth:`Compose.apply` draws them; keypoints are moved there too (a few numbers). The
pixels are then transformed for the whole batch at once, on any device, by
:class:`BatchTransform`:

====================  ====================================================================
``Resize``            one ``F.interpolate`` per distinct input size (antialiased bilinear;
                      on CPU the uint8 kernel of the per-sample path, so bit-identical)
``RandomHorizontalFlip`` + ``RandomPadCrop``  two gathers (rows, then mirrored / shifted
                      columns) and the pad fill
``ColorJitter``       three blend steps ``x * f + (1 - f) * G`` with per-sample factor ``f``
                      and ``G`` = 0 (brightness), mean grey (contrast) or grey (saturation)
``Normalize``         one multiply-add
``RandomErasing``     a box mask (``fill="random"`` pastes the worker-drawn noise)
====================  ====================================================================

On CPU the result equals the per-sample pipeline exactly except for colour jitter's
mean grey level (a float32 sum in another order: ~1e-7); on CUDA the resize kernel rounds
differently (at most one grey level before normalisation). ``tests/test_batch_transforms.py``
checks both against :meth:`Compose.apply` with the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .transforms import (
    ColorJitter,
    Compose,
    Normalize,
    RandomErasing,
    RandomHorizontalFlip,
    RandomPadCrop,
    Resize,
    Transform,
)

__all__ = ["BatchTransform", "NUM_PARAMS"]

# per-sample parameter vector (float64; integers are exact)
_FLIP, _CROP_I, _CROP_J = 0, 1, 2
_FACTORS = slice(3, 6)  # brightness, contrast, saturation factors
_ORDER = slice(6, 9)  # the op applied at step 0, 1, 2
_BOX = slice(9, 13)  # erasing (top, left, eh, ew); eh = 0: not erased
_CPU_CHUNK_PIXELS = 1 << 18  # output pixels per image group on the CPU (3 MB of float32)
#: Length of the parameter vector :meth:`BatchTransform.sample` returns.
NUM_PARAMS = 13

_ORDER_HELP = (
    "[Resize] -> [RandomHorizontalFlip] -> [RandomPadCrop] -> [ColorJitter] -> Normalize -> "
    "[RandomErasing]"
)


class BatchTransform:
    """A :class:`Compose` of reidkit's standard transforms, split into a per-sample draw
    (:meth:`sample`, in loader workers) and a batched application (:meth:`__call__`).

    Supported pipelines (what :func:`build_train_transforms` and
    :func:`build_test_transforms` build): ``[Resize] -> [RandomHorizontalFlip] ->
    [RandomPadCrop] -> [ColorJitter] -> Normalize -> [RandomErasing]``.

    Args:
        transform: the per-sample pipeline this reproduces.

    Raises:
        ValueError: for other pipelines (naming the expected order).
    """

    def __init__(self, transform: Transform | None) -> None:
        steps = list(transform.transforms) if isinstance(transform, Compose) else []
        kinds: list[type] = [
            Resize,
            RandomHorizontalFlip,
            RandomPadCrop,
            ColorJitter,
            Normalize,
            RandomErasing,
        ]
        found: dict[type, Any] = {}
        at = 0
        for step in steps:
            while at < len(kinds) and type(step) is not kinds[at]:
                at += 1
            if at == len(kinds):
                raise ValueError(
                    f"device_transforms supports the pipeline {_ORDER_HELP}; got {transform!r}"
                )
            found[kinds[at]] = step
            at += 1
        if Normalize not in found:
            raise ValueError(
                f"device_transforms needs a pipeline ending in Normalize ({_ORDER_HELP}); "
                f"got {transform!r}"
            )
        self.transform = transform
        self.resize: Resize | None = found.get(Resize)
        self.flip: RandomHorizontalFlip | None = found.get(RandomHorizontalFlip)
        self.crop: RandomPadCrop | None = found.get(RandomPadCrop)
        jitter = found.get(ColorJitter)
        self.jitter: ColorJitter | None = jitter if jitter is not None and jitter.active else None
        self.normalize: Normalize = found[Normalize]
        self.erasing: RandomErasing | None = found.get(RandomErasing)
        if self.resize is not None and self.resize.keep_pil:
            raise ValueError("device_transforms: Resize(keep_pil=True) is a per-sample option")

    # ------------------------------------------------------------------ per sample
    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` of the result for an input of ``size = (h, w)``."""
        if self.resize is not None:
            size = self.resize.size
        if self.crop is not None and self.crop.size is not None:
            size = self.crop.size
        return size

    def sample(
        self,
        size: tuple[int, int],
        keypoints: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Draw one sample's random decisions, exactly as :meth:`Compose.apply` would.

        Args:
            size: ``(h, w)`` of the decoded image.
            keypoints: ``(K, 3)`` keypoints of the decoded image, or None.
            generator: the sample's generator.

        Returns:
            ``(params, keypoints, noise)``: ``(NUM_PARAMS,)`` float64 parameters, the
            keypoints moved by the geometric transforms (a new tensor), and the flattened
            erasing noise for ``fill="random"`` (else None).
        """
        p = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]
        if keypoints is not None:
            keypoints = keypoints.to(torch.float32).clone()
        h, w = size
        if self.resize is not None:
            keypoints = self.resize.move_keypoints(keypoints, (h, w))
            h, w = self.resize.size
        if self.flip is not None and self.flip.draw(generator):
            p[_FLIP] = 1.0
            keypoints = self.flip.move_keypoints(keypoints, w)
        if self.crop is not None:
            out_size = self.crop.size or (h, w)
            if self.crop.pad == 0 and out_size == (h, w):
                i = j = 0
            else:
                i, j = self.crop.offsets(h, w, generator)
                keypoints = self.crop.move_keypoints(keypoints, (i, j), out_size)
            p[_CROP_I], p[_CROP_J] = float(i), float(j)
            h, w = out_size
        if self.jitter is not None:
            factors, order = self.jitter.draw(generator)
            p[_FACTORS] = factors
            p[_ORDER] = [float(k) for k in order]
        noise = None
        if self.erasing is not None:
            box = self.erasing.sample_box(h, w, generator)
            if box is not None:
                p[_BOX] = [float(v) for v in box]
                if self.erasing.fill == "random":
                    noise = self.erasing.draw_noise(box, 3, generator).view(-1)
        return torch.tensor(p, dtype=torch.float64), keypoints, noise

    # ------------------------------------------------------------------- batched
    def __call__(
        self,
        images: Tensor | Sequence[Tensor],
        params: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Transform a batch on the device of ``params``.

        Args:
            images: ``(B, 3, h, w)`` uint8, or a list of ``(3, h_i, w_i)`` uint8 tensors
                (mixed sizes: resized group by group). Not modified.
            params: ``(B, NUM_PARAMS)`` rows of :meth:`sample`.
            noise: concatenated ``noise`` of the erased samples (``fill="random"``).

        Returns:
            ``(B, 3, H, W)`` float32, normalised (and erased).
        """
        dev = params.device
        count = images.shape[0] if isinstance(images, Tensor) else len(images)
        if params.shape != (count, NUM_PARAMS):
            raise ValueError(
                f"params must have shape ({count}, {NUM_PARAMS}) for {count} images, got "
                f"{tuple(params.shape)}"
            )
        x, owned = self._resized(images, dev)  # (B, 3, H, W) uint8
        out_h, out_w = self.output_size(tuple(x.shape[-2:]))
        if len(self.normalize.mean) != 3:
            raise ValueError(f"Normalize: expected 3 channels, got mean {self.normalize.mean}")
        out = torch.empty((count, 3, out_h, out_w), dtype=torch.float32, device=dev)
        # on the CPU, a few images at a time: every step then works in the cache
        step = count if dev.type != "cpu" else max(1, _CPU_CHUNK_PIXELS // (out_h * out_w))
        offsets = self._noise_offsets(params)
        for s in range(0, count, step):
            e = min(count, s + step)
            chunk_noise = None
            if noise is not None and offsets is not None:
                chunk_noise = noise[int(offsets[s]) : int(offsets[e])]
            self._apply(x[s:e], params[s:e], chunk_noise, out[s:e], owned)
        return out

    def _noise_offsets(self, params: Tensor) -> Tensor | None:
        """Start of each sample's noise in the concatenated ``noise`` (``(B + 1,)``)."""
        if self.erasing is None or self.erasing.fill != "random":
            return None
        sizes = 3 * params[:, 11].long() * params[:, 12].long()  # 3 * eh * ew (0: not erased)
        return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).cpu()

    def _apply(
        self, x: Tensor, params: Tensor, noise: Tensor | None, out: Tensor, owned: bool
    ) -> None:
        y = self._geometric(x, params, owned)  # uint8
        dev = out.device
        # per channel (1, 3, 1, 1): a (3, 1, 1) operand takes a slow broadcast in 4-D
        if self.jitter is not None:
            z = self._jitter(y.float().div_(255.0), params)
            torch.mul(z, self.normalize._scale_f.to(dev).view(1, 3, 1, 1), out=out)
        else:  # float(x) * scale, as the per-sample Normalize computes from uint8
            out.copy_(y).mul_(self.normalize._scale_u8.to(dev).view(1, 3, 1, 1))
        out.add_(self.normalize._shift.to(dev).view(1, 3, 1, 1))
        if self.erasing is not None:
            self.erasing.erase_batch(out, params[:, _BOX].long(), noise=noise)

    def _resized(self, images: Tensor | Sequence[Tensor], dev: torch.device) -> tuple[Tensor, bool]:
        """``(uint8 (B, 3, H, W) on dev, whether it is a new tensor)``; groups of equal
        input size are resized at once."""
        if isinstance(images, Tensor):
            x = images.to(dev, non_blocking=True)
            self._check_uint8(x)
            y = self._resize(x)
            return y, y is not images
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, im in enumerate(images):
            by_size.setdefault(tuple(im.shape), []).append(k)
        out = None
        for idx in by_size.values():
            x = torch.stack([images[k] for k in idx]).to(dev, non_blocking=True)
            self._check_uint8(x)
            y = self._resize(x)
            if out is None:
                out = y.new_empty((len(images), *y.shape[1:]))
            elif y.shape[1:] != out.shape[1:]:
                raise ValueError(
                    "images of different sizes need a Resize first in the pipeline, got "
                    f"{tuple(out.shape[2:])} and {tuple(y.shape[2:])}"
                )
            out[torch.tensor(idx, device=dev)] = y
        assert out is not None
        return out, True

    @staticmethod
    def _check_uint8(x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
            raise ValueError(
                f"images must be (B, 3, h, w) uint8 (decoded RGB), got {tuple(x.shape)} {x.dtype}"
            )

    def _resize(self, x: Tensor) -> Tensor:
        if self.resize is None or tuple(x.shape[-2:]) == self.resize.size:
            return x
        if x.device.type == "cpu":  # the per-sample path's uint8 kernel: identical pixels
            return F.interpolate(
                x, size=self.resize.size, mode="bilinear", align_corners=False, antialias=True
            )
        y = F.interpolate(
            x.float(), size=self.resize.size, mode="bilinear", align_corners=False, antialias=True
        )
        return y.round_().clamp_(0.0, 255.0).to(torch.uint8)  # what a uint8 image holds

    def _geometric(self, x: Tensor, params: Tensor, owned: bool) -> Tensor:
        """Flip (the mirrored samples only), then pad and crop: the crop of each sample is
        one window of the padded batch, picked by indexing a strided view of all windows."""
        if self.flip is not None:
            flipped = (params[:, _FLIP] > 0).nonzero().view(-1)
            if flipped.numel():
                if not owned:
                    x = x.clone()  # never modify the caller's batch
                x[flipped] = x[flipped].flip(-1)
        if self.crop is None:
            return x
        b, _, h, w = x.shape
        out_h, out_w = self.crop.size or (h, w)
        pad = self.crop.pad
        if pad == 0 and (out_h, out_w) == (h, w):
            return x
        padded = F.pad(x, (pad, pad, pad, pad), value=float(self.crop.fill))
        windows = padded.unfold(2, out_h, 1).unfold(3, out_w, 1)  # (B, C, i, j, out_h, out_w)
        i, j = params[:, _CROP_I].long(), params[:, _CROP_J].long()
        return windows[torch.arange(b, device=x.device), :, i, j]

    @staticmethod
    def _gray(x: Tensor) -> Tensor:
        return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]

    def _jitter(self, x: Tensor, params: Tensor) -> Tensor:
        """Per-sample brightness / contrast / saturation in per-sample order, on [0, 1]."""
        factors = params[:, _FACTORS]
        order = params[:, _ORDER].long()
        for step in range(3):
            op = order[:, step]
            f64 = factors.gather(1, op[:, None])[:, 0]
            # a strength of 0 is skipped per sample: factor 1 and no blend leave x as is
            f = f64.float().view(-1, 1, 1, 1)
            g = (1.0 - f64).float().view(-1, 1, 1, 1)
            gray = self._gray(x)
            mean = gray.mean(dim=(2, 3), keepdim=True)
            target = torch.where(
                (op == 2).view(-1, 1, 1, 1),
                gray,
                torch.where((op == 1).view(-1, 1, 1, 1), mean, torch.zeros_like(mean)),
            )
            x = (x * f).add_(g * target).clamp_(0.0, 1.0)
        return x
