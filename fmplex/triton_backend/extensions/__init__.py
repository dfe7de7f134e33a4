"""Task extensions, one module per kind behind :class:`Extension`."""

from __future__ import annotations

from pathlib import Path

from fmplex.artifacts import ArtifactError, read_manifest, read_weights
from fmplex.backbones import BackboneSpec, fingerprint

from .base import Extension
from .classifier import ClassifierExtension
from .embedding import EmbeddingExtension

EXTENSIONS: dict[str, type[Extension]] = {cls.kind: cls for cls in (EmbeddingExtension, ClassifierExtension)}


def load_extension(artifact_dir: Path, spec: BackboneSpec) -> Extension:
    """Load and check a task artifact for this backbone; raises ArtifactError."""
    manifest = read_manifest(artifact_dir)
    kind = manifest["kind"]
    cls = EXTENSIONS.get(kind)
    if cls is None:
        raise ArtifactError(f"{artifact_dir}: unknown task kind '{kind}'")
    if manifest["backbone"] != spec.name:
        raise ArtifactError(f"{artifact_dir}: built for backbone '{manifest['backbone']}', not '{spec.name}'")
    fp = manifest.get("backbone_fingerprint")
    if fp and fp != fingerprint(spec.name):
        raise ArtifactError(f"{artifact_dir}: built on different '{spec.name}' weights ({fp} != {fingerprint(spec.name)})")
    return cls(manifest, read_weights(artifact_dir), spec)


__all__ = ["EXTENSIONS", "Extension", "load_extension"]
