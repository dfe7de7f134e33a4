"""One multimodal request's inputs, decoded and checked once for every host that serves them.

The lm stage host and the monolithic baseline take the same inputs (``TEXT``,
optional ``IMAGES [n, 3, H, W]``, ``MAX_NEW_TOKENS``, ``TEMPERATURE``, ``SEED``;
``interface.LM_INPUTS``) and must refuse bad ones with the same one-line
errors, so that a request gets the same answer or the same 400 from both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fmplex.runtime.host import input_array
from fmplex.runtime.validation import RequestError, decode_utf8

from .stages import LMStage

__all__ = ["LMRequest", "RequestLimits", "TaskDefaults", "decode_request"]


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    """What makes a multimodal task a task: its prompt and generation defaults."""

    prompt: str = ""
    max_new_tokens: int = 32
    temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_images: int = 8
    max_new_tokens_limit: int = 256
    max_text_bytes: int = 4096


@dataclasses.dataclass(frozen=True)
class LMRequest:
    ids: list[int]  # task prompt + TEXT, tokenized with the image tokens
    images: np.ndarray | None  # [n, 3, H, W] float32, contiguous; None: text only
    max_new_tokens: int
    temperature: float
    seed: int | None

    @property
    def n_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])


def _scalar(request: Any, name: str, kind: type) -> Any:
    arr = input_array(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {list(arr.shape)}")
    return kind(arr.reshape(-1)[0])


def decode_request(request: Any, lm: LMStage, image_shape: tuple[int, ...], task: TaskDefaults, limits: RequestLimits,
                   backbone: str = "") -> LMRequest:  # fmt: skip
    """The request's inputs, or RequestError (a 400) naming what is wrong."""
    text_arr = input_array(request, "TEXT")
    if text_arr is None or text_arr.size != 1:
        raise RequestError(f"TEXT must hold exactly one prompt, got {0 if text_arr is None else text_arr.size}")
    text = decode_utf8(text_arr.reshape(-1)[0], limits.max_text_bytes)
    images = input_array(request, "IMAGES")
    n = 0
    if images is not None:
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
            shape = "[n, " + ", ".join(map(str, image_shape)) + "]"
            raise RequestError(f"IMAGES must be FP32 {shape}{f' for {backbone}' if backbone else ''}, got {list(images.shape)}")
        n = int(images.shape[0])
        if n > limits.max_images:
            raise RequestError(f"{n} images in one request, more than the limit of {limits.max_images}")
        if not np.isfinite(images).all():
            raise RequestError("IMAGES contains NaN or Inf")
    max_new = _scalar(request, "MAX_NEW_TOKENS", int)
    max_new = task.max_new_tokens if max_new is None else max_new
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise RequestError(f"MAX_NEW_TOKENS must be 1..{limits.max_new_tokens_limit}, got {max_new}")
    temperature = _scalar(request, "TEMPERATURE", float)
    temperature = task.temperature if temperature is None else temperature
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise RequestError(f"TEMPERATURE must be >= 0, got {temperature}")
    seed = _scalar(request, "SEED", int)
    if seed is not None and seed < 0:
        raise RequestError(f"SEED must be >= 0, got {seed}")
    try:
        ids = lm.tokenizer.encode(task.prompt + text, n)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if len(ids) + max_new > lm.max_positions:
        raise RequestError(f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the model's {lm.max_positions} positions")
    pixels = np.ascontiguousarray(images, dtype=np.float32) if n else None
    return LMRequest(ids, pixels, int(max_new), float(temperature), seed)
