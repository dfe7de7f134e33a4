"""PEFT prompt-tuning adapter directory -> fmplex ``prompt`` task body.

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes
them for a BERT backbone (task type FEATURE_EXTRACTION or SEQ_CLS): one tensor
``prompt_embeddings`` [num_virtual_tokens, token_dim], the soft prompt that
PEFT puts before the input embeddings (positions counted from 0 at the first
virtual token, attention mask all ones over the prompt). Stored as
``prompt.embeddings`` [P, hidden] with manifest ``{"prompt": {"virtual_tokens": P}}``.

The sentence vector of a prompt task is the masked mean over the input tokens
only (the P prompt positions are left out), L2-normalised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fmplex.backbones import BackboneSpec

from . import Built, Echo, SourceError, read_json, read_safetensors

KEY = "prompt_embeddings"


def _int(cfg: dict[str, Any], name: str, source: Path, default: int | None = None) -> int:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(f"{source}: adapter_config.json field '{name}' must be an integer, got {value!r}")
    return value


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    if not source.is_dir():
        raise SourceError(f"{source}: a prompt task's --source is a PEFT adapter directory")
    cfg = read_json(source / "adapter_config.json")
    if cfg.get("peft_type") != "PROMPT_TUNING":
        hint = " (use --kind lora)" if cfg.get("peft_type") == "LORA" else ""
        raise SourceError(f"{source}: peft_type is {cfg.get('peft_type')!r}, not 'PROMPT_TUNING'{hint}")
    task_type = cfg.get("task_type")
    if task_type not in (None, "FEATURE_EXTRACTION", "SEQ_CLS"):
        echo(f"note: task_type {task_type!r}: only the soft prompt is imported (fmplex heads come from --train)")
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

    weights = read_safetensors(source / "adapter_model.safetensors")
    prompt = weights.get(KEY)
    if prompt is None:
        raise SourceError(
            f"{source}: adapter_model.safetensors lacks the tensor '{KEY}' (found: {', '.join(sorted(weights)) or 'none'})"
        )
    others = sorted(k for k in weights if k != KEY)
    if others:
        echo(f"note: ignoring {len(others)} tensor(s) besides the prompt ({', '.join(others[:4])}"
             f"{', ...' if len(others) > 4 else ''}): fmplex heads come from --train")
    if not prompt.is_floating_point():
        raise SourceError(f"{source}: '{KEY}' has dtype {prompt.dtype}, not a floating-point type")
    if prompt.dim() == 2 and prompt.shape[1] != spec.hidden_size:
        raise SourceError(
            f"{source}: '{KEY}' holds vectors of width {prompt.shape[1]}, but backbone '{spec.name}' has hidden size {spec.hidden_size}"
        )
    if prompt.dim() != 2 or tuple(prompt.shape) != (virtual, token_dim):
        raise SourceError(
            f"{source}: '{KEY}' has shape {tuple(prompt.shape)}, but the config says [{virtual}, {token_dim}] "
            "(num_virtual_tokens, token_dim)"
        )
    prompt = prompt.float().contiguous()
    if not torch.isfinite(prompt).all():
        raise SourceError(f"{source}: '{KEY}' holds NaN or Inf")
    echo(f"prompt tuning: {virtual} virtual tokens x {token_dim} ({virtual * token_dim} parameters)")
    return Built(manifest={"prompt": {"virtual_tokens": virtual}}, tensors={"prompt.embeddings": prompt})
