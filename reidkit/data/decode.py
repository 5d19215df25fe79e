"""Image files to ``(3, H, W)`` uint8 RGB tensors, as fast as the installed decoders allow.

JPEG files (nearly every re-ID dataset) are decoded with `simplejpeg
<https://pypi.org/project/simplejpeg/>`_ when it is installed (``pip install
reidkit[jpeg]``): it calls libjpeg-turbo straight into a numpy array, 2.2-2.8x faster than
going through a Pillow image here (``benchmarks/bench_loader.py --decoders``). Its pixels are
identical to Pillow's for YCbCr and greyscale JPEGs (both use libjpeg-turbo's accurate
DCT and fancy upsampling; tested), so results do not depend on which decoder ran. Other
formats, CMYK JPEGs and anything simplejpeg refuses go through Pillow.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .transforms import to_uint8_tensor

__all__ = ["JPEG_DECODER", "DecodeError", "decode_image"]

try:  # optional: reidkit[jpeg]
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

#: The JPEG decoder in use: ``"simplejpeg"`` or ``"pillow"``.
JPEG_DECODER: str = "simplejpeg" if _simplejpeg is not None else "pillow"

_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")


class DecodeError(RuntimeError):
    """An image file could not be decoded; the message names the file and the reason."""


def _decode_pillow(path: str, data: bytes | None) -> Tensor:
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
            return to_uint8_tensor(im)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as exc:
        raise DecodeError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def decode_image(path: str, decoder: str | None = None) -> Tensor:
    """Decode an image file to a ``(3, H, W)`` uint8 RGB tensor.

    Args:
        path: image file.
        decoder: ``"simplejpeg"`` / ``"pillow"`` to force one (default :data:`JPEG_DECODER`
            for JPEG files, Pillow for everything else).

    Raises:
        DecodeError: the file is missing, truncated or not an image (message names it).
    """
    use = decoder or JPEG_DECODER
    if use not in ("simplejpeg", "pillow"):
        raise ValueError(f"decoder must be 'simplejpeg' or 'pillow', got {decoder!r}")
    if use == "simplejpeg":
        if _simplejpeg is None:
            raise ValueError(
                "decoder='simplejpeg' needs the simplejpeg package: pip install reidkit[jpeg]"
            )
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DecodeError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
        if data[:2] == b"\xff\xd8":  # JPEG magic; others go to Pillow
            try:
                colorspace = _simplejpeg.decode_jpeg_header(data)[2]
                if colorspace in _SIMPLEJPEG_COLORSPACES:
                    arr = _simplejpeg.decode_jpeg(data, colorspace="RGB")
                    return torch.from_numpy(arr).permute(2, 0, 1)
            except ValueError:
                pass  # Pillow decides (and names the problem if it is really broken)
        return _decode_pillow(path, data)
    return _decode_pillow(path, None)
