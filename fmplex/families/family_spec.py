"""What a serving-side family object (vision, time series) declares about itself.

Plain records, no click and no Triton: the family's host imports them, and
the control-side adapters (``vision_control``, ``series_control``) read them
to build click options and host configs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class KindInfo:
    name: str
    summary: str
    source: str  # what ``task create`` needs for it
    options: tuple[str, ...] = ()  # option names it reads (besides the source)
    # Which ``task create`` option carries its data: "train" (labelled data it is fitted on),
    # "source" (an existing fine-tune it imports) or "" (it takes none).
    data: str = ""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type
    dims: str  # Triton config dims, batch dimension included
    prefix: str = "OUT"  # the host output it travels under: <prefix>_<slot>


class DeviceError(ValueError):
    """The configured device does not exist here (one line, raised when the backbone loads)."""


def require_device(device: str) -> str:
    """``device`` if torch can place tensors on it; otherwise one clear line instead of torch's
    assertion deep inside the first ``.to()`` (e.g. ``cuda`` asked on a machine without CUDA)."""
    import torch  # noqa: PLC0415 - only where a backbone is about to load

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r} is not a torch device (use cpu, or cuda[:n] on a GPU machine)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} is configured but torch sees no CUDA device (set device to cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} is configured but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported (use cpu, or cuda[:n] on a GPU machine)")
    return device
