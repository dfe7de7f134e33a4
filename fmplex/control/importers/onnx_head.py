"""An ``.onnx`` file -> fmplex ``onnx`` task head.

The graph becomes the task's head, run by ONNX Runtime on the backbone's
states (contract in :mod:`fmplex.triton_backend.extensions.onnx_head`).
Options (``fmplex task create --kind onnx``):

- ``onnx_input``: ``pooled`` (one float input [rows, hidden]) or ``hidden``
  (float input ``hidden`` [rows, tokens, hidden], optional int64 ``mask``);
- ``onnx_family``: ``classifier`` | ``embedding`` | ``token`` — what the
  first output is and which public outputs the task's vFM has;
- ``labels``: required for ``classifier`` and ``token`` (one per output
  column), ignored for ``embedding``.

The file is checked with ``onnx.checker`` and opened with ONNX Runtime here,
so a graph the host could not run is refused at ``task create``. It must be
self-contained (no external data files); it is copied as ``head.onnx``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmplex.backbones import BackboneSpec
from fmplex.triton_backend.extensions.onnx_head import FAMILIES, INPUT_MODES, check_io, open_session, session_io

from . import Built, Echo, SourceError

FILE = "head.onnx"


def _labels(source: Path, labels: Any, family: str) -> list[str] | None:
    if family == "embedding":
        return None
    if not labels:
        raise SourceError(f"{source}: an ONNX {family} head needs --labels (comma-separated, one per output column)")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise SourceError(f"{source}: labels must be a list of strings")
    labels = [x.strip() for x in labels]
    if any(not x for x in labels):
        raise SourceError(f"{source}: empty label in {labels}")
    if len(labels) < 2:
        raise SourceError(f"{source}: an ONNX {family} head needs at least two labels, got {labels}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SourceError(f"{source}: duplicate labels: {', '.join(dup)}")
    return labels


def _tensors(graph: Any) -> Any:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    import onnx  # noqa: PLC0415 - only for this kind

    mode = options.get("onnx_input") or "pooled"
    family = options.get("onnx_family") or "classifier"
    if mode not in INPUT_MODES:
        raise SourceError(f"unknown ONNX input mode {mode!r} (known: {', '.join(INPUT_MODES)})")
    if family not in FAMILIES:
        raise SourceError(f"unknown ONNX head family {family!r} (known: {', '.join(FAMILIES)})")
    if not source.is_file():
        raise SourceError(f"{source} is not a file; an ONNX head source is one .onnx file")
    labels = _labels(source, options.get("labels"), family)
    if family == "embedding" and options.get("labels"):
        echo("note: ignoring --labels: an ONNX embedding head has none")
    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise SourceError(f"{source} is not an ONNX model: {type(exc).__name__}: {exc}") from None
    if not model.graph.node and not model.graph.output:
        raise SourceError(f"{source} is not an ONNX model (no graph)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model.graph)):
        raise SourceError(f"{source} keeps weights in external data files; save it as one file (onnx.save without save_as_external_data)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        raise SourceError(f"{source} fails the ONNX checker: {exc}") from None
    try:
        session = open_session(source.read_bytes())
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise SourceError(f"{source}: ONNX Runtime cannot load it: {exc}") from None
    inputs, outputs = session_io(session)
    problems = check_io(inputs, outputs, mode, family, spec.hidden_size, None if labels is None else len(labels))
    if problems:
        raise SourceError(f"{source}: does not fit input '{mode}' / family '{family}': {'; '.join(problems)}")
    echo(
        f"ONNX head: input {mode} ({', '.join(n for n, _, _ in inputs)}), {family} output '{outputs[0][0]}'"
        + (f", labels {', '.join(labels)}" if labels else "")
    )
    manifest: dict[str, Any] = {"head": {"type": "onnx", "file": FILE, "input": mode, "family": family}}
    if labels is not None:
        manifest["labels"] = labels
    return Built(manifest=manifest, files={FILE: source})
