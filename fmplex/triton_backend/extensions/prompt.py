"""``prompt``: PEFT prompt tuning — soft prompt vectors before the input.

The body is only ``self.prompt`` [P, hidden]: the executor builds each of the
task's rows as ``[prompt ; token embeddings]`` with positions counted from 0 at
the first prompt vector and the prompt always attended (as PEFT does), so rows
of prompt tasks of any lengths and of plain tasks share one forward pass. The
head then sees the input tokens only (prompt positions stripped).
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.artifacts import ArtifactError

from .base import Extension


class PromptExtension(Extension):
    kind = "prompt"

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        config = context.get("config")
        hidden = int(getattr(config, "hidden_size", None) or self.spec.hidden_size)
        if hidden != self.spec.hidden_size:
            raise ArtifactError(f"{self.where}: backbone config has hidden size {hidden}, the catalogue says {self.spec.hidden_size}")
        prompt = self.require("prompt.embeddings", (None, hidden))
        virtual = int(prompt.shape[0])
        if virtual < 1:
            raise ArtifactError(f"{self.where}: the soft prompt has no vectors")
        if virtual >= self.spec.max_tokens:
            raise ArtifactError(
                f"{self.where}: {virtual} prompt vectors leave no room for input within the limit of {self.spec.max_tokens} tokens"
            )
        declared = (self.manifest.get("prompt") or {}).get("virtual_tokens")
        if declared is not None and declared != virtual:
            raise ArtifactError(f"{self.where}: manifest says {declared} virtual tokens, the tensor holds {virtual}")
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and virtual >= int(positions):
            raise ArtifactError(f"{self.where}: {virtual} prompt vectors exceed the backbone's {positions} positions")
        self.prompt = prompt.contiguous()
