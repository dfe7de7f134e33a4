"""Building a ``fork`` series task from a fine-tuned Fracast state dict (control plane).

The source is a safetensors file in fracast's own layout (``core.*`` and
``head.*``, as ``model.safetensors``; a head-only file is fine too). Fracast's
trunk reuses one block at all ten dilations, so a fine-tune that changes any
trunk tensor changes every stage and leaves nothing to share: such a file is
refused, naming the tensors. What differs in the head is kept, nothing else;
the host rebuilds the head as the packaged head with those tensors replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from fmplex.artifacts import read_safetensors

from .model import base_state

Echo = Callable[[str], None]


class SourceError(ValueError):
    """A task's source cannot be used (one line)."""


def read_state(source: Path) -> dict[str, torch.Tensor]:
    source = Path(source)
    if not source.is_file():
        raise SourceError(f"fine-tuned state dict {source} does not exist")
    if source.suffix != ".safetensors":
        raise SourceError(f"{source}: a fine-tuned state dict must be a .safetensors file (pickle is never read)")
    return read_safetensors(source, SourceError)


def head_delta(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The head tensors of ``state`` that differ from ``base``; refuses unknown names, wrong shapes, a changed trunk."""
    unknown = sorted(k for k in state if k not in base)
    if unknown:
        raise SourceError(f"{where}: {len(unknown)} tensors are not Fracast-0 parameters (first: {unknown[0]}); "
                          "expected fracast's layout core.* / head.*")
    for k, v in state.items():
        if tuple(v.shape) != tuple(base[k].shape) or not v.is_floating_point():
            raise SourceError(f"{where}: {k} has shape {list(v.shape)} ({v.dtype}), expected {list(base[k].shape)} float")
        if not torch.isfinite(v).all():
            raise SourceError(f"{where}: {k} holds NaN or infinite values")
    trunk = sorted(k for k, v in state.items() if k.startswith("core.") and not torch.equal(v.float(), base[k]))
    if trunk:
        shown = ", ".join(trunk[:3]) + (f" and {len(trunk) - 3} more" if len(trunk) > 3 else "")
        raise SourceError(f"{where}: the fine-tune changed the shared trunk ({shown}); Fracast-0 reuses one trunk block "
                          "at every stage, so only the forecast head (head.*) can be forked: freeze the trunk when fine-tuning")
    delta = {k: v.float().contiguous() for k, v in state.items() if k.startswith("head.") and not torch.equal(v.float(), base[k])}
    if not delta:
        raise SourceError(f"{where}: the head is identical to the packaged one; use kind 'forecast'")
    return delta


def build_fork(source: Path, echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest fields, tensors) of a fork: the differing head tensors of ``source``."""
    base = base_state("fp32")
    delta = head_delta(read_state(source), base, str(source))
    n_head = sum(1 for k in base if k.startswith("head."))
    params = sum(v.numel() for v in delta.values())
    echo(f"fork: kept {len(delta)} of {n_head} head tensors that differ ({params} parameters, {params * 4 / 1024:.1f} KiB); "
         "the trunk is shared")
    return {"head": {"type": "fork", "tensors": sorted(delta)}}, delta
