"""Task extensions, one module per kind behind :class:`Extension`.

Kinds whose modules need extra libraries (ONNX Runtime) are imported lazily.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fmplex.artifacts import ArtifactError, read_manifest, read_weights
from fmplex.backbones import BackboneSpec, fingerprint

from .base import Extension, SlotOutputs

# kind -> "module:Class" (relative to this package)
EXTENSIONS: dict[str, str] = {
    "embedding": "embedding:EmbeddingExtension",
    "classifier": "classifier:ClassifierExtension",
    "lora": "lora:LoraExtension",
    "ia3": "ia3:Ia3Extension",
    "adapter": "adapter:AdapterExtension",
    "prompt": "prompt:PromptExtension",
    "fork": "fork:ForkExtension",
    "onnx": "onnx_extension:OnnxExtension",
}


def extension_class(kind: str) -> type[Extension]:
    target = EXTENSIONS.get(kind)
    if target is None:
        raise ArtifactError(f"unknown task kind '{kind}' (known: {', '.join(sorted(EXTENSIONS))})")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def load_extension(artifact_dir: Path, spec: BackboneSpec, **context: Any) -> Extension:
    """Load and check a task artifact for this backbone; raises ArtifactError.

    ``context`` carries what some kinds need from the host (``config``: the
    backbone's transformers config, for forked layers).
    """
    manifest = read_manifest(artifact_dir)
    cls = extension_class(manifest["kind"])
    if manifest["backbone"] != spec.name:
        raise ArtifactError(f"{artifact_dir}: built for backbone '{manifest['backbone']}', not '{spec.name}'")
    fp = manifest.get("backbone_fingerprint")
    if fp and fp != fingerprint(spec.name):
        raise ArtifactError(f"{artifact_dir}: built on different '{spec.name}' weights ({fp} != {fingerprint(spec.name)})")
    return cls(manifest, read_weights(artifact_dir), spec, artifact_dir=Path(artifact_dir), **context)


__all__ = ["EXTENSIONS", "Extension", "SlotOutputs", "extension_class", "load_extension"]
