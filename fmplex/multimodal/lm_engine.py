"""The multimodal LM stage on the generative engine: continuous batching across tasks.

The lm stage host runs :class:`fmplex.generative.engine.Engine`, the same
step loop as the SmolLM2 host: sequences of many tasks, each with its own
images, prefill and decode in shared steps, admitted by the weighted-fair
scheduler with deadlines. What this module adds is the model side:

* LLaVA (decoder-only): the LM is a Llama decoder, so the engine's batched
  :class:`~fmplex.generative.forward.LlamaForward` runs it. A sequence brings
  its prompt embeddings -- each image's features in place of its placeholder
  tokens (:meth:`LMStage.prompt_embeddings`) -- instead of its ids'.
* Mllama (cross-attention): its layers are not plain Llama layers, so
  :class:`RowForward` runs each row's prefill / decode step on the stage's own
  transformers modules inside the shared step (one sequence's work at a time;
  scheduling, deadlines and answers are still the engine's).

Answers equal the one-piece model's (greedy tokens identical, prefill logits
within 1e-4; tests/unit/test_multimodal_stages.py and tests/e2e/test_multimodal.py).
No Triton imports.
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.generative.engine import Engine, SamplingParams, Sequence
from fmplex.generative.forward import Forward, LlamaForward

from .models import EOS_ID, ByteTokenizer
from .stages import LMStage

__all__ = ["ByteText", "RowForward", "lm_sequence", "make_engine"]


class ByteText:
    """The byte tokenizer as the engine's detokenizer wants it."""

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return ByteTokenizer.decode(ids)


class RowForward(Forward):
    """Each row on the stage's transformers modules: prefill, then one token per step
    (for models the batched Llama forward does not cover)."""

    def __init__(self, lm: LMStage) -> None:
        self.lm = lm
        self.max_positions = lm.max_positions
        self.vocab_size = int(lm.lm.get_input_embeddings().num_embeddings)  # Mllama's image token is past vocab_size

    def __call__(self, rows: list[Sequence], n_old: int) -> tuple[torch.Tensor, int]:
        out = []
        for r, seq in enumerate(rows):
            if r < n_old:
                out.append(self.lm.step(seq.state, seq.generated[-1]))
                seq.past += 1
            else:
                logits, seq.state = self.lm.prefill(seq.prompt_ids, seq.context)
                if seq.want_prompt_logits:
                    seq.prompt_logits = logits
                out.append(logits[-1])
                seq.past += len(seq.prompt_ids)
        longest = max(1, *(len(s.prompt_ids) for s in rows[n_old:])) if len(rows) > n_old else 1
        return torch.stack(out), len(rows) * longest

    def reset(self) -> None:
        """Per-sequence caches go with their sequences."""


def make_engine(lm: LMStage, *, max_rows: int = 8, prefill_tokens: int = 1024, policy: str = "wfq",
                kv_capacity: int = 64) -> Engine:  # fmt: skip
    """The engine of one lm stage instance."""
    if lm.family == "llava":
        forward: Forward = LlamaForward(lm.lm, lm.lm_head.weight, lm.config.text_config, max_rows=max_rows, kv_capacity=kv_capacity)
    else:
        forward = RowForward(lm)
    return Engine(forward=forward, tokenizer=ByteText(), eos_token_id=EOS_ID, max_rows=max_rows, prefill_tokens=prefill_tokens,
                  max_context=lm.max_positions, policy=policy)  # fmt: skip


def lm_sequence(lm: LMStage, task: str, ids: list[int], features: torch.Tensor | None, params: SamplingParams,
                **kw: Any) -> Sequence:  # fmt: skip
    """One request as the engine runs it: its prompt embeddings (LLaVA) or its
    cross-attention features (Mllama) travel with it. ``kw``: Sequence's."""
    if lm.family == "llava":
        embeds = lm.prompt_embeddings(ids, features)[0]
        return Sequence(task, ids, params, prompt_embeds=embeds, **kw)
    lm.check_prompt(ids, features)
    return Sequence(task, ids, params, context=features, **kw)
