"""PEFT LoRA adapters for the generative backbone, read without importing peft.

A PEFT LoRA directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight``.
We read both ourselves (JSON and safetensors only, never pickle), check them
against the backbone, and keep for every adapted projection ``(A, B, scale)``:
the engine adds ``scale * B(A x)`` to the rows of this task only, inside the
shared batch, exactly as PEFT's ``lora.Linear`` adds ``lora_B(lora_A(x)) *
scaling`` to its base layer's output.

Supported: any rank, per-module ``rank_pattern``/``alpha_pattern``, rsLoRA,
``layers_to_transform``; targets among the attention and MLP projections.
Refused with one line: DoRA, LoRA biases, embedding/``lm_head`` adapters,
``modules_to_save`` (they would replace whole backbone modules), Conv1D
(``fan_in_fan_out``) adapters, shapes that do not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Projection name -> its parent module in a LlamaDecoderLayer (PEFT's module paths)
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_PATH = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)$")


class AdapterError(ValueError):
    """The adapter cannot be served on this backbone (the message says why)."""


def projection_shape(config: Any, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of the Llama backbone."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return {
        "q_proj": (h, config.num_attention_heads * head_dim),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (config.num_attention_heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }[proj]


@dataclasses.dataclass(eq=False)
class LoraAdapter:
    """One task's low-rank deltas: ``(layer, proj) -> (A [r, in], B [out, r], scale)``."""

    name: str
    deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.deltas.values())

    @property
    def ranks(self) -> list[int]:
        return sorted({int(a.shape[0]) for a, _, _ in self.deltas.values()})

    def delta(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return self.deltas.get((layer, proj))


def _pattern_value(patterns: dict[str, Any], path: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: a pattern matches a module path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return default


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing (only safetensors are read, never pickle)") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from None


def check_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse what the engine cannot apply as PEFT would."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    if cfg.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{where}: LoRA bias '{cfg.get('bias')}' is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{where}: fan_in_fan_out (Conv1D) adapters do not fit a Llama backbone")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save {cfg['modules_to_save']} would replace backbone modules; not supported")
    if cfg.get("layer_replication"):
        raise AdapterError(f"{where}: layer_replication is not supported")
    if cfg.get("trainable_token_indices"):
        raise AdapterError(f"{where}: trainable_token_indices would change the embeddings; not supported")
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{where}: task_type {task_type!r} is not a causal-LM adapter")


def load_peft_lora(source: Path, config: Any, name: str = "") -> LoraAdapter:
    """Read a PEFT LoRA directory and check it against the backbone ``config``."""
    source = Path(source)
    cfg = _read_json(source / ADAPTER_CONFIG)
    check_config(cfg, str(source))
    weights = _read_safetensors(source / ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"{source}: unexpected tensor '{key}' in a LoRA adapter (embedding or lm_head LoRA is not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    if not pairs:
        raise AdapterError(f"{source}: the adapter holds no LoRA weights")
    r_default, alpha_default = float(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    layers = int(config.num_hidden_layers)
    deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for path, ab in sorted(pairs.items()):
        pm = _PATH.match(path)
        if not pm or PROJECTIONS.get(pm.group(3)) != pm.group(2):
            raise AdapterError(f"{source}: LoRA on '{path}' is not supported (targets: {', '.join(PROJECTIONS)})")
        layer, proj = int(pm.group(1)), pm.group(3)
        if not 0 <= layer < layers:
            raise AdapterError(f"{source}: LoRA on '{path}' is beyond the backbone's {layers} layers")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{source}: '{path}' lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"].float().contiguous(), ab["B"].float().contiguous()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{source}: '{path}' has mismatched LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)}")
        fan_in, fan_out = projection_shape(config, proj)
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterError(f"{source}: LoRA on '{path}' maps {a.shape[1]}->{b.shape[0]}, the backbone's {proj} is {fan_in}->{fan_out}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{source}: LoRA weights for '{path}' hold NaN or Inf")
        rank = int(a.shape[0])
        r = _pattern_value(cfg.get("rank_pattern") or {}, path, r_default)
        if int(r) != rank:
            raise AdapterError(f"{source}: '{path}' has rank {rank} but the config says {int(r)}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, alpha_default)
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        deltas[(layer, proj)] = (a, b, float(scale))
    return LoraAdapter(name=name or source.name, deltas=deltas)
