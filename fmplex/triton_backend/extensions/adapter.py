"""``adapter``: Houlsby-style bottleneck adapters, applied per row.

After a layer's attention output projection and/or its MLP output projection
``y = W x + b``, the task's rows get ``y + up(act(down(y)))`` — before dropout,
the residual and the LayerNorm, as in Houlsby et al. (2019). The adapter is a
delta on that Linear (see :mod:`fmplex.row_deltas`), so rows of
many adapter tasks of any bottleneck, of LoRA tasks and of plain tasks share
one forward pass. Source format: :mod:`fmplex.control.importers.adapter`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from fmplex.artifacts import ArtifactError

from .base import Extension, LinearDelta

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,  # exact (erf) form
    "tanh": torch.tanh,
}
_PATH = re.compile(r"^encoder\.layer\.(\d+)\.(attention\.output\.dense|output\.dense)$")


def _delta(dw: torch.Tensor, db: torch.Tensor, uw: torch.Tensor, ub: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> LinearDelta:
    def delta(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return y + torch.nn.functional.linear(act(torch.nn.functional.linear(y, dw, db)), uw, ub)

    return delta


class AdapterExtension(Extension):
    kind = "adapter"

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        spec = self.manifest.get("adapter")
        if not isinstance(spec, dict):
            raise ArtifactError(f"{self.where}: manifest lacks 'adapter'")
        name = spec.get("activation", "relu")
        act = ACTIVATIONS.get(name) if isinstance(name, str) else None
        if act is None:
            raise ArtifactError(f"{self.where}: unknown adapter activation {name!r} (known: {', '.join(ACTIVATIONS)})")
        modules = spec.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(p, str) for p in modules):
            raise ArtifactError(f"{self.where}: manifest lacks adapter.modules (a list of Linear paths)")
        if len(set(modules)) != len(modules):
            raise ArtifactError(f"{self.where}: adapter.modules lists a module twice")
        layers = getattr(context.get("config"), "num_hidden_layers", None)
        h = self.spec.hidden_size
        for path in modules:
            m = _PATH.match(path)
            if not m:
                raise ArtifactError(f"{self.where}: adapter on '{path}' is not after an attention or MLP output projection")
            if layers is not None and not 0 <= int(m.group(1)) < layers:
                raise ArtifactError(f"{self.where}: adapter on '{path}' is beyond the backbone's {layers} layers")
            dw = self.require(f"adapter.{path}.down.weight", (None, h))
            b = int(dw.shape[0])
            if b < 1:
                raise ArtifactError(f"{self.where}: adapter on '{path}' has an empty bottleneck")
            db = self.require(f"adapter.{path}.down.bias", (b,))
            uw = self.require(f"adapter.{path}.up.weight", (h, b))
            ub = self.require(f"adapter.{path}.up.bias", (h,))
            self.deltas[path] = _delta(dw, db, uw, ub, act)
        listed = {f"adapter.{p}.{part}" for p in modules for part in ("down.weight", "down.bias", "up.weight", "up.bias")}
        stray = sorted(k for k in tensors if k.startswith("adapter.") and k not in listed)
        if stray:
            raise ArtifactError(f"{self.where}: adapter tensors not listed in adapter.modules: {', '.join(stray[:4])}")
