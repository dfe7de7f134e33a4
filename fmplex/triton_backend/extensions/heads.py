"""Task heads: from hidden states to what a vFM returns.

Every kind ends in one of these. ``embedding`` and ``linear`` read the pooled
sentence vector (masked mean over the input tokens, L2-normalised — the
backbone's own sentence embedding); ``cls`` is BERT's pooler + classifier as in
``BertForSequenceClassification``; ``token`` classifies every token as in
``BertForTokenClassification``; ``onnx`` runs an ONNX graph (ONNX Runtime) on
the pooled vector or on the token states.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch

from fmplex.artifacts import ArtifactError
from fmplex.backbones import BackboneSpec, pool

from .outputs import SlotOutputs, require

class Head(abc.ABC):
    name: ClassVar[str]

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: BackboneSpec, where: str) -> None:
        self.manifest, self.spec, self.where = manifest, spec, where
        self.load(tensors)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027 - a head without weights keeps nothing
        """Check and keep this head's weights."""

    def labels(self, count: int | None = None) -> np.ndarray:
        labels = self.manifest.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ArtifactError(f"{self.where}: manifest needs 'labels': a list of at least two strings")
        if count is not None and len(labels) != count:
            raise ArtifactError(f"{self.where}: {len(labels)} labels for a head with {count} outputs")
        return np.array([x.encode("utf-8") for x in labels], dtype=object)

    @abc.abstractmethod
    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> Any: ...

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(self.spec, hidden, mask)

    def _w(self, tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        return require(tensors, name, shape, self.where)


def _outputs(**kw: Any) -> Any:
    return SlotOutputs(**kw)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32, copy=False)


class EmbeddingHead(Head):
    name = "embedding"

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> Any:
        return _outputs(out=_np(self.pooled(hidden, mask)))


class LinearHead(Head):
    """``logits = W · pooled + b`` (what ``fmplex task create --train`` fits)."""

    name = "linear"

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        n = len(self.manifest.get("labels") or [])
        self.weight = self._w(tensors, "head.weight", (n, self.spec.hidden_size))
        self.bias = self._w(tensors, "head.bias", (n,))
        self.names = self.labels(n)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> Any:
        logits = _np(torch.nn.functional.linear(self.pooled(hidden, mask), self.weight, self.bias))
        return _outputs(out=logits, txt=self.names[logits.argmax(axis=1)])


class ClsHead(Head):
    """BERT pooler (dense + tanh on position 0) then a linear classifier."""

    name = "cls"

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        h = self.spec.hidden_size
        n = len(self.manifest.get("labels") or [])
        self.pool_w = self._w(tensors, "head.pooler.weight", (h, h))
        self.pool_b = self._w(tensors, "head.pooler.bias", (h,))
        self.weight = self._w(tensors, "head.weight", (n, h))
        self.bias = self._w(tensors, "head.bias", (n,))
        self.names = self.labels(n)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> Any:
        pooled = torch.tanh(torch.nn.functional.linear(first, self.pool_w, self.pool_b))
        logits = _np(torch.nn.functional.linear(pooled, self.weight, self.bias))
        return _outputs(out=logits, txt=self.names[logits.argmax(axis=1)])


class TokenHead(Head):
    """One linear classifier applied to every input token's state."""

    name = "token"

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        n = len(self.manifest.get("labels") or [])
        self.weight = self._w(tensors, "head.weight", (n, self.spec.hidden_size))
        self.bias = self._w(tensors, "head.bias", (n,))
        self.labels(n)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> Any:
        logits = _np(torch.nn.functional.linear(hidden, self.weight, self.bias))
        lengths = mask.sum(dim=1).tolist()
        return _outputs(tok=[logits[i, : int(n)] for i, n in enumerate(lengths)])


HEADS: dict[str, type[Head]] = {h.name: h for h in (EmbeddingHead, LinearHead, ClsHead, TokenHead)}
