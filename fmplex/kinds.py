"""What each task looks like from outside: its kind and its public outputs.

Pure data, shared by the control plane (which writes a vFM's ensemble config
from it) and the host (which fills the slot outputs). Every slot of a host has
three outputs — ``OUT_<slot>`` (FP32 [rows, d]), ``TXT_<slot>`` (BYTES [rows])
and ``TOK_<slot>`` (FP32 [rows, tokens, d]); a task's *head family* says which
of them it fills and under which public names its vFM shows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Host inputs every vFM may map; a request sends TEXT or INPUT_IDS (+ mask).
HOST_INPUTS = (
    ("TEXT", "TYPE_STRING", "[ -1 ]"),
    ("INPUT_IDS", "TYPE_INT64", "[ -1, -1 ]"),
    ("ATTENTION_MASK", "TYPE_INT64", "[ -1, -1 ]"),
)
FLOAT_PREFIX = "OUT_"
TEXT_PREFIX = "TXT_"
TOKEN_PREFIX = "TOK_"
SLOT_OUTPUTS = (
    (FLOAT_PREFIX, "TYPE_FP32", "[ -1, -1 ]"),
    (TEXT_PREFIX, "TYPE_STRING", "[ -1 ]"),
    (TOKEN_PREFIX, "TYPE_FP32", "[ -1, -1, -1 ]"),
)


@dataclasses.dataclass(frozen=True)
class PublicOutput:
    name: str  # what the vFM's clients ask for
    host_prefix: str  # FLOAT_PREFIX, TEXT_PREFIX or TOKEN_PREFIX
    data_type: str  # Triton config type
    dims: str


# Head family -> the public outputs of its vFMs.
OUTPUT_SETS: dict[str, tuple[PublicOutput, ...]] = {
    "embedding": (PublicOutput("EMBEDDING", FLOAT_PREFIX, "TYPE_FP32", "[ -1, -1 ]"),),
    "classifier": (
        PublicOutput("LOGITS", FLOAT_PREFIX, "TYPE_FP32", "[ -1, -1 ]"),
        PublicOutput("LABEL", TEXT_PREFIX, "TYPE_STRING", "[ -1 ]"),
    ),
    "token": (PublicOutput("TOKEN_LOGITS", TOKEN_PREFIX, "TYPE_FP32", "[ -1, -1, -1 ]"),),
}

# Head type (manifest) -> family. ``onnx`` heads name their family in the manifest.
HEAD_FAMILY = {"embedding": "embedding", "linear": "classifier", "cls": "classifier", "token": "token"}


@dataclasses.dataclass(frozen=True)
class KindSpec:
    name: str
    summary: str
    source: str  # what `task create` needs for it


KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in (
        KindSpec("embedding", "the backbone's pooled, L2-normalised sentence embedding", "nothing"),
        KindSpec("classifier", "linear head on the pooled embedding (LABEL + LOGITS)", "--train data.csv"),
        KindSpec("lora", "PEFT LoRA adapter applied per row inside the shared batch", "--source PEFT_DIR [--train]"),
        KindSpec("ia3", "PEFT IA3 adapter (learned scaling vectors) applied per row", "--source PEFT_DIR [--train]"),
        KindSpec("adapter", "bottleneck adapters after attention and/or MLP blocks", "--source adapter.safetensors [--train]"),
        KindSpec("prompt", "PEFT prompt tuning: soft prompt vectors before the input", "--source PEFT_DIR [--train]"),
        KindSpec("fork", "the task's own fine-tuned top layers (+ head) from a checkpoint", "--source CHECKPOINT_DIR"),
        KindSpec("onnx", "an ONNX head run by ONNX Runtime on the backbone's states", "--source head.onnx --labels a,b"),
    )
}


def get_kind(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown task kind '{name}' (known: {', '.join(sorted(KINDS))})") from None


def head_type(manifest: dict[str, Any]) -> str:
    head = manifest.get("head")
    if isinstance(head, dict) and isinstance(head.get("type"), str):
        return head["type"]
    return "linear" if manifest.get("kind") == "classifier" or manifest.get("labels") else "embedding"


def family_of(manifest: dict[str, Any]) -> str:
    """embedding | classifier | token: which public outputs this task fills."""
    kind = head_type(manifest)
    if kind == "onnx":
        fam = (manifest.get("head") or {}).get("family", "classifier")
        if fam not in OUTPUT_SETS:
            raise KeyError(f"unknown output family '{fam}' in an onnx head (known: {', '.join(sorted(OUTPUT_SETS))})")
        return fam
    return HEAD_FAMILY.get(kind, "embedding")


def outputs_of(family: str) -> tuple[PublicOutput, ...]:
    try:
        return OUTPUT_SETS[family]
    except KeyError:
        raise KeyError(f"unknown output family '{family}' (known: {', '.join(sorted(OUTPUT_SETS))})") from None


def slot_of_output(name: str) -> int | None:
    """Slot number encoded in a host output name (``OUT_17`` -> 17)."""
    for prefix, _, _ in SLOT_OUTPUTS:
        rest = name[len(prefix):]
        if name.startswith(prefix) and rest.isascii() and rest.isdigit():
            return int(rest)
    return None
