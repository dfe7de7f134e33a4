"""What an extension's rows answer (``SlotOutputs``) and the tensor check every extension and head uses.

A leaf module: ``base`` (extensions) and ``heads`` both import it, so neither imports the other in a circle.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fmplex.artifacts import ArtifactError


@dataclasses.dataclass
class SlotOutputs:
    """A group of rows' answers: float matrix, one text per row, per-token floats."""

    out: np.ndarray | None = None  # [rows, d]
    txt: np.ndarray | None = None  # [rows] of bytes
    tok: list[np.ndarray] | None = None  # per row [tokens_i, d]


def require(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...], where: str) -> torch.Tensor:
    """A tensor of the artifact with the shape the backbone needs, as fp32."""
    t = tensors.get(name)
    if t is None:
        raise ArtifactError(f"{where}: tensor '{name}' missing")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ArtifactError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise ArtifactError(f"{where}: tensor '{name}' holds NaN or Inf")
    return t.float()
