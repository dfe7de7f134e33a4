"""``classifier``: the backbone as it is, with a linear head on the pooled vector."""

from __future__ import annotations

from .base import Extension


class ClassifierExtension(Extension):
    kind = "classifier"
