"""``lora``: low-rank deltas on the backbone's Linears, applied per row.

For a Linear ``y = W x + b`` the task adds ``scale · B (A x)`` to its own rows
only (see :mod:`fmplex.triton_backend.segments`), so rows of many LoRA tasks
of any ranks and of plain tasks share one forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.artifacts import ArtifactError
from fmplex.triton_backend.segments import TARGETS

from .base import Extension, LinearDelta


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> LinearDelta:
    def delta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scale

    return delta


class LoraExtension(Extension):
    kind = "lora"

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        scales = (self.manifest.get("lora") or {}).get("scales")
        if not isinstance(scales, dict) or not scales:
            raise ArtifactError(f"{self.where}: manifest lacks lora.scales")
        config = context.get("config")
        layers = getattr(config, "num_hidden_layers", None)
        for path, scale in scales.items():
            parts = path.split(".")
            if len(parts) < 4 or parts[:2] != ["encoder", "layer"] or ".".join(parts[3:]) not in TARGETS:
                raise ArtifactError(f"{self.where}: LoRA target '{path}' is not a backbone Linear")
            if layers is not None and not 0 <= int(parts[2]) < layers:
                raise ArtifactError(f"{self.where}: LoRA target '{path}' is beyond the backbone's {layers} layers")
            a = tensors.get(f"lora.{path}.A")
            b = tensors.get(f"lora.{path}.B")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ArtifactError(f"{self.where}: LoRA weights for '{path}' are missing or mismatched")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ArtifactError(f"{self.where}: LoRA weights for '{path}' hold NaN or Inf")
            self.deltas[path] = _delta(a.float(), b.float(), float(scale))
        self._check_shapes(tensors, config)

    def _check_shapes(self, tensors: dict[str, torch.Tensor], config: Any) -> None:
        if config is None:
            return
        h, inter = config.hidden_size, config.intermediate_size
        io = {"intermediate.dense": (h, inter), "output.dense": (inter, h)}
        for path in self.deltas:
            target = ".".join(path.split(".")[3:])
            fan_in, fan_out = io.get(target, (h, h))
            a, b = tensors[f"lora.{path}.A"], tensors[f"lora.{path}.B"]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise ArtifactError(
                    f"{self.where}: LoRA for '{path}' maps {a.shape[1]}->{b.shape[0]}, the backbone Linear is {fan_in}->{fan_out}"
                )
