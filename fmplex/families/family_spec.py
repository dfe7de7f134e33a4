"""What a serving-side family object (vision, time series) declares about itself, and what it shares.

Plain records and one small base class, no click and no Triton: the family's
host imports them, and the control-side adapters (``vision_control``,
``series_control``) read them to build click options and host configs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

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


class BatchedFamily:
    """What the family objects that run one shared pass over many tasks' rows (``VisionFamily``,
    ``SeriesFamily``) have in common: the backbone's executor, loaded on first use (once per
    process, on a device checked first, so that building a task or only reading the family's
    description never loads a network), the artifact check and the batched entry point."""

    def __init__(self, device: str = "cpu", max_pass_rows: int | None = -1) -> None:
        self.device = device
        self.max_pass_rows = max_pass_rows  # -1: the executor's default for the device
        self._executor: Any = None

    def make_executor(self) -> Any:
        """The backbone's executor (imports torch and the network; called once, by :attr:`executor`)."""
        raise NotImplementedError

    def load_task(self, vdir: Path) -> Any:
        """A task from its version directory; ArtifactError if it does not fit."""
        raise NotImplementedError

    @property
    def executor(self) -> Any:
        """The backbone, loaded on first use (once per process)."""
        if self._executor is None:
            require_device(self.device)
            self._executor = self.make_executor()
        return self._executor

    def check_artifact(self, vdir: Path) -> Any:
        """Load an artifact exactly as the host will (what it would refuse is refused here)."""
        return self.load_task(vdir)

    def run_batch(self, items: Sequence[tuple[Any, Any]]) -> list[Any]:
        """One shared pass over every request's rows: a BatchResult (outputs or error) per request, in order."""
        return self.executor.run_batch(items)
