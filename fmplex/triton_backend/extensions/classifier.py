"""``classifier``: a linear head on the pooled embedding (``logits = W x + b``)."""

from __future__ import annotations

import numpy as np
import torch

from fmplex.artifacts import ArtifactError

from .base import Extension


class ClassifierExtension(Extension):
    kind = "classifier"

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        labels = self.manifest.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ArtifactError("classifier manifest needs 'labels': a list of at least two strings")
        where = f"task '{self.manifest.get('task', '?')}'"
        self.weight = self.require(tensors, "head.weight", (len(labels), self.spec.hidden_size), where)
        self.bias = self.require(tensors, "head.bias", (len(labels),), where)
        self.labels = np.array([x.encode("utf-8") for x in labels], dtype=object)

    def outputs(self, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits = torch.nn.functional.linear(pooled, self.weight, self.bias)
        out = logits.detach().cpu().numpy().astype(np.float32, copy=False)
        return out, self.labels[out.argmax(axis=1)]
