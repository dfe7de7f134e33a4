"""A series task as the host runs it: what it reads of the shared trunk pass and what it answers.

Kinds (``manifest["kind"]``) and what their artifact holds:

- ``forecast``: nothing; Fracast's own head, zero-shot. Manifest options
  ``horizon`` (default steps), ``max_horizon`` (the most a request may ask),
  ``quantiles`` (a subset of the model's 0.1..0.9);
- ``fork``: a fine-tuned forecast head: only the head tensors that differ from
  the packaged weights (``head.<name>``); the rest of the head is the base's.
  Same options as ``forecast``;
- ``classifier``: a linear probe on the series embedding
  (``head.weight [labels, 128]``, ``head.bias``, ``labels`` in the manifest);
- ``embedding``: nothing; answers the series embedding ``[rows, 128]``.

Every kind also reads ``min_context`` (finite values a row needs, >= 8) and
``missing`` ("mask": NaN inside a row is a missing observation; "reject").
Output families: ``forecast`` (FORECAST = the median, QUANTILES), ``classifier``
(LOGITS, LABEL), ``embedding`` (EMBEDDING). Everything that can be checked is
checked at load (:class:`ArtifactError`), so a task that loads cannot fail the
shared pass of other tasks.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch

from fmplex.artifacts import ArtifactError

from .model import BACKBONE, EMBEDDING, MIN_FINITE, Backbone

KINDS = ("forecast", "fork", "classifier", "embedding")
OUTPUT_FAMILIES = ("forecast", "classifier", "embedding")
MAX_HORIZON = 480  # ten trunk passes per row: the most any task may allow


def _where(manifest: dict[str, Any]) -> str:
    return f"task '{manifest.get('task', '?')}'"


def _int_option(manifest: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = manifest.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ArtifactError(f"{_where(manifest)}: '{key}' must be an integer in {lo}..{hi}, got {value!r}")
    return value


class SeriesTask:
    """One loaded task; subclasses say what they answer from the trunk's output."""

    kind: ClassVar[str] = ""
    family: ClassVar[str] = ""
    forecasts: ClassVar[bool] = False

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], backbone: Backbone) -> None:
        self.manifest = manifest
        self.name = str(manifest.get("task", "?"))
        self.where = _where(manifest)
        self.context_width = backbone.width
        self.min_context = _int_option(manifest, "min_context", MIN_FINITE, MIN_FINITE, backbone.width)
        self.missing = manifest.get("missing", "mask")
        if self.missing not in ("mask", "reject"):
            raise ArtifactError(f"{self.where}: 'missing' must be 'mask' or 'reject', got {self.missing!r}")
        self.load(tensors, backbone)

    def load(self, tensors: dict[str, torch.Tensor], backbone: Backbone) -> None:
        """Build what the task runs; raise ArtifactError if the artifact does not fit."""

    @property
    def nbytes(self) -> int:
        return 0


class ForecastTask(SeriesTask):
    kind = "forecast"
    family = "forecast"
    forecasts = True
    head: torch.nn.Module | None = None  # None: the backbone's own head (shared by every such task)

    def load(self, tensors: dict[str, torch.Tensor], backbone: Backbone) -> None:
        m = self.manifest
        self.max_horizon = _int_option(m, "max_horizon", max(backbone.native_horizon, int(m.get("horizon", 0) or 0)),
                                       1, MAX_HORIZON)
        self.horizon = _int_option(m, "horizon", min(backbone.native_horizon, self.max_horizon), 1, self.max_horizon)
        wanted = m.get("quantiles", list(backbone.quantiles))
        if not isinstance(wanted, list) or not wanted or not all(isinstance(q, (int, float)) for q in wanted):
            raise ArtifactError(f"{self.where}: 'quantiles' must be a non-empty list of numbers")
        index = []
        for q in wanted:
            hit = [i for i, b in enumerate(backbone.quantiles) if abs(b - float(q)) < 1e-6]
            if not hit:
                raise ArtifactError(f"{self.where}: quantile {q} is not one the model predicts {list(backbone.quantiles)}")
            index.append(hit[0])
        self.quantiles = [backbone.quantiles[i] for i in index]
        self.quantile_index = torch.tensor(index, dtype=torch.long)


