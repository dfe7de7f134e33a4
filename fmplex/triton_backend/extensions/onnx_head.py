"""``onnx``: a head that is an ONNX graph, run by ONNX Runtime (CPU).

The backbone runs as it is; the task's head is ``head.onnx`` in its artifact
directory. Its inputs depend on ``manifest.head.input``:

- ``pooled``: one float input of rank 2 (any name), fed the backbone's
  sentence vector [rows, hidden] (masked mean, L2-normalised);
- ``hidden``: a float input named ``hidden`` [rows, tokens, hidden] with the
  input tokens' states, and optionally an int64 input named ``mask``
  [rows, tokens] (1 = token, 0 = padding).

Its first output, by ``manifest.head.family``: ``classifier`` -> [rows,
labels] logits (LOGITS, and LABEL = the argmax's label); ``embedding`` ->
[rows, d] (EMBEDDING, as the graph returns it); ``token`` -> [rows, tokens,
labels] (TOKEN_LOGITS, each row cut to its own length). Batch and token
dimensions must be dynamic. What can be checked from the graph's declared
inputs and outputs is checked at load (ArtifactError); what only shows when it
runs (an output width that does not match the labels, a Runtime error) raises
at call time, which fails that task's rows only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fmplex.artifacts import ArtifactError
from fmplex.backbones import BackboneSpec

from .heads import Head, _outputs

INPUT_MODES = ("pooled", "hidden")
FAMILIES = ("classifier", "embedding", "token")
FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")
# family -> rank of the first output
OUTPUT_RANK = {"classifier": 2, "embedding": 2, "token": 3}


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def check_io(
    inputs: Sequence[tuple[str, str, Sequence[Any] | None]],
    outputs: Sequence[tuple[str, str, Sequence[Any] | None]],
    mode: str,
    family: str,
    hidden_size: int,
    labels: int | None,
) -> list[str]:
    """Problems of a graph's declared inputs/outputs for this input mode and
    family: ``(name, type, shape)`` as ONNX Runtime reports them (a shape dim
    is an int, a symbolic name or None). Empty list = fits.

    Shared by the importer (refuses at ``task create``) and the head (at load).
    """
    if mode not in INPUT_MODES:
        return [f"unknown input mode {mode!r} (known: {', '.join(INPUT_MODES)})"]
    if family not in FAMILIES:
        return [f"unknown family {family!r} (known: {', '.join(FAMILIES)})"]
    if mode == "pooled" and family == "token":
        return ["a token head needs the token states: use input 'hidden', not 'pooled'"]
    problems: list[str] = []
    shown = ", ".join(f"{n} {t} {list(s) if s is not None else '?'}" for n, t, s in inputs) or "none"
    if mode == "pooled":
        if len(inputs) != 1:
            return [f"input 'pooled' needs a graph with exactly one input [rows, {hidden_size}]; it has: {shown}"]
        name, typ, shape = inputs[0]
        if typ != "tensor(float)":
            problems.append(f"input '{name}' is {typ}, expected tensor(float)")
        if shape is not None and len(shape) != 2:
            problems.append(f"input '{name}' has rank {len(shape)}, expected 2 ([rows, {hidden_size}])")
        elif shape is not None:
            if _static(shape[0]) is not None:
                problems.append(f"input '{name}' has a fixed batch size {shape[0]}; it must be dynamic")
            if _static(shape[1]) not in (None, hidden_size):
                problems.append(f"input '{name}' has width {shape[1]}, the backbone's hidden size is {hidden_size}")
    else:
        by_name = {n: (t, s) for n, t, s in inputs}
        extra = sorted(set(by_name) - {"hidden", "mask"})
        if "hidden" not in by_name or extra:
            return [f"input 'hidden' needs graph inputs 'hidden' [rows, tokens, {hidden_size}] and optionally 'mask' [rows, tokens]; it has: {shown}"]
        typ, shape = by_name["hidden"]
        if typ != "tensor(float)":
            problems.append(f"input 'hidden' is {typ}, expected tensor(float)")
        if shape is not None and len(shape) != 3:
            problems.append(f"input 'hidden' has rank {len(shape)}, expected 3 ([rows, tokens, {hidden_size}])")
        elif shape is not None:
            if _static(shape[0]) is not None or _static(shape[1]) is not None:
                problems.append(f"input 'hidden' has fixed dims {list(shape)}; rows and tokens must be dynamic")
            if _static(shape[2]) not in (None, hidden_size):
                problems.append(f"input 'hidden' has width {shape[2]}, the backbone's hidden size is {hidden_size}")
        if "mask" in by_name:
            typ, shape = by_name["mask"]
            if typ != "tensor(int64)":
                problems.append(f"input 'mask' is {typ}, expected tensor(int64)")
            if shape is not None and len(shape) != 2:
                problems.append(f"input 'mask' has rank {len(shape)}, expected 2 ([rows, tokens])")
    if not outputs:
        return [*problems, "the graph has no outputs"]
    name, typ, shape = outputs[0]
    rank = OUTPUT_RANK[family]
    if typ not in FLOAT_TYPES:
        problems.append(f"output '{name}' is {typ}, expected a float tensor")
    if shape is not None and len(shape) not in (0, rank):  # ORT reports [] when the shape is unknown
        problems.append(f"output '{name}' has rank {len(shape)}; a {family} head returns rank {rank}")
    elif shape and labels is not None and family in ("classifier", "token"):
        width = _static(shape[-1])
        if width is not None and width != labels:
            problems.append(f"output '{name}' has {width} columns for {labels} labels")
    return problems


def session_io(session: Any) -> tuple[list[tuple[str, str, Any]], list[tuple[str, str, Any]]]:
    """``(name, type, shape)`` of an ONNX Runtime session's inputs and outputs."""
    return (
        [(a.name, a.type, a.shape) for a in session.get_inputs()],
        [(a.name, a.type, a.shape) for a in session.get_outputs()],
    )


