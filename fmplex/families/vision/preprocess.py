"""From a request's ``IMAGE`` or ``PIXELS`` input to the backbone's input, the same for every task.

The pipeline (ImageNet evaluation, as the weights were trained for):

1. decode the encoded JPEG or PNG with Pillow; convert to RGB (grey, palette
   and 1-bit images are expanded; an alpha channel is dropped);
2. resize so that the shorter side is 256 pixels (bilinear, Pillow's
   antialiasing), keeping the aspect ratio;
3. crop the central 224x224 square;
4. scale to [0, 1] and normalise each channel with the ImageNet mean
   ``(0.485, 0.456, 0.406)`` and standard deviation ``(0.229, 0.224, 0.225)``;
5. lay out as ``[3, 224, 224]`` float32 (channels first).

``PIXELS`` is the output of step 5 sent by the client, ``[rows, 3, 224, 224]``.

Everything a client can get wrong raises :class:`RequestError` with one line
that names the row, before anything is queued, so a bad image fails only its
own request. The header is read first (Pillow opens lazily): the declared
size is checked against ``max_pixels`` before a single pixel is decoded, so a
decompression bomb costs nothing; so is the size step 2 would resize to, which
a tiny image of an extreme aspect ratio (1x4000 pixels: 256x1024000 after the
resize) would otherwise blow up. Truncated files are refused (Pillow's
``LOAD_TRUNCATED_IMAGES`` is left off).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from fmplex.runtime.validation import RequestError

IMAGE_SIZE = 224
RESIZE_TO = 256  # shorter side before the center crop (224/256 = 0.875, the usual ImageNet ratio)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
FORMATS = ("JPEG", "PNG")
# Modes that convert to RGB without guessing; 16/32-bit integer, float, CMYK and
# Lab images would need a choice of scaling or colour profile, so they are refused.
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_rows: int = 64  # images in one request
    max_image_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 40_000_000  # declared width x height of one image (a 24 MP photo fits)


def _open(data: bytes, where: str, limits: ImageLimits):  # noqa: ANN202 - PIL.Image.Image
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if not data:
        raise RequestError(f"{where} is empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{where} is {len(data)} bytes, more than the limit of {limits.max_image_bytes}")
    try:
        # Header only. Pillow itself refuses a size over twice its MAX_IMAGE_PIXELS
        # here; anything above our (lower) limit is refused just below.
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except UnidentifiedImageError:
        raise RequestError(f"{where} is not a JPEG or PNG image") from None
    except Image.DecompressionBombError:
        raise RequestError(f"{where} declares more pixels than the limit of {limits.max_pixels}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header raises many kinds of errors
        raise RequestError(f"{where} is not a readable image ({type(exc).__name__}: {_line(exc)})") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise RequestError(f"{where} declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise RequestError(f"{where} declares {width}x{height} pixels, more than the limit of {limits.max_pixels}")
    rw, rh = resized_size(width, height)
    if rw * rh > limits.max_pixels:
        raise RequestError(f"{where} is {width}x{height} pixels: resized to a shorter side of {RESIZE_TO} it would be "
                           f"{rw}x{rh}, more than the limit of {limits.max_pixels} (aspect ratio too extreme)")
    if img.mode not in MODES:
        raise RequestError(f"{where} has mode {img.mode}; supported: {', '.join(MODES)} (8-bit grey, palette or RGB(A))")
    return img


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or "no detail"


def decode_image(data: bytes, where: str = "IMAGE", limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """One encoded JPEG/PNG -> normalised ``[3, 224, 224]`` float32 (the pipeline above)."""
    from PIL import Image  # noqa: PLC0415

    img = _open(data, where, limits)
    try:
        img.load()  # decodes; raises on truncated or corrupt data
        rgb = img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - OSError("image file is truncated"), SyntaxError, zlib errors...
        raise RequestError(f"{where} is corrupt or truncated ({type(exc).__name__}: {_line(exc)})") from None
    return to_pixels(rgb, Image.Resampling.BILINEAR)


def to_pixels(rgb, resample) -> np.ndarray:  # noqa: ANN001 - PIL.Image.Image, a Pillow resampling filter
    """Steps 2-5 on an RGB Pillow image."""
    width, height = rgb.size
    size = resized_size(width, height)
    if size != (width, height):
        rgb = rgb.resize(size, resample)
    left = (size[0] - IMAGE_SIZE) // 2
    top = (size[1] - IMAGE_SIZE) // 2
    crop = rgb.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    arr = np.asarray(crop, dtype=np.float32) / np.float32(255.0)
    arr = (arr - MEAN) / STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def resized_size(width: int, height: int) -> tuple[int, int]:
    """Step 2: the size with the shorter side at 256 and the aspect ratio kept."""
    scale = RESIZE_TO / min(width, height)
    return max(RESIZE_TO, round(width * scale)), max(RESIZE_TO, round(height * scale))


def decode_images(arr: np.ndarray, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """A request's ``IMAGE`` input (BYTES ``[rows]`` or ``[rows, 1]``) -> ``[rows, 3, 224, 224]``."""
    flat = arr.reshape(-1) if arr.ndim == 2 and arr.shape[-1] == 1 else arr
    if flat.ndim != 1:
        raise RequestError(f"IMAGE must have shape [rows] (or [rows, 1]), got {list(arr.shape)}")
    _check_rows(int(flat.shape[0]), "IMAGE", limits)
    out = np.empty((flat.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, item in enumerate(flat):
        if not isinstance(item, (bytes, bytearray, np.bytes_)):
            raise RequestError(f"IMAGE row {i} is not bytes (send the encoded file as BYTES)")
        out[i] = decode_image(bytes(item), f"IMAGE row {i}", limits)
    return out


def check_pixels(arr: np.ndarray, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """A request's ``PIXELS`` input: FP32 ``[rows, 3, 224, 224]``, finite."""
    expected = [3, IMAGE_SIZE, IMAGE_SIZE]
    if arr.ndim != 4 or list(arr.shape[1:]) != expected:
        raise RequestError(f"PIXELS must have shape [rows, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], got {list(arr.shape)}")
    if arr.dtype != np.float32:
        raise RequestError(f"PIXELS must be FP32, got {arr.dtype}")
    _check_rows(int(arr.shape[0]), "PIXELS", limits)
    finite = np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
    if not finite.all():
        raise RequestError(f"PIXELS row {int(np.argmin(finite))} holds NaN or infinite values")
    return np.ascontiguousarray(arr)


def decode_request(image: np.ndarray | None, pixels: np.ndarray | None, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Exactly one of ``IMAGE`` / ``PIXELS`` -> the request's backbone input ``[rows, 3, 224, 224]``."""
    if image is not None and pixels is not None:
        raise RequestError("send either IMAGE or PIXELS, not both")
    if image is not None:
        return decode_images(image, limits)
    if pixels is not None:
        return check_pixels(pixels, limits)
    raise RequestError("missing input: send IMAGE (BYTES, shape [rows]: encoded JPEG/PNG) or PIXELS (FP32, shape [rows, 3, 224, 224])")


def _check_rows(n: int, name: str, limits: ImageLimits) -> None:
    if n == 0:
        raise RequestError(f"{name} is empty (0 rows)")
    if n > limits.max_rows:
        raise RequestError(f"{name} has {n} rows, more than the limit of {limits.max_rows} per request")
