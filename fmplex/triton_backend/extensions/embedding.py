"""``embedding``: the backbone as it is; the head returns the sentence vector."""

from __future__ import annotations

from .base import Extension


class EmbeddingExtension(Extension):
    kind = "embedding"
