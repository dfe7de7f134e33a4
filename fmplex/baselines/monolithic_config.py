"""Writers of the monolithic baseline's model directories (no Triton, no torch at import).

Used by ``perf/bench_multimodal_trace.py`` outside Triton; the model itself
is :mod:`fmplex.baselines.monolithic`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmplex.multimodal.interface import LM_INPUTS

OUTPUTS = {"GENERATED_TEXT": ("TYPE_STRING", "[ 1 ]"), "TOKEN_IDS": ("TYPE_INT64", "[ -1 ]"),
           "PROMPT_IDS": ("TYPE_INT64", "[ -1 ]"), "TIMING_MS": ("TYPE_FP32", "[ 3 ]")}  # fmt: skip
SHIM = "from fmplex.baselines.monolithic import TritonPythonModel  # noqa: F401\n"


def model_config(task: str, encode_dir: Path, lm_dir: Path, prompt: str = "", max_new_tokens: int = 32,
                 temperature: float = 0.0, instances: int = 1, queue_limit: int = 256) -> str:  # fmt: skip
    """``config.pbtxt`` of one task's monolithic model (backend ``python``)."""
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}' for n, t, d, o in LM_INPUTS)
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, (t, d) in OUTPUTS.items())
    params = {
        "encode_dir": str(Path(encode_dir).resolve()),
        "lm_dir": str(Path(lm_dir).resolve()),
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "torch_threads": 1,
        "max_images": 8,
        "max_new_tokens_limit": 256,
        "queue_limit": queue_limit,
    }
    ptext = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v), ensure_ascii=False)} }} }}' for k, v in params.items())
    return f"""# Monolithic baseline (fmplex/baselines/monolithic.py): task '{task}' with its own whole
# multimodal model (vision tower + projector + LM) in one process, {instances} instance(s), no sharing.
name: "{task}"
backend: "python"
max_batch_size: 0
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
{ptext}
"""


def write_model(repo: Path, task: str, encode_dir: Path, lm_dir: Path, **kwargs: Any) -> Path:
    """``repo/task/config.pbtxt`` + ``repo/task/1/model.py`` (the one-line shim)."""
    mdir = Path(repo) / task
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    (mdir / "1" / "model.py").write_text(SHIM, encoding="utf-8")
    (mdir / "config.pbtxt").write_text(model_config(task, encode_dir, lm_dir, **kwargs), encoding="utf-8")
    return mdir