def open_session(model: str | bytes) -> Any:
    """A CPU ONNX Runtime session on one intra-op thread (the host's own
    threads do the parallel work; see :func:`..executor.set_threads`)."""
    import onnxruntime as ort  # noqa: PLC0415 - only when an ONNX head is used

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # fatal only: a run-time error reaches the caller as an exception
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


class OnnxHead(Head):
    name = "onnx"

    def __init__(
        self,
        manifest: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        spec: BackboneSpec,
        where: str,
        artifact_dir: Path | None = None,
    ) -> None:
        self.artifact_dir = None if artifact_dir is None else Path(artifact_dir)
        super().__init__(manifest, tensors, spec, where)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        head = self.manifest.get("head") or {}
        self.mode, self.family = head.get("input", "pooled"), head.get("family", "classifier")
        file = head.get("file")
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise ArtifactError(f"{self.where}: manifest head.file must name a file in the artifact directory, got {file!r}")
        if self.artifact_dir is None:
            raise ArtifactError(f"{self.where}: an ONNX head is loaded from its artifact directory, and none was given")
        path = self.artifact_dir / file
        if not path.is_file():
            raise ArtifactError(f"{self.where}: ONNX head file {path} is missing")
        self.file_bytes = path.stat().st_size  # the graph's weights live in the ONNX session
        self.names: np.ndarray | None = None
        count = None
        if self.family in ("classifier", "token"):
            self.names = self.labels()
            count = len(self.names)
        try:
            self.session = open_session(str(path))
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise ArtifactError(f"{self.where}: ONNX Runtime cannot load {path}: {exc}") from None
        inputs, outputs = session_io(self.session)
        problems = check_io(inputs, outputs, self.mode, self.family, self.spec.hidden_size, count)
        if problems:
            raise ArtifactError(f"{self.where}: ONNX head {path.name}: {'; '.join(problems)}")
        self.input_names = [n for n, _, _ in inputs]
        self.output_name = outputs[0][0]

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> Any:
        rows = int(hidden.shape[0])
        if self.mode == "pooled":
            feeds = {self.input_names[0]: _array(self.pooled(hidden, mask), np.float32)}
        else:
            feeds = {"hidden": _array(hidden, np.float32)}
            if "mask" in self.input_names:
                feeds["mask"] = _array(mask, np.int64)
        out = np.asarray(self.session.run([self.output_name], feeds)[0])
        rank = OUTPUT_RANK[self.family]
        if out.ndim != rank or out.shape[0] != rows:
            raise ValueError(f"ONNX head returned shape {list(out.shape)}, expected rank {rank} with {rows} rows")
        out = np.ascontiguousarray(out, dtype=np.float32)
        if self.family == "embedding":
            return _outputs(out=out)
        assert self.names is not None
        if out.shape[-1] != len(self.names):
            raise ValueError(f"ONNX head returned {out.shape[-1]} scores per row for {len(self.names)} labels")
        if self.family == "classifier":
            return _outputs(out=out, txt=self.names[out.argmax(axis=1)])
        if out.shape[1] != hidden.shape[1]:
            raise ValueError(f"ONNX token head returned {out.shape[1]} positions for {hidden.shape[1]} tokens")
        lengths = mask.sum(dim=1).tolist()
        return _outputs(tok=[out[i, : int(n)] for i, n in enumerate(lengths)])


def _array(t: torch.Tensor, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
