"""Exporting a classifier task's linear head as a standalone ONNX graph.

``fmplex task export-onnx NAME OUT`` writes the head of a ``classifier`` task
(``logits = W · pooled + b``, fitted by ``task create --train``) as one ONNX
Gemm: input ``pooled`` [rows, hidden] (the backbone's L2-normalised sentence
vector) -> output ``logits`` [rows, labels]. The labels, task, version and
backbone fingerprint travel in the model's metadata (``metadata_props``).
Such a file can be imported back as an ``onnx`` task (``--onnx-input
pooled --labels ...``) or run anywhere ONNX Runtime runs.

Only classifier tasks export: other kinds' linear heads read the pooled vector
of their own changed forward pass (LoRA, adapters, soft prompts), which a
head-only graph on the plain backbone's vector would silently get wrong. The
graph is built with ``onnx.helper`` (no exporter tracing needed).
"""

from __future__ import annotations

import json
from pathlib import Path

from fmplex import registry
from fmplex.artifacts import read_manifest, read_weights, version_dir
from fmplex.backbones import get_backbone
from fmplex.kinds import head_type

OPSET = 17
IR_VERSION = 8  # what opset 17 needs; readable by older ONNX Runtimes too


class ExportError(ValueError):
    """The task's head cannot be exported (message says why)."""


def export_task(repo: Path, name: str, out: Path) -> Path:
    """Write task ``name``'s linear head (newest version) as ONNX; returns the file.

    ``out`` is the file to write, or an existing directory (then
    ``out/<name>.onnx``). Raises :class:`ExportError` (a ValueError) for
    tasks without an exportable head, RegistryError for unknown tasks.
    """
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    entry = registry.load(Path(repo)).task(name)
    vdir = version_dir(Path(repo), name, entry.version)
    manifest = read_manifest(vdir)
    kind, head = manifest.get("kind"), head_type(manifest)
    if kind != "classifier" or head != "linear":
        raise ExportError(
            f"task '{name}' is of kind '{kind}' (head type '{head}'): only classifier "
            "tasks (a linear head on the plain backbone's pooled vector) can be exported to ONNX"
        )
    spec = get_backbone(str(manifest["backbone"]))
    labels = manifest.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise ExportError(f"task '{name}' v{entry.version}: manifest has no valid 'labels'")
    tensors = read_weights(vdir)
    w, b = tensors.get("head.weight"), tensors.get("head.bias")
    n, h = len(labels), spec.hidden_size
    if w is None or b is None or tuple(w.shape) != (n, h) or tuple(b.shape) != (n,):
        got = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("head.")}
        raise ExportError(f"task '{name}' v{entry.version}: head tensors {got} do not form a [{n}, {h}] linear head")
    weight = np.ascontiguousarray(w.float().numpy(), dtype=np.float32)
    bias = np.ascontiguousarray(b.float().numpy(), dtype=np.float32)
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ExportError(f"task '{name}' v{entry.version}: head weights hold NaN or Inf")

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["pooled", "head.weight", "head.bias"], ["logits"], transB=1, name="head")],
        f"fmplex_{name}_v{entry.version}",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["rows", h])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", n])],
        initializer=[numpy_helper.from_array(weight, "head.weight"), numpy_helper.from_array(bias, "head.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fmplex")
    model.ir_version = IR_VERSION
    model.doc_string = f"fmplex task '{name}' v{entry.version}: linear head on the pooled {spec.name} sentence vector"
    helper.set_model_props(
        model,
        {
            "fmplex.task": name,
            "fmplex.version": str(entry.version),
            "fmplex.backbone": spec.name,
            "fmplex.backbone_fingerprint": str(manifest.get("backbone_fingerprint", "")),
            "fmplex.input": "pooled",
            "fmplex.labels": json.dumps(labels),
        },
    )
    onnx.checker.check_model(model)
    path = Path(out)
    if path.is_dir():
        path = path / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
