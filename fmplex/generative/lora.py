"""PEFT LoRA and IA3 adapters for the generative backbone, read without importing peft.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with tensors named ``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.
<lora_A|lora_B>.weight`` (or ``...<proj>.ia3_l``). The one PEFT reader
(:mod:`fmplex.peft_reader`, shared with the encoder family) reads both — JSON
and safetensors only, never pickle; here we check what it found against the
Llama backbone and keep, for every adapted projection, a row delta
(:mod:`fmplex.row_deltas`): the engine applies it to the rows of this task
only, inside the shared batch, exactly as PEFT's ``lora.Linear`` adds
``lora_B(lora_A(x)) * scaling`` and ``ia3.Linear`` scales the input of a
feed-forward projection or the output of any other.

Supported: LoRA of any rank, per-module ``rank_pattern``/``alpha_pattern``,
rsLoRA, ``layers_to_transform``; IA3 with any ``feedforward_modules``; targets
among the attention and MLP projections. Refused with one line: what the
reader refuses (DoRA, LoRA biases, Conv1D layouts, ...), embedding/``lm_head``
adapters, ``modules_to_save`` (they would replace whole backbone modules),
shapes that do not fit.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from fmplex.artifacts import read_json
from fmplex.peft_reader import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftError, read_adapter  # noqa: F401 - ADAPTER_WEIGHTS: part of this module's names (families, tests)
from fmplex.row_deltas import Ia3Delta, LoraDelta, RowDelta

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
class TaskAdapter:
    """One task's row deltas: ``(layer, proj) -> LoraDelta | Ia3Delta``."""

    name: str
    deltas: dict[tuple[int, str], RowDelta]
    kind: str = "lora"

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values())  # type: ignore[attr-defined]

    @property
    def ranks(self) -> list[int]:
        return sorted({d.rank for d in self.deltas.values() if isinstance(d, LoraDelta)})

    def delta(self, layer: int, proj: str) -> RowDelta | None:
        return self.deltas.get((layer, proj))


LoraAdapter = TaskAdapter  # the name the engine and older callers use

KINDS = {"lora": "LORA", "ia3": "IA3"}  # task kind -> PEFT peft_type


def check_config(cfg: dict[str, Any], where: str, peft_type: str = "LORA") -> None:
    """Refuse, before any weight is read, what only the decoder family refuses."""
    if cfg.get("peft_type") != peft_type:
        raise AdapterError(f"{where}: peft_type is {cfg.get('peft_type')!r}, not {peft_type!r}")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save {cfg['modules_to_save']} would replace backbone modules; not supported")
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{where}: task_type {task_type!r} is not a causal-LM adapter")


def load_peft_lora(source: Path, config: Any, name: str = "") -> TaskAdapter:
    """Read a PEFT LoRA directory and check it against the backbone ``config``."""
    return load_peft_adapter(source, config, name, "lora")


def load_peft_adapter(source: Path, config: Any, name: str = "", kind: str = "lora") -> TaskAdapter:
    """Read a PEFT LoRA (``kind`` lora) or IA3 (``kind`` ia3) directory and check it against ``config``."""
    source = Path(source)
    peft_type = KINDS[kind]
    try:
        check_config(read_json(source / ADAPTER_CONFIG, PeftError), str(source), peft_type)
        read = read_adapter(source, (peft_type,))
    except PeftError as exc:
        raise AdapterError(str(exc)) from None
    layers = int(config.num_hidden_layers)
    deltas: dict[tuple[int, str], RowDelta] = {}
    modules = {**read.lora, **read.ia3}
    for path in sorted(modules):
        pm = _PATH.match(path)
        if not pm or PROJECTIONS.get(pm.group(3)) != pm.group(2):
            raise AdapterError(f"{source}: {read.peft_type} on '{path}' is not supported (targets: {', '.join(PROJECTIONS)})")
        layer, proj = int(pm.group(1)), pm.group(3)
        if not 0 <= layer < layers:
            raise AdapterError(f"{source}: {read.peft_type} on '{path}' is beyond the backbone's {layers} layers")
        fan_in, fan_out = projection_shape(config, proj)
        if path in read.lora:
            m = read.lora[path]
            if m.a.shape[1] != fan_in or m.b.shape[0] != fan_out:
                raise AdapterError(
                    f"{source}: LoRA on '{path}' maps {m.a.shape[1]}->{m.b.shape[0]}, the backbone's {proj} is {fan_in}->{fan_out}"
                )
            deltas[(layer, proj)] = LoraDelta(m.a, m.b, m.scale)
        else:
            v = read.ia3[path]
            want = fan_in if v.feedforward else fan_out
            if v.vector.shape != (want,):
                side = "input" if v.feedforward else "output"
                raise AdapterError(f"{source}: IA3 on '{path}' has {v.vector.shape[0]} values, the backbone's {proj} {side} has {want}")
            deltas[(layer, proj)] = Ia3Delta(v.vector, v.feedforward)
    return TaskAdapter(name=name or source.name, deltas=deltas, kind=kind)
