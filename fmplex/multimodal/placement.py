"""Where a stage host runs: its torch device and the CPUs its process may use.

Stage colocation is a configuration choice (ModServe): each stage host's
``config.pbtxt`` carries ``device`` (``cpu``, ``cuda``, ``cuda:N``) and ``cpus``
(a Linux CPU list such as ``0`` or ``0-3,8``; empty = all). Stages that name the
same device / overlapping CPUs share them; disjoint values pin them apart.
``fmplex init --backbone NAME --placement`` writes either (see ``fmplex.families.multimodal``).

The affinity is applied to every thread of the stub process that exists when
the host initialises (``sched_setaffinity`` on a TID binds that thread only),
and threads started later inherit it.
"""

from __future__ import annotations

import os


class PlacementError(ValueError):
    """A placement that cannot be honoured on this machine."""


def parse_cpus(text: str) -> set[int] | None:
    """``"0-2,5"`` -> {0, 1, 2, 5}; empty or ``all`` -> None (no pinning)."""
    text = (text or "").strip()
    if text in ("", "all"):
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if a < 0 or b < a:
                raise ValueError
            cpus.update(range(a, b + 1))
    except ValueError:
        raise PlacementError(f"invalid CPU list {text!r} (expected e.g. '0', '0-3' or '0,2-3')") from None
    return cpus


def format_cpus(cpus: set[int] | None) -> str:
    return "all" if cpus is None else ",".join(str(c) for c in sorted(cpus))


def apply_affinity(cpus: set[int] | None) -> set[int]:
    """Pin this whole process to ``cpus``; returns the CPUs it may use now."""
    if cpus is not None:
        available = os.sched_getaffinity(0)
        if not cpus & available:
            raise PlacementError(f"CPUs {format_cpus(cpus)} are not available to this process (it may use {format_cpus(available)})")
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus & available)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that just ended
    return set(os.sched_getaffinity(0))


def resolve_device(device: str) -> str:
    """Check that torch can use ``device`` here; a clear error otherwise."""
    import torch  # noqa: PLC0415

    device = (device or "cpu").strip()
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise PlacementError(f"device '{device}' is configured but torch sees no CUDA device")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise PlacementError(f"device '{device}' is configured but only {torch.cuda.device_count()} CUDA devices exist")
        return f"cuda:{index}"
    raise PlacementError(f"unknown device '{device}' (cpu, cuda or cuda:N)")


def apply_placement(cpus: str, torch_threads: int, device: str) -> tuple[str, set[int]]:
    """Apply a stage host's configured CPUs and torch threads; (its torch device, its CPUs)."""
    import torch  # noqa: PLC0415

    allowed = apply_affinity(parse_cpus(cpus))
    torch.set_num_threads(max(1, torch_threads))
    return resolve_device(device), allowed
