"""``ia3``: PEFT IA3 — learned vectors scaling Linears, applied per row.

A feed-forward module's input is scaled (``W (l ⊙ x) + b``), any other
module's output (``l ⊙ (W x + b)``), on the task's rows only
(:mod:`fmplex.row_deltas`), so rows of IA3, LoRA, adapter and plain tasks
share one forward pass. A trained head comes with the artifact; IA3 on BERT's
pooler was merged into the head's pooler weight at import.
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.artifacts import ArtifactError
from fmplex.row_deltas import Ia3Delta

from .base import Extension, linear_shape, target_layer


class Ia3Extension(Extension):
    kind = "ia3"

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        spec = self.manifest.get("ia3")
        modules = spec.get("modules") if isinstance(spec, dict) else None
        feedforward = spec.get("feedforward", []) if isinstance(spec, dict) else None
        if not isinstance(modules, list) or not all(isinstance(p, str) for p in modules) or not isinstance(feedforward, list):
            raise ArtifactError(f"{self.where}: manifest lacks ia3.modules / ia3.feedforward (lists of Linear paths)")
        if not modules and (self.manifest.get("head") or {}).get("type") != "cls":
            raise ArtifactError(f"{self.where}: the IA3 task scales no module")
        if not set(feedforward) <= set(modules) or len(set(modules)) != len(modules):
            raise ArtifactError(f"{self.where}: ia3.feedforward must list modules of ia3.modules, each once")
        config = context.get("config")
        for path in modules:
            target_layer(path, config, self.where, "IA3")
            ff = path in feedforward
            shape = linear_shape(path, config)
            size = None if shape is None else shape[0 if ff else 1]
            self.deltas[path] = Ia3Delta(self.require(f"ia3.{path}", (size,)).contiguous(), ff)
        stray = sorted(k for k in tensors if k.startswith("ia3.") and k[len("ia3."):] not in modules)
        if stray:
            raise ArtifactError(f"{self.where}: IA3 tensors not listed in ia3.modules: {', '.join(stray[:4])}")
