"""What each task kind looks like from outside: its public outputs.

Pure data, shared by the control plane (which writes a vFM's ensemble config
from it) and the host (which fills the slot outputs). Every slot of a host has
one float output ``OUT_<slot>`` and one text output ``TXT_<slot>``; a kind says
which of them it uses and under which public name its vFM shows them.
"""

from __future__ import annotations

import dataclasses

# Host inputs every vFM may map; a request sends TEXT or INPUT_IDS (+ mask).
HOST_INPUTS = (
    ("TEXT", "TYPE_STRING", "[ -1 ]"),
    ("INPUT_IDS", "TYPE_INT64", "[ -1, -1 ]"),
    ("ATTENTION_MASK", "TYPE_INT64", "[ -1, -1 ]"),
)
FLOAT_PREFIX = "OUT_"
TEXT_PREFIX = "TXT_"


@dataclasses.dataclass(frozen=True)
class PublicOutput:
    name: str  # what the vFM's clients ask for
    host_prefix: str  # FLOAT_PREFIX or TEXT_PREFIX
    data_type: str  # Triton config type
    dims: str


@dataclasses.dataclass(frozen=True)
class KindSpec:
    name: str
    summary: str
    outputs: tuple[PublicOutput, ...]


KINDS: dict[str, KindSpec] = {
    "embedding": KindSpec(
        "embedding",
        "pooled, L2-normalised sentence embedding of the backbone",
        (PublicOutput("EMBEDDING", FLOAT_PREFIX, "TYPE_FP32", "[ -1, -1 ]"),),
    ),
    "classifier": KindSpec(
        "classifier",
        "linear head on the pooled embedding; LABEL (text) and LOGITS",
        (
            PublicOutput("LOGITS", FLOAT_PREFIX, "TYPE_FP32", "[ -1, -1 ]"),
            PublicOutput("LABEL", TEXT_PREFIX, "TYPE_STRING", "[ -1 ]"),
        ),
    ),
}


def get_kind(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown task kind '{name}' (known: {', '.join(sorted(KINDS))})") from None


def slot_of_output(name: str) -> int | None:
    """Slot number encoded in a host output name (``OUT_17`` -> 17)."""
    for prefix in (FLOAT_PREFIX, TEXT_PREFIX):
        if name.startswith(prefix) and name[len(prefix):].isascii() and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None
