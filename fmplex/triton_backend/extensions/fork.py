"""``fork``: the task owns fine-tuned copies of the backbone's top layers.

Below the fork point a task's rows run the shared layers with everyone else's;
from it up the executor runs them, all rows of the task together, through the
task's own ``BertLayer`` copies built here (see ``Executor.forward``). The
head (embedding, BERT pooler + classifier, or per-token classifier) follows.
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.artifacts import ArtifactError

from .base import Extension, require

# Parameters of one BertLayer (its state_dict names), as the importer stores them.
LAYER_PARAMS = tuple(
    f"{module}.{p}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for p in ("weight", "bias")
)
PREFIX = "fork.layer."


class ForkExtension(Extension):
    kind = "fork"

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        from transformers.models.bert.modeling_bert import BertLayer  # noqa: PLC0415

        config = context.get("config")
        if config is None:
            raise ArtifactError(f"{self.where}: a fork needs the backbone's transformers config to build its layers")
        n = int(config.num_hidden_layers)
        point = (self.manifest.get("fork") or {}).get("point")
        if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point <= n:
            raise ArtifactError(f"{self.where}: manifest fork.point must be a layer number in 0..{n}, not {point!r}")
        expected = {f"{PREFIX}{j}.{p}" for j in range(point, n) for p in LAYER_PARAMS}
        stray = sorted(k for k in tensors if k.startswith(PREFIX) and k not in expected)
        if stray:
            raise ArtifactError(f"{self.where}: unexpected fork tensor(s) for fork point {point}: {', '.join(stray[:4])}")
        layers: list[torch.nn.Module] = []
        held = dict(tensors)
        for j in range(point, n):
            # The layer keeps a reference to this very config object, so its
            # attention implementation (eager / sdpa) is always the one the
            # shared layers and the executor's attention mask use.
            layer = BertLayer(config, layer_idx=j)
            state = {}
            for p, ref in layer.state_dict().items():
                name = f"{PREFIX}{j}.{p}"
                state[p] = require(tensors, name, tuple(ref.shape), self.where).contiguous()
                held[name] = state[p]
            try:
                # assign=True: the layer runs on these tensors, no second copy.
                layer.load_state_dict(state, strict=True, assign=True)
            except (RuntimeError, ValueError) as exc:
                raise ArtifactError(f"{self.where}: fork layer {j} does not fit the backbone: {exc}") from None
            layer.eval().requires_grad_(False)
            layers.append(layer)
        # What this task holds: the layers' own (fp32) tensors + the head's, so
        # Extension.nbytes counts the forked layers exactly once.
        self.tensors = held
        self.fork_point = point
        self.fork_layers = layers
