"""decode_image: the same pixels as Pillow's RGB conversion, whichever decoder runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reidkit.data import decode
from reidkit.data.decode import DecodeError, decode_image

DECODERS = ["pillow"] + (["simplejpeg"] if decode._simplejpeg is not None else [])


def _pillow_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 12, 3), dtype=np.uint8)
    out = {}
    for name, img, kw in [
        ("rgb420.jpg", Image.fromarray(rgb), {"quality": 90}),
        ("rgb444.jpg", Image.fromarray(rgb), {"quality": 95, "subsampling": 0}),
        ("grey.jpg", Image.fromarray(rgb[..., 0]), {}),
        ("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), {}),
        ("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])), {}),
        ("pal.png", Image.fromarray(rgb).convert("P"), {}),
    ]:
        img.save(d / name, **kw)
        out[name] = d / name
    return out


@pytest.mark.parametrize("decoder", DECODERS)
def test_same_pixels_as_pillow(files, decoder):
    for name, path in files.items():
        got = decode_image(str(path), decoder=decoder)
        assert got.dtype == torch.uint8 and got.shape == (3, 24, 12), name
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), _pillow_rgb(path), name)


@pytest.mark.parametrize("decoder", DECODERS)
def test_errors_name_the_file(tmp_path, files, decoder):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DecodeError, match="broken.jpg"):
        decode_image(str(bad), decoder=decoder)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(files["rgb420.jpg"].read_bytes()[:120])
    with pytest.raises(DecodeError, match="cut.jpg"):
        decode_image(str(truncated), decoder=decoder)
    with pytest.raises(DecodeError, match="nope.jpg"):
        decode_image(str(tmp_path / "nope.jpg"), decoder=decoder)


def test_decoder_choice(files, monkeypatch):
    with pytest.raises(ValueError, match="'simplejpeg' or 'pillow'"):
        decode_image(str(files["rgb420.jpg"]), decoder="cv2")
    monkeypatch.setattr(decode, "_simplejpeg", None)
    with pytest.raises(ValueError, match=r"reidkit\[jpeg\]"):
        decode_image(str(files["rgb420.jpg"]), decoder="simplejpeg")
