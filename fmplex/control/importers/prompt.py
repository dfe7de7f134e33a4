"""PEFT prompt-tuning adapter directory -> fmplex ``prompt`` task (body, and head if trained).

Read by the one PEFT reader (:mod:`fmplex.peft_reader`), for a BERT backbone
(task type FEATURE_EXTRACTION, SEQ_CLS or TOKEN_CLS): one tensor
``prompt_embeddings`` [num_virtual_tokens, token_dim], the soft prompt that
PEFT puts before the input embeddings (positions counted from 0 at the first
virtual token, attention mask all ones over the prompt). Stored as
``prompt.embeddings`` [P, hidden] with manifest ``{"prompt": {"virtual_tokens": P}}``.

The sentence vector of a prompt task is the masked mean over the input tokens
only (the P prompt positions are left out), L2-normalised. A SEQ_CLS
adapter's trained classifier reads BERT's pooler at position 0 — the first
virtual token, as in PEFT; a TOKEN_CLS one returns the logits of the input
tokens (the P virtual positions, which have no input token, are left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmplex.backbones import BackboneSpec

from . import Built, Echo, SourceError
from . import peft_encoder as pe

KEY = "prompt_embeddings"


def _int(cfg: dict[str, Any], name: str, source: Path, default: int | None = None) -> int:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(f"{source}: adapter_config.json field '{name}' must be an integer, got {value!r}")
    return value


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    adapter = pe.read(source, "PROMPT_TUNING", "prompt")
    cfg = adapter.config
    submodules = _int(cfg, "num_transformer_submodules", source, 1)
    if submodules != 1:
        raise SourceError(
            f"{source}: num_transformer_submodules is {submodules}, not 1: the prompt was made for an encoder-decoder model, "
            f"not an encoder like '{spec.name}'"
        )
    token_dim = _int(cfg, "token_dim", source, spec.hidden_size)
    if token_dim != spec.hidden_size:
        raise SourceError(f"{source}: token_dim is {token_dim}, but backbone '{spec.name}' has hidden size {spec.hidden_size}")
    virtual = _int(cfg, "num_virtual_tokens", source)
    if virtual < 1:
        raise SourceError(f"{source}: num_virtual_tokens is {virtual}; a soft prompt needs at least one vector")
    if virtual >= spec.max_tokens:
        raise SourceError(
            f"{source}: num_virtual_tokens is {virtual}, which leaves no room for input within backbone "
            f"'{spec.name}''s limit of {spec.max_tokens} tokens"
        )

    prompt = adapter.prompt
    assert prompt is not None  # the reader refuses a prompt-tuning adapter without one
    if prompt.dim() == 2 and prompt.shape[1] != spec.hidden_size:
        raise SourceError(
            f"{source}: '{KEY}' holds vectors of width {prompt.shape[1]}, but backbone '{spec.name}' has hidden size {spec.hidden_size}"
        )
    if prompt.dim() != 2 or tuple(prompt.shape) != (virtual, token_dim):
        raise SourceError(
            f"{source}: '{KEY}' has shape {tuple(prompt.shape)}, but the config says [{virtual}, {token_dim}] "
            "(num_virtual_tokens, token_dim)"
        )
    fields, head_tensors = pe.head(adapter, spec, options, echo)
    echo(f"prompt tuning: {virtual} virtual tokens x {token_dim} ({virtual * token_dim} parameters)")
    return Built(manifest={"prompt": {"virtual_tokens": virtual}, **fields}, tensors={"prompt.embeddings": prompt, **head_tensors})
