"""Image file validation shared by the dataset parsers.

Two levels of checking:

* **cheap** (always run by the parsers, so before training starts): the file exists, is not
  empty and is not truncated. Truncation is seen at the end of the file: a JPEG ends with
  its EOI marker (``FF D9``), a PNG with its ``IEND`` chunk, a BMP / WebP is as long as its
  header says. Only a file that fails this is decoded (Pillow decides: a file it can read
  is fine), so the check reads two small blocks per file instead of decoding every image.
* **verify** (opt-in, ``verify_images=True``, ``reidkit datasets stats --verify``): every
  image is decoded (``Image.verify()`` for the container's checksums, then ``load()`` for
  the pixels), which also catches damage in the middle of a file.

Both run over a thread pool: file reading and Pillow's decoder release the GIL, so tens of
thousands of files are checked in seconds even on network file systems. Measured with
``benchmarks/bench_image_check.py`` on 5,000 128x64 JPEGs (8 KB, warm cache, 8 threads, a
shared 2-core machine under load): ``stat`` only 0.30 s, the cheap check 0.52 s (1.8x),
full decoding 4.8 s (16x); for Market-1501's 32,668 images that is 1.9 s, 3.4 s and 31 s.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImage",
    "check_image",
    "find_bad_images",
    "is_image_file",
    "suspect_bytes",
]

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


_TAIL = 32  # bytes read from the end of a file


def suspect_bytes(head: bytes, tail: bytes, size: int) -> str | None:
    """What the first bytes ``head`` (>= 12) and last bytes ``tail`` of a ``size``-byte file
    say is wrong with it: ``"truncated"`` (a JPEG without its end marker, a PNG without
    ``IEND``, a BMP / WebP shorter than its header says), ``"unknown"`` (no image signature
    at all) or ``None``. A suspect file is then decoded to decide (a JPEG with unusual
    trailing bytes that Pillow reads is fine)."""
    if head[:2] == b"\xff\xd8":  # JPEG: EOI, possibly followed by zero padding
        return None if tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9") else "truncated"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated"
    if head[:2] == b"BM" and len(head) >= 6:
        return "truncated" if struct.unpack("<I", head[2:6])[0] > size else None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "truncated" if struct.unpack("<I", head[4:8])[0] + 8 > size else None
    if head[:4] in (b"II*\x00", b"MM\x00*") or head[:4] == b"GIF8":
        return None  # TIFF / GIF: no cheap end check; --verify decodes them
    return "unknown"


def _decode(path: str) -> str | None:
    """Decode ``path`` fully with Pillow; the reason it fails, or ``None``."""
    try:
        with Image.open(path) as img:
            img.verify()  # container checksums (PNG CRCs); verify() leaves img unusable
        with Image.open(path) as img:
            img.load()  # the pixels: a truncated or damaged stream fails here
    except UnidentifiedImageError:
        return "not a recognised image format"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        text = str(exc)
        return f"truncated file ({text})" if "truncated" in text else f"corrupt image: {text}"
    return None


def check_image(path: str, verify: bool = False) -> str | None:
    """Check one image file.

    Args:
        path: image file path.
        verify: decode it fully with Pillow (otherwise: exists, non-empty, not truncated).

    Returns:
        ``None`` when the file is fine, otherwise the reason it is not (missing, empty,
        unreadable, not an image, truncated, corrupt).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty file (0 bytes)"
            if verify:
                head = tail = b""
            else:
                head = f.read(16)
                f.seek(max(0, size - _TAIL))
                tail = f.read(_TAIL)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    suspect = None if verify else suspect_bytes(head, tail, size)
    if not verify and suspect is None:
        return None
    reason = _decode(path)
    if reason is not None and suspect == "truncated" and not reason.startswith("truncated"):
        reason = f"truncated file (no end marker; {reason})"
    return reason


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
