"""The interface every task extension implements.

A task = an optional change to the shared backbone's forward pass (its *body*:
LoRA deltas, bottleneck adapters, a soft prompt, forked top layers) plus a
*head* that turns hidden states into the task's answer. The executor runs the
shared forward once for all rows of a batch and asks each extension only for
the parts that apply to its own rows (LoRAX-style segments): weights live
here, batch metadata (which rows belong to whom) stays with the executor.
One small module per kind; :mod:`.heads` holds the heads they share.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fmplex.artifacts import ArtifactError
from fmplex.backbones import BackboneSpec
from fmplex.kinds import head_type
from fmplex.row_deltas import RowDelta

from .heads import HEADS, Head
from .outputs import SlotOutputs, require  # noqa: F401 - part of this interface; heads use them too

# What a task makes of one shared Linear's output for its rows (see fmplex.row_deltas).
LinearDelta = RowDelta


class Extension:
    kind: ClassVar[str] = ""

    # Body: what this task changes in the shared forward (defaults: nothing).
    prompt: torch.Tensor | None = None  # [virtual tokens, hidden] prepended to the input embeddings
    fork_point: int | None = None  # layers >= fork_point are the task's own copies
    fork_layers: list[torch.nn.Module]

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: BackboneSpec, **context: Any) -> None:
        self.manifest = manifest
        self.spec = spec
        device = context.get("device")
        if device is not None and str(device) != "cpu":  # a GPU host: weights live beside the backbone
            tensors = {k: v.to(device) for k, v in tensors.items()}
        self.tensors = tensors
        self.where = f"task '{manifest.get('task', '?')}'"
        self.deltas: dict[str, LinearDelta] = {}
        self.fork_layers = []
        self.load_body(tensors, **context)
        if device is not None:
            self.fork_layers = [layer.to(device) for layer in self.fork_layers]
        self.head: Head = make_head(manifest, tensors, spec, self.where, **context)

    def load_body(self, tensors: dict[str, torch.Tensor], **context: Any) -> None:
        """Build the body from the artifact; raise ArtifactError if it does not fit."""

    @property
    def prompt_len(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[0])

    def outputs(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> SlotOutputs:
        """Answers for this task's rows: ``hidden``/``mask`` cover the input
        tokens only (soft-prompt positions removed); ``first`` is the state at
        position 0 of the full sequence (what a BERT pooler reads)."""
        return self.head(hidden, mask, first)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def require(self, name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        return require(self.tensors, name, shape, self.where)


def make_head(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], spec: BackboneSpec, where: str, **context: Any) -> Head:
    kind = head_type(manifest)
    if kind == "onnx":
        from .onnx_head import OnnxHead  # noqa: PLC0415 - onnxruntime only when used

        return OnnxHead(manifest, tensors, spec, where, artifact_dir=context.get("artifact_dir"))
    cls = HEADS.get(kind)
    if cls is None:
        raise ArtifactError(f"{where}: unknown head type '{kind}' (known: {', '.join(sorted([*HEADS, 'onnx']))})")
    return cls(manifest, tensors, spec, where)


def target_layer(path: str, config: Any, where: str, what: str) -> int:
    """Layer index of a delta's target ``encoder.layer.<j>.<target>``; refuses any other path."""
    from fmplex.triton_backend.segments import TARGETS  # noqa: PLC0415 - segments imports torch-heavy transformers parts

    parts = path.split(".")
    if len(parts) < 4 or parts[:2] != ["encoder", "layer"] or not parts[2].isdigit() or ".".join(parts[3:]) not in TARGETS:
        raise ArtifactError(f"{where}: {what} target '{path}' is not a backbone Linear")
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and not 0 <= int(parts[2]) < layers:
        raise ArtifactError(f"{where}: {what} target '{path}' is beyond the backbone's {layers} layers")
    return int(parts[2])


def linear_shape(path: str, config: Any) -> tuple[int, int] | None:
    """(in, out) features of the backbone Linear at ``path`` (None without a config)."""
    if config is None:
        return None
    h, inter = int(config.hidden_size), int(config.intermediate_size)
    target = ".".join(path.split(".")[3:])
    return {"intermediate.dense": (h, inter), "output.dense": (inter, h)}.get(target, (h, h))
