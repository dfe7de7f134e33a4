"""Images for the vision tests, from data that ships in wheels (no downloads).

- ``digit_images``: scikit-learn's ``load_digits`` (8x8, 16 grey levels),
  scaled to 0..255 and upscaled to 224x224 (nearest), encoded as PNG;
- ``photos``: scikit-image's bundled sample photographs, encoded as JPEG/PNG.
"""

from __future__ import annotations

import io

import numpy as np


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def digit_images(n: int, classes: tuple[int, ...] = (0, 1, 2)) -> tuple[list[bytes], list[str]]:
    """The first ``n`` digits of ``classes`` as 224x224 grey PNGs, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = [i for i, t in enumerate(digits.target) if int(t) in classes][:n]
    images, labels = [], []
    for i in keep:
        small = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((224, 224), Image.Resampling.NEAREST))
        images.append(encode(big, "PNG"))
        labels.append(str(int(digits.target[i])))
    return images, labels


PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins")


def photos() -> list[bytes]:
    """scikit-image's sample photographs, alternately JPEG and PNG."""
    import skimage.data

    return [encode(getattr(skimage.data, name)(), "JPEG" if i % 2 == 0 else "PNG") for i, name in enumerate(PHOTOS)]
