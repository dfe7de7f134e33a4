"""``lora``: low-rank deltas on the backbone's Linears, applied per row.

For a Linear ``y = W x + b`` the task adds ``scale · B (A x)`` to its own rows
only (:mod:`fmplex.row_deltas`), so rows of many LoRA tasks of any ranks and
of plain tasks share one forward pass. A trained head (SEQ_CLS / TOKEN_CLS
adapters) comes with the artifact; LoRA on BERT's pooler was merged into the
head's pooler weight at import.
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.artifacts import ArtifactError
from fmplex.row_deltas import LoraDelta

from .base import Extension, linear_shape, target_layer


class LoraExtension(Extension):
    kind = "lora"

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        scales = (self.manifest.get("lora") or {}).get("scales")
        if not isinstance(scales, dict) or (not scales and (self.manifest.get("head") or {}).get("type") != "cls"):
            raise ArtifactError(f"{self.where}: manifest lacks lora.scales")
        config = context.get("config")
        for path, scale in scales.items():
            target_layer(path, config, self.where, "LoRA")
            a = tensors.get(f"lora.{path}.A")
            b = tensors.get(f"lora.{path}.B")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ArtifactError(f"{self.where}: LoRA weights for '{path}' are missing or mismatched")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ArtifactError(f"{self.where}: LoRA weights for '{path}' hold NaN or Inf")
            shape = linear_shape(path, config)
            if shape is not None and (a.shape[1], b.shape[0]) != shape:
                raise ArtifactError(
                    f"{self.where}: LoRA for '{path}' maps {a.shape[1]}->{b.shape[0]}, the backbone Linear is {shape[0]}->{shape[1]}"
                )
            self.deltas[path] = LoraDelta(a.float(), b.float(), float(scale))
