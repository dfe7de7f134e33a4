"""Per-row low-rank deltas inside one shared forward pass (segmented LoRA).

Each backbone Linear that a task may adapt is wrapped once, at host start, in
:class:`SegmentedLinear`. Before every layer call the executor says which rows
of the (sub-)batch belong to which extension; the wrapper computes the shared
``y = W x + b`` once for all rows and adds each task's delta only to its own
rows, gathered and scattered by index (the segmented-gather idea of
Punica/LoRAX, in plain torch). A batch without such tasks pays one empty loop.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

# The Linear modules of a BERT layer that LoRA and adapters may target, by
# their path inside the layer (PEFT names them the same way).
TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


class SegmentContext(threading.local):
    """Which extension owns which rows of the batch the layers now see.

    Thread-local: a host runs several worker threads through the same wrapped
    backbone at once, each with its own batch.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[Any, torch.Tensor]] = []

    def set_rows(self, owners: list[Any]) -> None:
        """``owners[i]`` is the extension of row i of the current (sub-)batch."""
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, ext in enumerate(owners):
            if ext is not None and ext.deltas:
                groups.setdefault(id(ext), (ext, []))[1].append(i)
        self.groups = [(ext, torch.tensor(rows, dtype=torch.long)) for ext, rows in groups.values()]


class SegmentedLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, path: str, ctx: SegmentContext) -> None:
        super().__init__()
        self.base, self.path, self.ctx = base, path, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for ext, rows in self.ctx.groups:
            delta = ext.deltas.get(self.path)
            if delta is not None:
                y.index_add_(0, rows, delta(x.index_select(0, rows), y.index_select(0, rows)))
        return y


def install(model: torch.nn.Module, ctx: SegmentContext) -> list[str]:
    """Wrap every target Linear of a BERT encoder; returns their full paths."""
    paths = []
    for j, layer in enumerate(model.encoder.layer):  # type: ignore[union-attr]
        for target in TARGETS:
            parent_path, _, attr = target.rpartition(".")
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr)
            if isinstance(base, SegmentedLinear):
                continue
            path = f"encoder.layer.{j}.{target}"
            setattr(parent, attr, SegmentedLinear(base, path, ctx))
            paths.append(path)
    return paths
