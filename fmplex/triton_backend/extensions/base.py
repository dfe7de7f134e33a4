"""The interface every task extension implements.

An extension is what turns shared backbone states into one task's answer. The
executor hands it only the rows of its own task (intra-task batching), already
pooled by the shared forward pass (inter-task batching), and gets back the two
slot outputs: a float matrix and, for kinds that name things, one text per row.
One small module per kind, like LoRAX's adapters: weights live here, batch
metadata (which rows belong to whom) stays with the executor.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fmplex.artifacts import ArtifactError
from fmplex.backbones import BackboneSpec


class Extension(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: BackboneSpec) -> None:
        self.manifest = manifest
        self.spec = spec
        self.tensors = tensors
        self.check(tensors)

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse weights that do not fit the backbone (at load, not per request)."""

    @abc.abstractmethod
    def outputs(self, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(float output [rows, d], text output [rows] of bytes or None)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @staticmethod
    def require(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...], where: Path | str) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ArtifactError(f"{where}: tensor '{name}' missing")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ArtifactError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
        return t.float()
