"""Labelled images and photographs that ship in wheels, for the demo, the tests and the benchmarks.

- :func:`digit_images`: scikit-learn's ``load_digits`` (1,797 labelled 8x8
  images, 16 grey levels), scaled to 0..255, upscaled to 224x224 (nearest),
  encoded as PNG;
- :func:`write_digits_folder`: the same as a labelled folder
  (``DIR/<digit>/<n>.png``), what ``classifier`` tasks train from;
- :func:`photos`: scikit-image's bundled sample photographs, encoded as JPEG/PNG.

Nothing is downloaded. Control plane and tests only (imports scikit-learn and scikit-image).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins")


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """A uint8 array (H x W or H x W x 3) as an encoded image file."""
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def digit_images(n: int, classes: tuple[int, ...] = (0, 1, 2)) -> tuple[list[bytes], list[str]]:
    """The first ``n`` digits of ``classes`` as 224x224 grey PNGs, and their labels ("0", "1", ...)."""
    from PIL import Image  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    keep = [i for i, t in enumerate(digits.target) if int(t) in classes][:n]
    images, labels = [], []
    for i in keep:
        small = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((224, 224), Image.Resampling.NEAREST))
        images.append(encode(big, "PNG"))
        labels.append(str(int(digits.target[i])))
    return images, labels


def write_digits_folder(root: Path, n: int, classes: tuple[int, ...] = (0, 1, 2)) -> Path:
    """``root/<digit>/<i>.png`` for the first ``n`` digits of ``classes``; returns ``root``."""
    images, labels = digit_images(n, classes)
    for i, (data, label) in enumerate(zip(images, labels)):
        (Path(root) / label).mkdir(parents=True, exist_ok=True)
        (Path(root) / label / f"{i}.png").write_bytes(data)
    return Path(root)


def photos() -> list[bytes]:
    """scikit-image's sample photographs (:data:`PHOTOS`), alternately JPEG and PNG."""
    import skimage.data  # noqa: PLC0415

    return [encode(getattr(skimage.data, name)(), "JPEG" if i % 2 == 0 else "PNG") for i, name in enumerate(PHOTOS)]