class ForkTask(ForecastTask):
    """A fine-tuned forecast head: the base head with the artifact's tensors in place of the base's."""

    kind = "fork"

    def load(self, tensors: dict[str, torch.Tensor], backbone: Backbone) -> None:
        super().load(tensors, backbone)
        if self.manifest.get("backbone_fingerprint") != backbone.fingerprint:
            raise ArtifactError(
                f"{self.where}: made for backbone weights {self.manifest.get('backbone_fingerprint')!r}, "
                f"this host serves {backbone.fingerprint} ({backbone.weights})"
            )
        own = {k.removeprefix("head."): v for k, v in tensors.items()}
        if not own or any(not k.startswith("head.") for k in tensors):
            raise ArtifactError(f"{self.where}: a fork's weights are head.* tensors (at least one)")
        base = backbone.head.state_dict()
        for k, v in own.items():
            if k not in base:
                raise ArtifactError(f"{self.where}: tensor 'head.{k}' is not a parameter of the forecast head")
            if tuple(v.shape) != tuple(base[k].shape) or not v.is_floating_point():
                raise ArtifactError(f"{self.where}: tensor 'head.{k}' has shape {list(v.shape)} ({v.dtype}), "
                                    f"expected {list(base[k].shape)} float")
            if not torch.isfinite(v).all():
                raise ArtifactError(f"{self.where}: tensor 'head.{k}' holds NaN or infinite values")
        head = copy.deepcopy(backbone.head)
        head.load_state_dict({**base, **{k: v.to(base[k].dtype) for k, v in own.items()}}, strict=True)
        self.head = head.to(backbone.device).eval()
        self.own_bytes = sum(v.numel() * 4 for v in own.values())

    @property
    def nbytes(self) -> int:
        return self.own_bytes


class EmbeddingTask(SeriesTask):
    kind = "embedding"
    family = "embedding"

    def answer(self, embedding: torch.Tensor) -> dict[str, np.ndarray]:
        return {"EMBEDDING": _np(embedding)}


class ClassifierTask(SeriesTask):
    kind = "classifier"
    family = "classifier"

    def load(self, tensors: dict[str, torch.Tensor], backbone: Backbone) -> None:
        if self.manifest.get("backbone_fingerprint") != backbone.fingerprint:
            raise ArtifactError(
                f"{self.where}: trained on backbone weights {self.manifest.get('backbone_fingerprint')!r}, "
                f"this host serves {backbone.fingerprint} ({backbone.weights})"
            )
        w, b = tensors.get("head.weight"), tensors.get("head.bias")
        if w is None or b is None:
            raise ArtifactError(f"{self.where}: a classifier needs tensors head.weight and head.bias")
        if w.dim() != 2 or w.shape[1] != EMBEDDING or b.shape != (w.shape[0],):
            raise ArtifactError(f"{self.where}: head.weight {list(w.shape)} / head.bias {list(b.shape)} do not form "
                                f"a linear head on the {EMBEDDING}-wide embedding")
        if not (w.is_floating_point() and b.is_floating_point()) or not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ArtifactError(f"{self.where}: head tensors must be finite floats")
        labels = self.manifest.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise ArtifactError(f"{self.where}: manifest needs 'labels': a list of at least two non-empty strings")
        if len(labels) != w.shape[0]:
            raise ArtifactError(f"{self.where}: {len(labels)} labels for a head with {w.shape[0]} outputs")
        self.weight = w.float().to(backbone.device)
        self.bias = b.float().to(backbone.device)
        self.labels = np.array([x.encode("utf-8") for x in labels], dtype=object)

    def answer(self, embedding: torch.Tensor) -> dict[str, np.ndarray]:
        logits = _np(torch.nn.functional.linear(embedding.to(self.weight.device), self.weight, self.bias))
        return {"LOGITS": logits, "LABEL": self.labels[logits.argmax(axis=1)]}

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() + self.bias.numel()) * 4


CLASSES: dict[str, type[SeriesTask]] = {
    "forecast": ForecastTask, "fork": ForkTask, "classifier": ClassifierTask, "embedding": EmbeddingTask,
}


def load_task(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], backbone: Backbone) -> SeriesTask:
    """The task of an artifact (manifest + tensors) on this backbone."""
    kind = manifest.get("kind")
    if manifest.get("backbone") != BACKBONE:
        raise ArtifactError(f"{_where(manifest)}: made for backbone {manifest.get('backbone')!r}, not '{BACKBONE}'")
    if kind not in CLASSES:
        raise ArtifactError(f"{_where(manifest)}: kind {kind!r} is not a series kind (known: {', '.join(KINDS)})")
    return CLASSES[kind](manifest, tensors, backbone)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
