"""Image file validation shared by the dataset parsers.

Two levels of checking:

* **cheap** (always run by the parsers): the file exists and is not empty (one ``stat``);
* **verify** (opt-in, ``verify_images=True``): Pillow opens the file and runs
  ``Image.verify()``, which parses the whole container (headers, chunks, CRCs) without
  decoding pixels, so truncated or corrupt files are caught before training starts.

Both run over a thread pool: ``stat`` and Pillow's file reading release the GIL, so tens of
thousands of files are checked in seconds even on network file systems.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "BadImage", "check_image", "find_bad_images", "is_image_file"]

#: File name suffixes (lower case) treated as images by every folder-scanning parser.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class BadImage:
    """An image that failed a check: its path and a short human-readable reason."""

    path: str
    reason: str


def check_image(path: str, verify: bool = False) -> str | None:
    """Check one image file.

    Args:
        path: image file path.
        verify: also open it with Pillow and run ``Image.verify()``.

    Returns:
        ``None`` when the file is fine, otherwise the reason it is not (missing, empty,
        unreadable, not an image, corrupt).
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    if size == 0:
        return "empty file (0 bytes)"
    if not verify:
        return None
    try:
        with Image.open(path) as img:
            img.verify()
    except UnidentifiedImageError:
        return "not a recognised image format"
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow raises all three on bad data
        return f"corrupt image: {exc}"
    return None


def find_bad_images(
    paths: Sequence[str], verify: bool = False, num_workers: int = 8
) -> list[BadImage]:
    """Check many images in parallel and return the failures, in input order.

    Args:
        paths: image paths (length N).
        verify: run the Pillow ``verify()`` pass as well as the existence/size check.
        num_workers: thread-pool size; ``<= 1`` checks serially.

    Returns:
        One :class:`BadImage` per failing path (empty list when all are fine).
    """
    if not paths:
        return []
    if num_workers <= 1 or len(paths) < 64:
        reasons = [check_image(p, verify) for p in paths]
    else:
        chunk = max(1, len(paths) // (num_workers * 8))
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            reasons = list(pool.map(check_image, paths, [verify] * len(paths), chunksize=chunk))
    return [BadImage(p, r) for p, r in zip(paths, reasons) if r is not None]
