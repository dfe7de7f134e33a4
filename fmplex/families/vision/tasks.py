"""A vision task as the host runs it: an optional *body* inside the shared pass and a *head* on the pooled features.

Kinds (``manifest["kind"]``) and what their artifact holds:

- ``embedding``: nothing; answers the pooled features ``[rows, 1280]``;
- ``classifier``: a linear probe ``head.weight [labels, 1280]``, ``head.bias``;
- ``onnx``: an ONNX graph (``head.onnx``) on the pooled features, run by ONNX Runtime;
- ``fork``: the task's own copies of the stages from its fork point up
  (``fork.<stage-prefix><param>``) and a linear head (the network's ``_fc``);
- ``lora``: low-rank deltas on the 1x1 convolutions of some blocks
  (``lora.<block>.<expand|project>.A [r, in]`` / ``.B [out, r]``, scale in the
  manifest), and a linear head or none (embedding).

A task answers in one of two output families, as text tasks do:
``embedding`` (``EMBEDDING``) or ``classifier`` (``LOGITS`` + ``LABEL``).
Everything that can be checked is checked at load (:class:`ArtifactError`),
so that a task that loads cannot fail the shared pass of other tasks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fmplex.artifacts import ArtifactError

from .model import FEATURES

BACKBONE = "fm.efficientnet"
KINDS = ("embedding", "classifier", "fork", "onnx", "lora")
OUTPUT_FAMILIES = ("embedding", "classifier")


@dataclasses.dataclass
class TaskOutputs:
    """A task's answers for its rows: ``out`` = EMBEDDING or LOGITS, ``txt`` = LABEL (classifiers)."""

    out: np.ndarray  # [rows, d] float32
    txt: np.ndarray | None = None  # [rows] of bytes


def require(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...], where: str) -> torch.Tensor:
    """A float tensor of the artifact with this shape (None = any size), finite."""
    t = tensors.get(name)
    if t is None:
        raise ArtifactError(f"{where}: tensor '{name}' is missing")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise ArtifactError(f"{where}: tensor '{name}' has shape {list(t.shape)}, expected {want}")
    if not t.is_floating_point():
        raise ArtifactError(f"{where}: tensor '{name}' is {t.dtype}, expected a float tensor")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ArtifactError(f"{where}: tensor '{name}' holds NaN or infinite values")
    return t


def read_labels(manifest: dict[str, Any], count: int, where: str) -> np.ndarray:
    labels = manifest.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise ArtifactError(f"{where}: manifest needs 'labels': a list of at least two non-empty strings")
    if len(labels) != count:
        raise ArtifactError(f"{where}: {len(labels)} labels for a head with {count} outputs")
    return np.array([x.encode("utf-8") for x in labels], dtype=object)


class Head:
    """Pooled features -> the task's answer."""

    family: str = "embedding"

    def __call__(self, pooled: torch.Tensor) -> TaskOutputs:
        return TaskOutputs(out=_np(pooled))

    @property
    def nbytes(self) -> int:
        return 0


class LinearHead(Head):
    family = "classifier"

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        self.weight = require(tensors, "head.weight", (None, FEATURES), where)
        self.bias = require(tensors, "head.bias", (int(self.weight.shape[0]),), where)
        self.names = read_labels(manifest, int(self.weight.shape[0]), where)

    def __call__(self, pooled: torch.Tensor) -> TaskOutputs:
        logits = torch.nn.functional.linear(pooled, self.weight, self.bias)
        out = _np(logits)
        return TaskOutputs(out=out, txt=self.names[out.argmax(axis=1)])

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() + self.bias.numel()) * 4


