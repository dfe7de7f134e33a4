"""What a generative host and the control plane both need: host names, slot outputs, the artifact check.

The host (``generate_host``) imports this module; so does the generative
family (``fmplex.families.generative``), which loads a task's artifact the
same way at ``task create`` and ``deploy``, so that what the host would refuse
is refused before anything is deployed. The backbones themselves are in the
one catalog, ``fmplex.backbones.GENERATIVE``. Serving code: no control-plane
imports, torch only inside functions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fmplex.artifacts import ArtifactError, read_manifest
from fmplex.backbones import generative_for_host as backbone_of_host  # noqa: F401 - (backbone, decoupled) of a host name
from fmplex.kinds import TEXT_PREFIX  # noqa: F401 - slot k answers on TXT_k


def check_artifact(vdir: Path, backbone: str) -> Any:
    """Load an artifact as the host will (None for a plain generate task, else the adapter)."""
    from .lora import AdapterError, load_peft_adapter  # noqa: PLC0415 - torch
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
    if kind not in ("lora", "ia3"):
        raise ArtifactError(f"{vdir}: kind '{kind}' does not run on a generative backbone")
    try:
        return load_peft_adapter(vdir, backbone_config(), name=str(manifest.get("task", vdir.parent.name)), kind=kind)
    except AdapterError as exc:
        raise ArtifactError(str(exc)) from None


@functools.lru_cache(maxsize=1)
def backbone_config() -> Any:
    """The backbone's LlamaConfig from the GGUF header only (no weights de-quantized)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from .smollm import gguf_path  # noqa: PLC0415

    path = gguf_path()
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
