"""Pictures from maps: undo input normalisation, upsample a map over its image (Pillow),
and write a labelled image grid (PNG/JPEG).

Used by Grad-CAM (:mod:`reidkit.viz.grad_cam`), the IANet receptive-field maps
(:mod:`reidkit.viz.relation`) and the reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from reidkit.viz.report import overlay_heatmap

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_uint8_images",
    "enlarge_images",
    "upsample_map",
    "overlay_map",
    "overlay_maps",
    "image_grid",
    "save_image_grid",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8_images(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Undo the input normalisation: ``(B, 3, H, W)`` float -> uint8 ``(B, H, W, 3)``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def enlarge_images(pixels: np.ndarray, min_width: int = 96) -> np.ndarray:
    """Enlarge small uint8 images ``(B, H, W, 3)`` by an integer factor (bicubic) so that
    they are at least ``min_width`` wide (pictures of 64x32 or 96x48 inputs stay readable
    and their labels fit); larger images are returned as they are. Maps are overlaid at
    the shown size (:func:`overlay_map` upsamples them), so this only changes the picture.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"enlarge_images: expected (B, H, W, 3), got {pixels.shape}")
    _, h, w, _ = pixels.shape
    scale = max(1, -(-min_width // max(w, 1)))
    if scale == 1 or len(pixels) == 0:
        return pixels
    size = (w * scale, h * scale)
    return np.stack(
        [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BICUBIC)) for p in pixels]
    )


def upsample_map(heat: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a float map ``(h, w)`` to ``size = (H, W)`` with Pillow (float32)."""
    arr = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else heat
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"upsample_map: expected a 2-D map, got shape {arr.shape}")
    if arr.shape == tuple(size):
        return arr.copy()
    pil = Image.fromarray(arr).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.float32)


def overlay_map(
    image: np.ndarray,
    heat: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> np.ndarray:
    """A jet overlay of ``heat (h, w)`` (upsampled to the image) on uint8 ``image (H, W, 3)``.

    ``vmin``/``vmax`` fix the colour scale (default [0, 1] for normalised maps; ``None``
    uses the map's own range). Returns uint8 ``(H, W, 3)``.
    """
    up = upsample_map(heat, image.shape[:2])
    return overlay_heatmap(image, up, alpha=alpha, vmin=vmin, vmax=vmax)


def overlay_maps(
    images: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> list[np.ndarray]:
    """Overlay one map per image.

    ``images``: normalised ``(B, 3, H, W)`` tensor (as the model saw them) or uint8
    ``(B, H, W, 3)``; ``maps``: ``(B, h, w)``. Returns ``B`` uint8 ``(H, W, 3)`` arrays.
    """
    pixels = to_uint8_images(images, mean, std) if isinstance(images, torch.Tensor) else images
    if len(pixels) != len(maps):
        raise ValueError(f"overlay_maps: {len(pixels)} images but {len(maps)} maps")
    return [overlay_map(p, m, alpha=alpha, vmin=vmin, vmax=vmax) for p, m in zip(pixels, maps)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 4,
    font_size: int = 12,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Arrange uint8 ``(H, W, 3)`` images in a grid (``None`` leaves a cell blank).

    Every cell has the size of the largest image (smaller ones are centred); optional row
    labels go on the left, column labels on top. Returns an RGB Pillow image.
    """
    cells = [img for row in rows for img in row if img is not None]
    if not cells:
        raise ValueError("image_grid: no images given")
    for img in cells:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(
                f"image_grid: cells must be uint8 (H, W, 3), got {img.dtype} {img.shape}"
            )
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"image_grid: {len(row_labels)} row labels for {len(rows)} rows")
    n_cols = max(len(r) for r in rows)
    if col_labels is not None and len(col_labels) > n_cols:
        raise ValueError(f"image_grid: {len(col_labels)} column labels for {n_cols} columns")
    ch = max(img.shape[0] for img in cells)
    cw = max(img.shape[1] for img in cells)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        box = probe.multiline_textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    left = max((text_size(t)[0] for t in row_labels), default=0) + pad if row_labels else 0
    top = max((text_size(t)[1] for t in col_labels), default=0) + pad if col_labels else 0
    width = left + n_cols * (cw + pad) + pad
    height = top + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels or []):
        tw, _ = text_size(label)
        x0 = left + pad + j * (cw + pad) + (cw - tw) // 2
        draw.multiline_text((x0, pad // 2), label, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y0 = top + pad + i * (ch + pad)
        if row_labels:
            _, th = text_size(row_labels[i])
            draw.multiline_text(
                (pad // 2, y0 + (ch - th) // 2), row_labels[i], fill=(0, 0, 0), font=font
            )
        for j, img in enumerate(row):
            if img is None:
                continue
            x0 = left + pad + j * (cw + pad) + (cw - img.shape[1]) // 2
            canvas.paste(Image.fromarray(img), (x0, y0 + (ch - img.shape[0]) // 2))
    return canvas


def save_image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 4,
    font_size: int = 12,
) -> Path:
    """:func:`image_grid` written to ``path`` (format from the suffix; folders created)."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"save_image_grid: {out}: expected a .png, .jpg or .webp file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, row_labels, col_labels, pad=pad, font_size=font_size).save(out)
    return out
