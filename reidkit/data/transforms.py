"""Image (and keypoint) transforms for re-ID training and testing, without torchvision.

Every transform works on a PIL image or a ``(3, H, W)`` tensor (``uint8`` in [0, 255] or
``float``) and, optionally, on COCO-17 keypoints, a ``(17, 3)`` float tensor of
``(x, y, visibility)`` in *continuous pixel coordinates* of the current image (pixel
``(i, j)`` covers ``[j, j+1) x [i, i+1)``, so its centre is ``(j + 0.5, i + 0.5)``).
Geometric transforms move the keypoints with the pixels; a keypoint that leaves the image
gets visibility 0 (its coordinates are kept).

Randomness comes only from the explicit ``torch.Generator`` passed in, so a sample's
augmentation is fixed by the seed of its generator (the loader seeds one generator per
sample from ``(seed, epoch, position)``); ``generator=None`` falls back to torch's global RNG.

Two call styles::

    img = transform(pil_image, generator=g)                 # image only -> Tensor
    img, kpts = transform.apply(pil_image, kpts, g)         # image + keypoints

The training pipeline (BoT / fast-reid order) is ``Resize -> RandomHorizontalFlip ->
RandomPadCrop -> [ColorJitter] -> Normalize -> RandomErasing``; the fast path keeps the
image ``uint8`` until ``Normalize`` (one fused scale-and-shift to float).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "COCO_FLIP_PAIRS",
    "COCO_FLIP_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Transform",
    "Compose",
    "Resize",
    "RandomHorizontalFlip",
    "RandomPadCrop",
    "ColorJitter",
    "ToTensor",
    "Normalize",
    "RandomErasing",
    "to_uint8_tensor",
    "image_size",
    "flip_keypoints",
    "build_train_transforms",
    "build_test_transforms",
]

ImageLike = Image.Image | Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Left/right keypoint pairs of COCO-17 (eyes, ears, shoulders, elbows, wrists, hips,
#: knees, ankles); odd indices are the person's left side.
COCO_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (3, 4),
    (5, 6),
    (7, 8),
    (9, 10),
    (11, 12),
    (13, 14),
    (15, 16),
)


def _flip_index(num: int = 17) -> list[int]:
    index = list(range(num))
    for a, b in COCO_FLIP_PAIRS:
        index[a], index[b] = b, a
    return index


#: ``kpts[COCO_FLIP_INDEX]`` swaps the left and right keypoints of a mirrored person.
COCO_FLIP_INDEX: list[int] = _flip_index()


def flip_keypoints(keypoints: Tensor, width: int) -> Tensor:
    """Keypoints ``(..., 17, 3)`` of an image mirrored left-right: ``x -> W - x`` and the
    COCO left/right indices swapped (a new tensor; visibility is kept)."""
    out = keypoints[..., COCO_FLIP_INDEX, :].clone()
    out[..., 0] = width - out[..., 0]
    return out


# ----------------------------------------------------------------------------- helpers
def image_size(img: ImageLike) -> tuple[int, int]:
    """``(H, W)`` of a PIL image or a ``(..., H, W)`` tensor."""
    if isinstance(img, Image.Image):
        return img.height, img.width
    if isinstance(img, Tensor):
        if img.dim() < 2:
            raise ValueError(f"expected an image tensor (C, H, W), got shape {tuple(img.shape)}")
        return int(img.shape[-2]), int(img.shape[-1])
    raise TypeError(f"expected a PIL image or a torch.Tensor, got {type(img).__name__}")


def to_uint8_tensor(img: ImageLike) -> Tensor:
    """PIL image -> ``(3, H, W)`` uint8 tensor (RGB); tensors are returned unchanged.

    The result is a channels-first view of a fresh contiguous ``(H, W, 3)`` buffer.
    """
    if isinstance(img, Tensor):
        return img
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8, copy=True)  # (H, W, 3), writable
    return torch.from_numpy(arr).permute(2, 0, 1)


def _rand(generator: torch.Generator | None, n: int = 1) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _randint(generator: torch.Generator | None, high: int) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _check_keypoints(keypoints: Tensor | None) -> None:
    if keypoints is not None and (keypoints.dim() != 2 or keypoints.shape[1] != 3):
        raise ValueError(
            f"keypoints must have shape (K, 3) = (x, y, v), got {tuple(keypoints.shape)}"
        )


def _hide_outside(keypoints: Tensor, height: int, width: int) -> Tensor:
    """Set visibility 0 for keypoints outside ``[0, W) x [0, H)``."""
    x, y = keypoints[:, 0], keypoints[:, 1]
    outside = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    keypoints[:, 2] = torch.where(outside, torch.zeros_like(keypoints[:, 2]), keypoints[:, 2])
    return keypoints


# -------------------------------------------------------------------------- transforms
class Transform:
    """Base class: subclasses implement :meth:`apply`."""

    def apply(
        self,
        img: ImageLike,
        keypoints: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[ImageLike, Tensor | None]:
        """Transform the image and (optionally) its ``(17, 3)`` keypoints together."""
        raise NotImplementedError

    def __call__(self, img: ImageLike, generator: torch.Generator | None = None) -> Any:
        return self.apply(img, None, generator)[0]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Compose(Transform):
    """Apply transforms in order; the same generator is threaded through all of them."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def apply(
        self,
        img: ImageLike,
        keypoints: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[ImageLike, Tensor | None]:
        _check_keypoints(keypoints)
        if keypoints is not None:
            keypoints = keypoints.to(torch.float32).clone()
        for t in self.transforms:
            img, keypoints = t.apply(img, keypoints, generator)
        return img, keypoints

    def __repr__(self) -> str:
        inner = "".join(f"\n  {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class Resize(Transform):
    """Bilinear resize to ``size = (H, W)`` (antialiased when shrinking), output a tensor.

    PIL images and CPU ``uint8`` tensors use torch's ``uint8`` bilinear kernel, which matches
    PIL's ``Image.BILINEAR`` and is about twice as fast; other tensors are resized in float
    and keep their dtype. ``keep_pil=True`` returns a PIL image for PIL input instead.
    Keypoints scale by ``(W'/W, H'/H)``.
    """

    def __init__(self, size: tuple[int, int], keep_pil: bool = False) -> None:
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"Resize: size must be (H, W) with positive entries, got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.keep_pil = bool(keep_pil)

    def apply(self, img, keypoints=None, generator=None):
        h, w = image_size(img)
        out_h, out_w = self.size
        if isinstance(img, Image.Image) and self.keep_pil:
            if (h, w) != (out_h, out_w):
                img = img.resize((out_w, out_h), Image.BILINEAR)
        elif (h, w) != (out_h, out_w):
            x = to_uint8_tensor(img)
            batched = x.dim() == 4
            x4 = x if batched else x.unsqueeze(0)
            if x4.dtype == torch.uint8 and x4.device.type == "cpu":
                y = F.interpolate(
                    x4, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True
                )
            else:
                y = F.interpolate(
                    x4.float(),
                    size=(out_h, out_w),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
                if not x4.is_floating_point():
                    y = y.round_().clamp_(0, 255)
                y = y.to(x4.dtype)
            img = y if batched else y[0]
        else:
            img = to_uint8_tensor(img)
        return img, self.move_keypoints(keypoints, (h, w))

    def move_keypoints(self, keypoints: Tensor | None, in_size: tuple[int, int]) -> Tensor | None:
        """Scale ``(K, 3)`` keypoints (in place) from an ``in_size = (h, w)`` image."""
        h, w = in_size
        out_h, out_w = self.size
        if keypoints is not None and (h, w) != (out_h, out_w):
            keypoints[:, 0] *= out_w / w
            keypoints[:, 1] *= out_h / h
        return keypoints


class RandomHorizontalFlip(Transform):
    """Mirror left-right with probability ``p``; keypoints ``x -> W - x`` and COCO left /
    right indices swapped (``COCO_FLIP_INDEX``) so "left wrist" stays the person's left."""

    def __init__(self, p: float = 0.5, flip_index: Sequence[int] | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)
        self.flip_index = list(flip_index) if flip_index is not None else COCO_FLIP_INDEX

    def draw(self, generator: torch.Generator | None) -> bool:
        """Whether this sample is mirrored (draws one number only when ``0 < p < 1``)."""
        if self.p <= 0.0:
            return False
        return self.p >= 1.0 or float(_rand(generator)) < self.p

    def move_keypoints(self, keypoints: Tensor | None, width: int) -> Tensor | None:
        """Mirror ``(K, 3)`` keypoints of an image ``width`` pixels wide (a new tensor)."""
        if keypoints is None:
            return None
        if keypoints.shape[0] != len(self.flip_index):
            raise ValueError(
                f"RandomHorizontalFlip: {keypoints.shape[0]} keypoints but the flip index "
                f"has {len(self.flip_index)} entries"
            )
        keypoints = keypoints[self.flip_index]
        keypoints[:, 0] = width - keypoints[:, 0]
        return keypoints

    def apply(self, img, keypoints=None, generator=None):
        if not self.draw(generator):
            return img, keypoints
        _, w = image_size(img)
        if isinstance(img, Image.Image):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = img.flip(-1)
        return img, self.move_keypoints(keypoints, w)


class RandomPadCrop(Transform):
    """fast-reid / BoT ``Pad(pad) + RandomCrop(size)``, done without building the padded image.

    The image is (virtually) padded by ``pad`` pixels of value ``fill`` on every side, then a
    ``size = (H, W)`` window is cropped at a uniform offset ``(i, j)`` in
    ``[0, h + 2 pad - H] x [0, w + 2 pad - W]``. Equivalently the output is the input shifted
    by ``(pad - i, pad - j)`` with ``fill`` where no input pixel lands. ``size=None`` keeps the
    input size. Returns a tensor (PIL input is converted to ``uint8``). Keypoints move by
    ``(pad - j, pad - i)``; those that fall outside get visibility 0.
    """

    def __init__(self, pad: int = 10, size: tuple[int, int] | None = None, fill: float = 0) -> None:
        if pad < 0:
            raise ValueError(f"RandomPadCrop: pad must be >= 0, got {pad}")
        self.pad = int(pad)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.fill = fill

    def offsets(self, h: int, w: int, generator: torch.Generator | None) -> tuple[int, int]:
        """Draw the crop offset ``(i, j)`` inside the padded ``(h + 2p, w + 2p)`` image."""
        out_h, out_w = self.size or (h, w)
        range_h, range_w = h + 2 * self.pad - out_h, w + 2 * self.pad - out_w
        if range_h < 0 or range_w < 0:
            raise ValueError(
                f"RandomPadCrop: crop size {(out_h, out_w)} is larger than the padded image "
                f"{(h + 2 * self.pad, w + 2 * self.pad)}"
            )
        r = torch.randint(2**62, (2,), generator=generator)
        return int(r[0]) % (range_h + 1), int(r[1]) % (range_w + 1)

    def apply(self, img, keypoints=None, generator=None):
        h, w = image_size(img)
        out_h, out_w = self.size or (h, w)
        if self.pad == 0 and (out_h, out_w) == (h, w):
            return img, keypoints
        i, j = self.offsets(h, w, generator)
        x = to_uint8_tensor(img)
        out = torch.full((*x.shape[:-2], out_h, out_w), self.fill, dtype=x.dtype)
        # destination rows/cols [d0, d1) receive source rows/cols [d0 + i - pad, ...)
        dy, dx = self.pad - i, self.pad - j  # shift source -> destination
        y0, y1 = max(0, dy), min(out_h, h + dy)
        x0, x1 = max(0, dx), min(out_w, w + dx)
        if y1 > y0 and x1 > x0:
            out[..., y0:y1, x0:x1] = x[..., y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        return out, self.move_keypoints(keypoints, (i, j), (out_h, out_w))

    def move_keypoints(
        self, keypoints: Tensor | None, offset: tuple[int, int], out_size: tuple[int, int]
    ) -> Tensor | None:
        """Shift ``(K, 3)`` keypoints (in place) for the crop at ``offset = (i, j)``; those
        outside the ``out_size`` result get visibility 0."""
        if keypoints is None:
            return None
        keypoints[:, 0] += self.pad - offset[1]
        keypoints[:, 1] += self.pad - offset[0]
        return _hide_outside(keypoints, *out_size)


class ColorJitter(Transform):
    """Random brightness, contrast and saturation (torchvision semantics).

    Each factor is uniform in ``[max(0, 1 - s), 1 + s]``; the three adjustments are applied
    in a random order; output is float in ``[0, 1]`` with shape ``(3, H, W)``. Brightness
    scales, contrast blends with the mean grey level, saturation blends with the grey image
    (ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``). A ``(T, 3, H, W)`` clip gets the same
    factors and order for every frame (contrast uses each frame's own mean grey level).
    """

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0
    ) -> None:
        for name, value in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if value < 0:
                raise ValueError(f"ColorJitter: {name} must be >= 0, got {value}")
        self.brightness, self.contrast, self.saturation = (
            float(brightness),
            float(contrast),
            float(saturation),
        )

    @staticmethod
    def _gray(x: Tensor) -> Tensor:
        """Luma ``(..., 1, H, W)`` of ``(..., 3, H, W)``."""
        return (
            0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :]
        ).unsqueeze(-3)

    @property
    def active(self) -> bool:
        """False when all three strengths are 0 (a no-op that draws nothing)."""
        return any((self.brightness, self.contrast, self.saturation))

    def draw(self, generator: torch.Generator | None) -> tuple[list[float], list[int]]:
        """``(factors, order)``: the factor of brightness, contrast and saturation (1.0 for a
        strength of 0) and the order in which they are applied. Draws nothing when inactive."""
        if not self.active:
            return [1.0, 1.0, 1.0], [0, 1, 2]
        u = _rand(generator, 3)
        order = torch.randperm(3, generator=generator).tolist()
        factors = []
        for k, s in enumerate((self.brightness, self.contrast, self.saturation)):
            lo = max(0.0, 1.0 - s)
            factors.append(lo + float(u[k]) * (1.0 + s - lo) if s > 0 else 1.0)
        return factors, order

    def apply(self, img, keypoints=None, generator=None):
        if not self.active:
            return img, keypoints
        x = to_uint8_tensor(img)
        x = x.float().div_(255.0) if not x.is_floating_point() else x.clone()
        factors, order = self.draw(generator)
        strengths = (self.brightness, self.contrast, self.saturation)
        for k in order:
            if strengths[k] == 0:
                continue
            factor = factors[k]
            if k == 0:
                x = x.mul_(factor)
            elif k == 1:
                g = self._gray(x)
                m = g.mean() if x.dim() == 3 else g.mean(dim=(-3, -2, -1), keepdim=True)
                x = x.mul_(factor).add_((1.0 - factor) * m)
            else:
                grey = self._gray(x)  # before x is scaled in place
                x = x.mul_(factor).add_(grey.mul_(1.0 - factor))
            x = x.clamp_(0.0, 1.0)
        return x, keypoints


class ToTensor(Transform):
    """PIL / uint8 tensor -> float ``(3, H, W)`` in ``[0, 1]``; float tensors pass through."""

    def apply(self, img, keypoints=None, generator=None):
        x = to_uint8_tensor(img)
        if not x.is_floating_point():
            x = x.float().div_(255.0)
        return x.contiguous(), keypoints


class Normalize(Transform):
    """``(x - mean) / std`` per channel -> contiguous float32 ``(3, H, W)``.

    PIL images and uint8 tensors are first scaled to ``[0, 1]`` (fused into one multiply-add,
    so ``ToTensor`` is not needed before it); float tensors are taken to be in ``[0, 1]``.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean {mean} and std {std} differ in length")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        m = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale_u8 = 1.0 / (255.0 * s)
        self._scale_f = 1.0 / s
        self._shift = -m / s

    def apply(self, img, keypoints=None, generator=None):
        x = to_uint8_tensor(img)
        if x.shape[-3] != len(self.mean):
            raise ValueError(
                f"Normalize: expected {len(self.mean)} channels, got shape {tuple(x.shape)}"
            )
        scale = self._scale_f if x.is_floating_point() else self._scale_u8
        scale, shift = scale.to(x.device), self._shift.to(x.device)
        # one fused pass (dtype promotion into a fresh contiguous float32 buffer), then shift
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        torch.mul(x, scale, out=out)
        return out.add_(shift), keypoints


class RandomErasing(Transform):
    """Random erasing (Zhong et al. 2020) exactly as BoT applies it, on the normalised tensor.

    With probability ``p`` try (up to ``max_attempts`` draws, vectorised) a rectangle of area
    ``U(sl, sh) * H * W`` and aspect ``h / w ~ U(r1, 1 / r1)``; ``h = round(sqrt(area *
    aspect))``, ``w = round(sqrt(area / aspect))``; the first draw with ``h < H`` and
    ``w < W`` is erased at a uniform position. Fill values:

    * ``"mean"``: channel ``c`` gets ``mean[c]`` (default the ImageNet mean values
      ``0.485, 0.456, 0.406``), written into the *normalised* tensor as the BoT code does;
    * ``"zero"``: 0, i.e. the dataset mean colour after normalisation;
    * ``"random"``: i.i.d. standard normal values per pixel (noise in normalised space).

    The input tensor is not modified (a copy is erased) unless ``inplace=True``, which the
    built pipelines use since ``Normalize`` hands over a fresh tensor. Keypoints are unchanged.
    """

    def __init__(
        self,
        p: float = 0.5,
        sl: float = 0.02,
        sh: float = 0.4,
        r1: float = 0.3,
        fill: Literal["mean", "random", "zero"] = "mean",
        mean: Sequence[float] = IMAGENET_MEAN,
        max_attempts: int = 100,
        inplace: bool = False,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomErasing: p must be in [0, 1], got {p}")
        if not 0.0 < sl <= sh <= 1.0:
            raise ValueError(f"RandomErasing: need 0 < sl <= sh <= 1, got sl={sl}, sh={sh}")
        if r1 <= 0:
            raise ValueError(f"RandomErasing: r1 must be > 0, got {r1}")
        if fill not in ("mean", "random", "zero"):
            raise ValueError(
                f"RandomErasing: fill must be 'mean', 'random' or 'zero', got {fill!r}"
            )
        self.p, self.sl, self.sh = float(p), float(sl), float(sh)
        self.r1 = float(r1)
        self.fill = fill
        self.mean = tuple(float(m) for m in mean)
        self.max_attempts = int(max_attempts)
        self.inplace = bool(inplace)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)

    def params(
        self, h: int, w: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int] | None:
        """Draw ``(top, left, eh, ew)`` of the erased box, or ``None`` if no draw fits."""
        n = self.max_attempts
        u = _rand(generator, 2 * n)
        area = (self.sl + (self.sh - self.sl) * u[:n]) * (h * w)
        lo, hi = min(self.r1, 1.0 / self.r1), max(self.r1, 1.0 / self.r1)
        aspect = lo + (hi - lo) * u[n:]
        eh = torch.sqrt(area * aspect).round().long()
        ew = torch.sqrt(area / aspect).round().long()
        ok = torch.nonzero((eh < h) & (ew < w) & (eh > 0) & (ew > 0))
        if ok.numel() == 0:
            return None
        k = int(ok[0, 0])
        bh, bw = int(eh[k]), int(ew[k])
        r = torch.randint(2**62, (2,), generator=generator)
        top = int(r[0]) % (h - bh + 1)
        left = int(r[1]) % (w - bw + 1)
        return top, left, bh, bw

    def sample_box(
        self, h: int, w: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int] | None:
        """The whole random decision for one image: ``None`` (not erased this time) or
        ``(top, left, eh, ew)``. Uses the generator exactly as :meth:`apply` does, so a
        box drawn here (e.g. in a loader worker) and filled later with :meth:`erase_batch`
        reproduces :meth:`apply`."""
        if self.p <= 0.0 or (self.p < 1.0 and float(_rand(generator)) >= self.p):
            return None
        return self.params(h, w, generator)

    def apply(self, img, keypoints=None, generator=None):
        if not isinstance(img, Tensor) or not img.is_floating_point():
            raise TypeError(
                "RandomErasing expects the normalised float tensor; put it after Normalize"
            )
        h, w = image_size(img)
        box = self.sample_box(h, w, generator)
        if box is None:
            return img, keypoints
        top, left, bh, bw = box
        out = img if self.inplace else img.clone()
        region = out[..., top : top + bh, left : left + bw]
        if self.fill == "mean":
            c = out.shape[-3]
            if c != len(self.mean):
                raise ValueError(
                    f"RandomErasing: mean has {len(self.mean)} values for {c} channels"
                )
            region.copy_(self._mean_t.to(out).expand_as(region))
        elif self.fill == "zero":
            region.zero_()
        else:
            region.copy_(self.draw_noise(box, out.shape[-3], generator).to(out))
        return out, keypoints

    def draw_noise(
        self, box: tuple[int, int, int, int], channels: int, generator: torch.Generator | None
    ) -> Tensor:
        """The ``(channels, eh, ew)`` float32 noise of ``fill="random"`` for ``box``, drawn
        right after :meth:`sample_box` as :meth:`apply` does."""
        return torch.randn((channels, box[2], box[3]), generator=generator, dtype=torch.float32)

    def erase_batch(
        self,
        images: Tensor,
        boxes: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Fill per-image boxes of a normalised batch in one vectorised pass (any device).

        Args:
            images: ``(B, C, H, W)`` float, modified in place and returned.
            boxes: ``(B, 4)`` integer ``(top, left, eh, ew)``; ``eh = 0`` means no erasing.
            generator: for ``fill="random"`` without ``noise``: noise drawn on
                ``images.device`` from it.
            noise: for ``fill="random"``: the concatenated, flattened :meth:`draw_noise`
                values of the erased images in batch order (reproduces :meth:`apply`).
        """
        if boxes.numel() == 0 or not bool((boxes[:, 2] > 0).any()):
            return images
        c = images.shape[1]
        mask = self._box_mask(boxes.to(images.device), images.shape[2], images.shape[3])
        if self.fill == "mean":
            if c != len(self.mean):
                raise ValueError(
                    f"RandomErasing: mean has {len(self.mean)} values for {c} channels"
                )
            fill = self._mean_t.to(images).view(1, c, 1, 1)
        elif self.fill == "zero":
            return images.masked_fill_(mask, 0.0)
        elif noise is not None:  # boxes are filled in (image, channel, row, col) order
            return images.masked_scatter_(mask.expand_as(images), noise.to(images))
        else:
            fill = torch.randn(
                images.shape, generator=generator, device=images.device, dtype=images.dtype
            )
        return torch.where(mask, fill, images, out=images)

    @staticmethod
    def _box_mask(boxes: Tensor, h: int, w: int) -> Tensor:
        """``(B, 1, H, W)`` bool mask of per-image boxes ``(top, left, eh, ew)``."""
        top, left, bh, bw = (boxes[:, k].view(-1, 1, 1) for k in range(4))
        rows = torch.arange(h, device=boxes.device).view(1, h, 1)
        cols = torch.arange(w, device=boxes.device).view(1, 1, w)
        inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
        return inside.unsqueeze(1)


# ----------------------------------------------------------------------------- builders
def _config_random_erasing(data_cfg: Any, p: float) -> RandomErasing:
    """In-place ``RandomErasing(p)`` with the config's ``random_erasing_*`` area, aspect and
    fill parameters (``fill="mean"`` erases with ``data_cfg.mean``)."""
    return RandomErasing(
        p=p,
        sl=data_cfg.random_erasing_sl,
        sh=data_cfg.random_erasing_sh,
        r1=data_cfg.random_erasing_r1,
        fill=data_cfg.random_erasing_fill,
        mean=data_cfg.mean,
        inplace=True,
    )


def build_train_transforms(data_cfg: Any) -> Compose:
    """Training pipeline from a ``DataConfig`` (``reidkit.config``).

    ``Resize(height, width) -> RandomHorizontalFlip(hflip_p) -> RandomPadCrop(pad) ->
    [ColorJitter(color_jitter) if > 0] -> Normalize(mean, std) -> RandomErasing(...)``.
    Output: float32 ``(3, height, width)``.
    """
    size = (int(data_cfg.height), int(data_cfg.width))
    ts: list[Transform] = [Resize(size)]
    if data_cfg.hflip_p > 0:
        ts.append(RandomHorizontalFlip(data_cfg.hflip_p))
    if data_cfg.pad > 0:
        ts.append(RandomPadCrop(data_cfg.pad, size))
    if getattr(data_cfg, "color_jitter", 0.0) > 0:
        s = float(data_cfg.color_jitter)
        ts.append(ColorJitter(s, s, s))
    ts.append(Normalize(data_cfg.mean, data_cfg.std))
    if data_cfg.random_erasing_p > 0:
        ts.append(_config_random_erasing(data_cfg, data_cfg.random_erasing_p))
    return Compose(ts)


def build_test_transforms(data_cfg: Any, occlusion_p: float = 0.0) -> Compose:
    """Test pipeline: ``Resize(height, width) -> Normalize(mean, std)``.

    ``occlusion_p > 0`` appends ``RandomErasing(occlusion_p)`` with the config's erasing
    parameters (MGRe's occlusion test, Table 6); it is seeded per sample by the loader.
    """
    size = (int(data_cfg.height), int(data_cfg.width))
    ts: list[Transform] = [Resize(size), Normalize(data_cfg.mean, data_cfg.std)]
    if occlusion_p > 0:
        ts.append(_config_random_erasing(data_cfg, occlusion_p))
    return Compose(ts)