class OnnxHead(Head):
    """An ONNX graph with one float input ``[rows, 1280]`` (the pooled features)."""

    def __init__(self, manifest: dict[str, Any], artifact_dir: Path | None, where: str) -> None:
        from fmplex.triton_backend.extensions.onnx_head import check_io, open_session, session_io  # noqa: PLC0415

        head = manifest.get("head") or {}
        self.family = head.get("family", "classifier")
        if self.family not in OUTPUT_FAMILIES:
            raise ArtifactError(f"{where}: an ONNX head of a vision task is 'classifier' or 'embedding', not {self.family!r}")
        file = head.get("file")
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise ArtifactError(f"{where}: manifest head.file must name a file in the artifact directory, got {file!r}")
        if artifact_dir is None or not (Path(artifact_dir) / file).is_file():
            raise ArtifactError(f"{where}: ONNX head file {file} is missing")
        path = Path(artifact_dir) / file
        self.file_bytes = path.stat().st_size
        self.names: np.ndarray | None = None
        count = None
        if self.family == "classifier":
            labels = manifest.get("labels")
            count = len(labels) if isinstance(labels, list) else 0
            self.names = read_labels(manifest, count, where)
        try:
            self.session = open_session(str(path))
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise ArtifactError(f"{where}: ONNX Runtime cannot load {path}: {exc}") from None
        inputs, outputs = session_io(self.session)
        problems = check_io(inputs, outputs, "pooled", self.family, FEATURES, count)
        if problems:
            raise ArtifactError(f"{where}: ONNX head {path.name}: {'; '.join(problems)}")
        self.input_name = inputs[0][0]
        self.output_name = outputs[0][0]

    def __call__(self, pooled: torch.Tensor) -> TaskOutputs:
        rows = int(pooled.shape[0])
        feeds = {self.input_name: np.ascontiguousarray(pooled.detach().cpu().numpy(), dtype=np.float32)}
        out = np.asarray(self.session.run([self.output_name], feeds)[0])
        if out.ndim != 2 or out.shape[0] != rows:
            raise ValueError(f"ONNX head returned shape {list(out.shape)}, expected [{rows}, d]")
        out = np.ascontiguousarray(out, dtype=np.float32)
        if self.names is None:
            return TaskOutputs(out=out)
        if out.shape[1] != len(self.names):
            raise ValueError(f"ONNX head returned {out.shape[1]} scores per row for {len(self.names)} labels")
        return TaskOutputs(out=out, txt=self.names[out.argmax(axis=1)])

    @property
    def nbytes(self) -> int:
        return self.file_bytes


class VisionTask:
    """One loaded task. Bodies override :attr:`fork_point`/:meth:`run_own` (fork)
    or :meth:`pointwise_delta` (LoRA); the head comes from ``manifest["head"]``."""

    kind: ClassVar[str] = ""
    fork_point: int | None = None  # stages >= fork_point are the task's own (None: all shared)
    lora_blocks: frozenset[int] = frozenset()  # blocks where pointwise_delta applies

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], artifact_dir: Path | None = None,
                 device: torch.device | None = None) -> None:
        self.manifest = manifest
        self.where = f"task '{manifest.get('task', '?')}'"
        self.device = device or torch.device("cpu")
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self.load_body(tensors)
        head_type = (manifest.get("head") or {}).get("type", "embedding")
        if head_type == "embedding":
            self.head: Head = Head()
        elif head_type == "linear":
            self.head = LinearHead(manifest, tensors, self.where)
        elif head_type == "onnx":
            self.head = OnnxHead(manifest, artifact_dir, self.where)
        else:
            raise ArtifactError(f"{self.where}: unknown head type {head_type!r} (known: embedding, linear, onnx)")

    @property
    def family(self) -> str:
        return self.head.family

    def load_body(self, tensors: dict[str, torch.Tensor]) -> None:
        """Build the body from the artifact; raise ArtifactError if it does not fit."""

    def run_own(self, x: torch.Tensor) -> torch.Tensor:
        """This task's own stages from its fork point up (forks only)."""
        raise NotImplementedError

    def pointwise_delta(self, block: int, which: str, x_in: torch.Tensor) -> torch.Tensor | None:
        """What to add to the output of block ``block``'s ``which`` 1x1 convolution for this task's rows."""
        return None

    @property
    def nbytes(self) -> int:
        return self.head.nbytes


class EmbeddingTask(VisionTask):
    kind = "embedding"


class ClassifierTask(VisionTask):
    kind = "classifier"


class OnnxTask(VisionTask):
    kind = "onnx"


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
