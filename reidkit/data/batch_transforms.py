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
        p = torch.zeros(NUM_PARAMS, dtype=torch.float64)
        p[_FACTORS] = 1.0
        p[_ORDER] = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
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
            p[_FACTORS] = torch.tensor(factors, dtype=torch.float64)
            p[_ORDER] = torch.tensor(order, dtype=torch.float64)
        noise = None
        if self.erasing is not None:
            box = self.erasing.sample_box(h, w, generator)
            if box is not None:
                p[_BOX] = torch.tensor(box, dtype=torch.float64)
                if self.erasing.fill == "random":
                    noise = self.erasing.draw_noise(box, 3, generator).view(-1)
        return p, keypoints, noise

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
                (mixed sizes: resized group by group).
            params: ``(B, NUM_PARAMS)`` rows of :meth:`sample`.
            noise: concatenated ``noise`` of the erased samples (``fill="random"``).

        Returns:
            ``(B, 3, H, W)`` float32, normalised (and erased).
        """
        dev = params.device
        x = self._resized(images, dev)  # (B, 3, H, W) float32 holding integers 0..255
        b = x.shape[0]
        if params.shape != (b, NUM_PARAMS):
            raise ValueError(
                f"params must have shape ({b}, {NUM_PARAMS}) for {b} images, got "
                f"{tuple(params.shape)}"
            )
        x = self._geometric(x, params)
        if self.jitter is not None:
            x = self._jitter(x.div_(255.0), params)
            scale = self.normalize._scale_f.to(dev)
        else:
            scale = self.normalize._scale_u8.to(dev)
        if x.shape[1] != len(self.normalize.mean):
            raise ValueError(
                f"Normalize: expected {len(self.normalize.mean)} channels, got shape "
                f"{tuple(x.shape)}"
            )
        x = x.mul_(scale).add_(self.normalize._shift.to(dev))
        if self.erasing is not None:
            boxes = params[:, _BOX].long()
            x = self.erasing.erase_batch(x, boxes, noise=noise)
        return x

    def _resized(self, images: Tensor | Sequence[Tensor], dev: torch.device) -> Tensor:
        """Resize (if any) and convert to float32; groups of equal input size at once."""
        if isinstance(images, Tensor):
            groups = [(images.to(dev, non_blocking=True), None)]
            count = images.shape[0]
        else:
            count = len(images)
            by_size: dict[tuple[int, ...], list[int]] = {}
            for k, im in enumerate(images):
                by_size.setdefault(tuple(im.shape), []).append(k)
            groups = [
                (
                    torch.stack([images[k] for k in idx]).to(dev, non_blocking=True),
                    torch.tensor(idx, device=dev),
                )
                for idx in by_size.values()
            ]
        out = None
        for x, idx in groups:
            if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
                raise ValueError(
                    f"images must be (B, 3, h, w) uint8 (decoded RGB), got {tuple(x.shape)} "
                    f"{x.dtype}"
                )
            y = self._resize(x)
            if idx is None:
                return y
            if out is None:
                out = y.new_empty((count, *y.shape[1:]))
            elif y.shape[1:] != out.shape[1:]:
                raise ValueError(
                    "images of different sizes need a Resize first in the pipeline, got "
                    f"{tuple(out.shape[2:])} and {tuple(y.shape[2:])}"
                )
            out[idx] = y
        assert out is not None
        return out

    def _resize(self, x: Tensor) -> Tensor:
        if self.resize is None or tuple(x.shape[-2:]) == self.resize.size:
            return x.float()
        if x.device.type == "cpu":  # the per-sample path's uint8 kernel: identical pixels
            y = F.interpolate(
                x, size=self.resize.size, mode="bilinear", align_corners=False, antialias=True
            )
            return y.float()
        y = F.interpolate(
            x.float(), size=self.resize.size, mode="bilinear", align_corners=False, antialias=True
        )
        return y.round_().clamp_(0.0, 255.0)  # what a uint8 image would hold

    def _geometric(self, x: Tensor, params: Tensor) -> Tensor:
        """Flip then pad-and-crop, as two gathers (rows, then columns) and the pad fill."""
        flip = params[:, _FLIP] > 0
        if self.crop is None:
            if self.flip is None or not bool(flip.any()):
                return x
            return torch.where(flip[:, None, None, None], x.flip(-1), x)
        b, c, h, w = x.shape
        out_h, out_w = self.crop.size or (h, w)
        dev = x.device
        pad = self.crop.pad
        # output pixel (y, x) comes from (y + i - pad, x + j - pad) of the flipped image
        rows = torch.arange(out_h, device=dev) + (params[:, _CROP_I].long() - pad)[:, None]
        cols = torch.arange(out_w, device=dev) + (params[:, _CROP_J].long() - pad)[:, None]
        ok_r = (rows >= 0) & (rows < h)
        ok_c = (cols >= 0) & (cols < w)
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
        rows = rows.clamp(0, h - 1)[:, None, :, None].expand(b, c, out_h, w)
        cols = cols.clamp(0, w - 1)[:, None, None, :].expand(b, c, out_h, out_w)
        y = x.gather(2, rows).gather(3, cols)
        inside = ok_r[:, None, :, None] & ok_c[:, None, None, :]
        return torch.where(inside, y, torch.tensor(float(self.crop.fill), device=dev))

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
