"""The one reader of PEFT adapter directories, for every backbone family.

A PEFT directory (``save_pretrained``) holds ``adapter_config.json`` and
``adapter_model.safetensors``. This module reads both — JSON and safetensors
only, never pickle, and without importing peft — and returns what the user
trained, grouped by kind, under module paths relative to the transformers
model (PEFT's wrapper prefixes removed):

- LoRA: ``lora_A``/``lora_B`` per module, with PEFT's scale (``lora_alpha / r``,
  or ``/ sqrt(r)`` for rsLoRA; ``rank_pattern``/``alpha_pattern`` per module);
- IA3: one vector per module, and whether PEFT treats the module as
  feed-forward (the vector scales its input) or not (its output);
- prompt tuning: the soft prompt ``[num_virtual_tokens, token_dim]``;
- ``modules_to_save``: the trained copies of whole modules (a classification
  head), under the layouts PEFT writes: ``base_model.model.<module>.*`` for
  LoRA and IA3, ``base_model.<module>.*`` for prompt tuning.

What changes the result in ways these kinds do not cover (DoRA, LoRA biases,
Conv1D layouts, initialisations that rewrite the base weights, ...) is refused
here with one line. Which modules a family can serve, and their shapes, is the
family's business: it gets the paths and checks them (``fmplex.control.importers``
for the encoder, :mod:`fmplex.generative.lora` for the decoder).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch

from fmplex.artifacts import read_json, read_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING")

_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_IA3_KEY = re.compile(r"^(.+)\.ia3_l(?:\.[^.]+)?$")
_PREFIXES = ("base_model.model.", "base_model.")

# Config fields that change what a LoRA adapter computes beyond ``B A`` times a
# scale: refused when set (value: what the refusal calls it).
_LORA_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layouts",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices (changed embeddings)",
    "target_parameters": "target_parameters (LoRA on parameters, not modules)",
    "megatron_config": "Megatron layers (megatron_config)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
}
# Initialisations that rewrite the base model's weights: the adapter alone is not the model.
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class PeftError(ValueError):
    """The directory is not a PEFT adapter fmplex can serve as trained (the message says why)."""


@dataclasses.dataclass(eq=False)
class LoraModule:
    a: torch.Tensor  # [r, in], fp32
    b: torch.Tensor  # [out, r], fp32
    scale: float


@dataclasses.dataclass(eq=False)
class Ia3Module:
    vector: torch.Tensor  # 1-D fp32: [in] if feedforward else [out]
    feedforward: bool


@dataclasses.dataclass(eq=False)
class PeftAdapter:
    """What one PEFT directory holds, by kind; module paths relative to the transformers model."""

    source: Path
    config: dict[str, Any]
    peft_type: str
    task_type: str | None
    lora: dict[str, LoraModule] = dataclasses.field(default_factory=dict)
    ia3: dict[str, Ia3Module] = dataclasses.field(default_factory=dict)
    prompt: torch.Tensor | None = None  # [virtual tokens, token_dim], fp32
    saved: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # modules_to_save: "<module>.<param>" -> tensor

    def fail(self, message: str) -> PeftError:
        return PeftError(f"{self.source}: {message}")


def pattern_value(patterns: dict[str, Any], path: str, default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern``: a key matches a module path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return default


def feedforward(config: dict[str, Any], path: str) -> bool:
    """PEFT IA3's own rule: a string is a full regex; a list matches by plain suffix (no dot)."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(str(key)) for key in ff)


def _check_lora_config(cfg: dict[str, Any], where: str) -> None:
    for field, name in _LORA_REFUSED.items():
        value = cfg.get(field)
        if value not in (None, False, {}, [], ""):
            raise PeftError(f"{where}: {name} is not supported")
    if cfg.get("bias", "none") != "none":
        raise PeftError(f"{where}: LoRA bias '{cfg.get('bias')}' is not supported (only 'none')")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        raise PeftError(f"{where}: init_lora_weights '{init}' rewrites the base model's weights, so the adapter alone is not the model")


