"""IMAGE / PIXELS decoding: the documented pipeline, and one-line errors for everything a client can get wrong."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest

from fmplex.families.vision.preprocess import MEAN, STD, ImageLimits, decode_image, decode_request
from fmplex.runtime.validation import RequestError

from .vision_data import digit_images, encode, photos


def png_declaring(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR is rewritten to declare width x height (CRC fixed)."""
    raw = bytearray(encode(np.zeros((16, 16, 3), dtype=np.uint8), "PNG"))
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def one_line_error(fn, *args, **kw) -> str:  # noqa: ANN001
    with pytest.raises(RequestError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_pipeline_crop_and_normalise() -> None:
    """A 256x256 RGB image is not resized: the answer is its central 224 square, normalised."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    got = decode_image(encode(img, "PNG"))
    want = ((img[16:240, 16:240].astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_photos_and_grey_digits_decode() -> None:
    for data in photos():
        x = decode_image(data)
        assert x.shape == (3, 224, 224) and np.isfinite(x).all()
    digits, _ = digit_images(2)
    x = decode_image(digits[0])
    rgb = x.transpose(1, 2, 0) * STD + MEAN  # grey -> three equal channels
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-5)


def test_request_of_images_keeps_row_order() -> None:
    data = photos()[:3]
    batch = decode_request(np.array(data, dtype=object), None)
    for i, d in enumerate(data):
        np.testing.assert_array_equal(batch[i], decode_image(d))
    assert decode_request(np.array(data, dtype=object).reshape(3, 1), None).shape == (3, 3, 224, 224)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from 89 MP on
@pytest.mark.parametrize("width,height", [(100_000, 100_000), (10_000, 10_000), (8_000, 8_000)])
def test_huge_declared_size_is_refused_before_decoding(width: int, height: int) -> None:
    t0 = time.perf_counter()
    msg = one_line_error(decode_image, png_declaring(width, height), "IMAGE row 0")
    assert time.perf_counter() - t0 < 2.0  # nothing was decoded (8000x8000 RGB would be 192 MB)
    assert msg.startswith("IMAGE row 0 declares") and "limit" in msg


@pytest.mark.parametrize("width,height", [(1, 4000), (100_000, 1), (2, 19_000_000)])
def test_extreme_aspect_ratio_is_refused_before_decoding(width: int, height: int) -> None:
    """A tiny image of an extreme aspect ratio would be resized to a huge one (1x4000: 256x1024000
    pixels, on the host's request thread): refused from the header, like a decompression bomb."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 4000), 7).save(buf, "PNG")
    data = buf.getvalue() if (width, height) == (1, 4000) else png_declaring(width, height)
    t0 = time.perf_counter()
    msg = one_line_error(decode_image, data, "IMAGE row 0")
    assert time.perf_counter() - t0 < 2.0
    assert msg.startswith(f"IMAGE row 0 is {width}x{height} pixels") and "aspect ratio" in msg


def test_the_most_extreme_aspect_ratio_in_the_limit_is_served() -> None:
    """The same bound as the declared size: the resized image may hold max_pixels."""
    from PIL import Image

    limits = ImageLimits(max_pixels=256 * 2560)
    for width, height, ok in ((10, 100, True), (10, 101, False)):  # resized: 256x2560 / 256x2586
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (10, 200, 30)).save(buf, "PNG")
        if ok:
            assert decode_image(buf.getvalue(), limits=limits).shape == (3, 224, 224)
        else:
            assert "aspect ratio" in one_line_error(decode_image, buf.getvalue(), limits=limits)


def test_truncated_images_are_refused() -> None:
    for data in photos()[:2]:  # a JPEG and a PNG
        msg = one_line_error(decode_image, data[: len(data) // 2])
        assert "truncated" in msg or "corrupt" in msg or "not a readable" in msg


def test_corrupt_and_foreign_bytes_are_refused() -> None:
    assert "not a JPEG or PNG" in one_line_error(decode_image, b"\x00garbage" * 50)
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert "not a JPEG or PNG" in one_line_error(decode_image, gif.getvalue())
    png = bytearray(photos()[1])
    png[200:400] = bytes(200)  # zeros inside the compressed data
    one_line_error(decode_image, bytes(png))
    assert "empty" in one_line_error(decode_image, b"")
    assert "bytes, more than the limit" in one_line_error(decode_image, photos()[0], limits=ImageLimits(max_image_bytes=100))


@pytest.mark.parametrize("mode", ["I;16", "CMYK"])
def test_wrong_mode_is_refused(mode: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (32, 32)).save(buf, "PNG" if mode == "I;16" else "JPEG")
    assert f"has mode {mode}" in one_line_error(decode_image, buf.getvalue())


def test_bad_image_requests() -> None:
    good = photos()[0]
    assert "IMAGE row 1" in one_line_error(decode_request, np.array([good, b"junk"], dtype=object), None)
    assert "not bytes" in one_line_error(decode_request, np.array([good, 7], dtype=object), None)
    assert "0 rows" in one_line_error(decode_request, np.array([], dtype=object), None)
    assert "rows, more than" in one_line_error(decode_request, np.array([good] * 3, dtype=object), None, ImageLimits(max_rows=2))
    assert "shape [rows]" in one_line_error(decode_request, np.array([[good, good]], dtype=object), None)


def test_bad_pixels_requests() -> None:
    ok = np.zeros((2, 3, 224, 224), dtype=np.float32)
    assert decode_request(None, ok).shape == (2, 3, 224, 224)
    for shape in [(2, 3, 224, 223), (3, 224, 224), (2, 1, 224, 224), (2, 224, 224, 3)]:
        assert "PIXELS must have shape" in one_line_error(decode_request, None, np.zeros(shape, dtype=np.float32))
    bad = ok.copy()
    bad[1, 2, 5, 5] = np.nan
    assert "PIXELS row 1 holds NaN" in one_line_error(decode_request, None, bad)
    bad[1, 2, 5, 5] = np.inf
    assert "row 1" in one_line_error(decode_request, None, bad)
    assert "FP32" in one_line_error(decode_request, None, ok.astype(np.float64))
    assert "either IMAGE or PIXELS" in one_line_error(decode_request, np.array([b"x"], dtype=object), ok)
    assert "missing input" in one_line_error(decode_request, None, None)
