"""Turning what other tools write into fmplex task artifacts.

One module per source kind, each with ``build(source, spec, options, echo) ->
Built``: PEFT adapter directories (LoRA, IA3, prompt tuning; read by
:mod:`fmplex.peft_reader`, heads by :mod:`.peft_encoder`), transformers
checkpoints (fork), adapter safetensors, ONNX files. An importer only reads
JSON, safetensors and ONNX — never pickle — and checks that what it reads fits
the backbone, so a bad source is refused at ``task create``, not at serve time.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from fmplex import artifacts
from fmplex.backbones import BackboneSpec

Echo = Callable[[str], None]

IMPORTERS = {
    "lora": "lora",
    "ia3": "ia3",
    "adapter": "adapter",
    "prompt": "prompt",
    "fork": "fork",
    "onnx": "onnx_head",
}


class SourceError(ValueError):
    """The source cannot be turned into a task (message says why)."""


@dataclasses.dataclass
class Built:
    """A task body/head ready to be written: manifest fields, tensors, files."""

    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)  # name in artifact dir -> source file


def build(kind: str, source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    module = IMPORTERS.get(kind)
    if module is None:
        raise SourceError(f"kind '{kind}' is not imported from a --source")
    if not Path(source).exists():
        raise SourceError(f"source {source} does not exist")
    return importlib.import_module(f"{__name__}.{module}").build(Path(source), spec, options, echo)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or a one-line :class:`SourceError`."""
    return artifacts.read_json(path, SourceError)


def read_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file (never pickle), or a one-line :class:`SourceError`."""
    return artifacts.read_safetensors(path, SourceError)