def read_adapter(source: Path, peft_types: tuple[str, ...] = PEFT_TYPES) -> PeftAdapter:
    """Read and check a PEFT directory of one of ``peft_types``; raises :class:`PeftError`."""
    source = Path(source)
    if not source.is_dir():
        raise PeftError(f"{source} is not a directory (a PEFT adapter is the directory save_pretrained writes)")
    cfg = read_json(source / ADAPTER_CONFIG, PeftError)
    peft_type = cfg.get("peft_type")
    if peft_type not in peft_types:
        raise PeftError(f"{source}: peft_type is {peft_type!r}, not {' or '.join(repr(t) for t in peft_types)}")
    where = str(source)
    if peft_type == "LORA":
        _check_lora_config(cfg, where)
    if peft_type == "IA3" and cfg.get("fan_in_fan_out"):
        raise PeftError(f"{where}: fan_in_fan_out (Conv1D) layouts are not supported")
    task_type = cfg.get("task_type")
    modules = [str(m) for m in (cfg.get("modules_to_save") or [])]
    adapter = PeftAdapter(source=source, config=cfg, peft_type=peft_type, task_type=task_type)
    weights = read_safetensors(source / ADAPTER_WEIGHTS, PeftError)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in weights.items():
        if peft_type == "PROMPT_TUNING" and key == "prompt_embeddings":
            adapter.prompt = _float(tensor, key, where)
            continue
        path = key
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                path = key[len(prefix) :]
                break
        lora = _LORA_KEY.match(path) if peft_type == "LORA" else None
        ia3 = _IA3_KEY.match(path) if peft_type == "IA3" else None
        if lora:
            pairs.setdefault(lora.group(1), {})[lora.group(2)] = tensor
        elif ia3:
            vector = _float(tensor, key, where)
            if vector.dim() != 2 or 1 not in vector.shape:
                raise PeftError(f"{where}: IA3 vector '{key}' has shape {tuple(vector.shape)}, expected [1, in] or [out, 1]")
            ff = feedforward(cfg, ia3.group(1))
            if vector.shape[0 if ff else 1] != 1:
                raise PeftError(f"{where}: IA3 vector '{key}' has shape {tuple(vector.shape)}, which does not fit a "
                                f"{'feed-forward' if ff else 'non-feed-forward'} module in the config")
            adapter.ia3[ia3.group(1)] = Ia3Module(vector.flatten().contiguous(), ff)
        elif any(path == m or path.startswith(m + ".") or f".{m}." in f".{path}" for m in modules):
            adapter.saved[path] = _float(tensor, key, where)
        else:
            unexpected.append(key)
    if peft_type == "PROMPT_TUNING" and adapter.prompt is None:
        raise PeftError(
            f"{where}: adapter_model.safetensors lacks the tensor 'prompt_embeddings' (found: {', '.join(sorted(weights)) or 'none'})"
        )
    if unexpected:
        raise PeftError(f"{where}: unexpected tensor '{sorted(unexpected)[0]}' in a {peft_type} adapter")
    if peft_type == "LORA":
        _lora(adapter, pairs)
        if not adapter.lora:
            raise PeftError(f"{where}: the adapter holds no LoRA weights")
    elif peft_type == "IA3" and not adapter.ia3:
        raise PeftError(f"{where}: the adapter holds no IA3 vectors")
    return adapter


def _float(tensor: torch.Tensor, key: str, where: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise PeftError(f"{where}: '{key}' has dtype {tensor.dtype}, not a floating-point type")
    if not torch.isfinite(tensor).all():
        raise PeftError(f"{where}: '{key}' holds NaN or Inf")
    return tensor.float().contiguous()


def _lora(adapter: PeftAdapter, pairs: dict[str, dict[str, torch.Tensor]]) -> None:
    cfg, where = adapter.config, str(adapter.source)
    r_default, alpha_default = float(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise PeftError(f"{where}: '{path}' lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = _float(ab["A"], f"{path}.lora_A", where), _float(ab["B"], f"{path}.lora_B", where)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise PeftError(f"{where}: '{path}' has mismatched LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)}")
        rank = int(a.shape[0])
        r = pattern_value(cfg.get("rank_pattern") or {}, path, r_default)
        if int(r) != rank:
            raise PeftError(f"{where}: '{path}' has rank {rank} but the config says {int(r)}")
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, path, alpha_default)
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        adapter.lora[path] = LoraModule(a, b, float(scale))
