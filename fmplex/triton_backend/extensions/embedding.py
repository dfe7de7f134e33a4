"""``embedding``: the backbone's own pooled sentence vector, no weights."""

from __future__ import annotations

import numpy as np
import torch

from .base import Extension


class EmbeddingExtension(Extension):
    kind = "embedding"

    def outputs(self, pooled: torch.Tensor) -> tuple[np.ndarray, None]:
        return pooled.detach().cpu().numpy().astype(np.float32, copy=False), None
