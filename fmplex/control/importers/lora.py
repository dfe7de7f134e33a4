"""PEFT LoRA adapter directory -> fmplex ``lora`` task body.

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes
them for a BERT backbone (task type FEATURE_EXTRACTION or none): any rank,
per-module ranks/alphas (``rank_pattern``/``alpha_pattern``), rsLoRA scaling,
targets among the attention and MLP projections. Stored as ``lora.<path>.A``
[r, in] and ``lora.<path>.B`` [out, r] with one scale per module.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fmplex.backbones import BackboneSpec
from fmplex.triton_backend.segments import TARGETS

from . import Built, Echo, SourceError, read_json, read_safetensors

_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_PATH = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def _pattern_value(patterns: dict[str, Any], path: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", path):
            return float(value)
    return default


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    cfg = read_json(source / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise SourceError(f"{source}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise SourceError(f"{source}: {flag} adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise SourceError(f"{source}: LoRA bias '{cfg.get('bias')}' is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise SourceError(f"{source}: fan_in_fan_out adapters (Conv1D models) do not fit a BERT backbone")
    if cfg.get("modules_to_save"):
        echo(f"note: ignoring modules_to_save {cfg['modules_to_save']} (fmplex heads come from --train or the checkpoint)")
    weights = read_safetensors(source / "adapter_model.safetensors")
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        m = _KEY.match(key)
        if not m:
            raise SourceError(f"{source}: unexpected tensor '{key}' in a LoRA adapter")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    if not pairs:
        raise SourceError(f"{source}: the adapter holds no LoRA weights")
    r_default, alpha_default = float(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    tensors, scales = {}, {}
    for path, ab in sorted(pairs.items()):
        if path.startswith("pooler."):
            # Mean-pooled tasks never run BERT's pooler (target_modules=["dense"] catches it too).
            echo(f"note: ignoring LoRA on '{path}': fmplex's pooled heads do not use BERT's pooler")
            continue
        pm = _PATH.match(path)
        if not pm or pm.group(2) not in TARGETS:
            raise SourceError(f"{source}: LoRA on '{path}' is not supported (targets: {', '.join(TARGETS)})")
        if set(ab) != {"A", "B"}:
            raise SourceError(f"{source}: '{path}' lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"].float().contiguous(), ab["B"].float().contiguous()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise SourceError(f"{source}: '{path}' has mismatched LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)}")
        rank = a.shape[0]
        r = _pattern_value(cfg.get("rank_pattern") or {}, path, r_default)
        if int(r) != rank:
            raise SourceError(f"{source}: '{path}' has rank {rank} but the config says {int(r)}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, alpha_default)
        scales[path] = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        tensors[f"lora.{path}.A"] = a
        tensors[f"lora.{path}.B"] = b
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".A")})
    echo(f"LoRA: {len(scales)} modules, rank {', '.join(map(str, ranks))}, {sum(t.numel() for t in tensors.values())} parameters")
    return Built(manifest={"lora": {"scales": scales}}, tensors=tensors)
