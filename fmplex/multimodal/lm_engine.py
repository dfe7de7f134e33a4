"""The multimodal LM stage on the generative engine: continuous batching across tasks.

The lm stage host runs :class:`fmplex.generative.engine.Engine`, the same
step loop as the SmolLM2 host: sequences of many tasks, each with its own
images, prefill and decode in shared steps, admitted by the weighted-fair
scheduler with deadlines. What this module adds is the model side:

* LLaVA (decoder-only): the LM is a Llama decoder, so the engine's batched
  :class:`~fmplex.generative.forward.LlamaForward` runs it. A sequence brings
  its prompt embeddings -- each image's features in place of its placeholder
  tokens (:meth:`LMStage.prompt_embeddings`) -- instead of its ids'.
* Mllama (cross-attention): :class:`~fmplex.multimodal.mllama_forward.MllamaForward`
  runs the same batched Llama self-attention layers and, in its cross-attention
  layers, each row's own image keys (padded across rows and masked); a sequence
  brings its image features (``context``), text-only rows skip those layers.

Answers equal the one-piece model's (greedy tokens identical, prefill logits
within 1e-5 in-process, 1e-4 over Triton; tests/unit/test_multimodal_stages.py and
tests/e2e/test_multimodal.py).
No Triton imports.
"""

from __future__ import annotations

from typing import Any

import torch

from fmplex.generative.engine import Engine, SamplingParams, Sequence
from fmplex.generative.forward import Forward, LlamaForward

from .mllama_forward import MllamaForward
from .models import EOS_ID, ByteTokenizer
from .stages import LMStage

__all__ = ["ByteText", "lm_sequence", "make_engine"]


class ByteText:
    """The byte tokenizer as the engine's detokenizer wants it."""

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return ByteTokenizer.decode(ids)


def make_engine(lm: LMStage, *, max_rows: int = 8, prefill_tokens: int = 1024, policy: str = "wfq",
                kv_capacity: int = 64) -> Engine:  # fmt: skip
    """The engine of one lm stage instance."""
    if lm.family == "llava":
        forward: Forward = LlamaForward(lm.lm, lm.lm_head.weight, lm.config.text_config, max_rows=max_rows, kv_capacity=kv_capacity)
    else:
        forward = MllamaForward(lm.lm, lm.lm_head.weight, lm.config.text_config, tiles=lm.tiles, patches=lm.patches,
                                image_token_id=lm.image_token_id, max_rows=max_rows, kv_capacity=kv_capacity)  # fmt: skip
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
