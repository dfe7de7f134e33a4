"""One BERT layer over a batch of rows of many tasks, with per-row deltas.

The executor runs the encoder's layers itself, in the same order of
operations as transformers' ``BertLayer`` in eval mode (its modules and
weights, not copies), so that every Linear a task may change goes through
:func:`fmplex.row_deltas.linear` with the batch's :class:`Segments` passed in
explicitly: which rows belong to which task is decided once per batch (or
sub-batch), never stored on the modules or in thread-local state, so worker
threads share the backbone freely.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from fmplex.row_deltas import NO_SEGMENTS, Segments, linear

# The Linear modules of a BERT layer that LoRA, IA3 and adapters may target, by
# their path inside the layer (PEFT names them the same way).
TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def layer_paths(index: int) -> dict[str, str]:
    """Target -> full module path (the deltas' key) of layer ``index``."""
    return {t: f"encoder.layer.{index}.{t}" for t in TARGETS}


def _proj(module: torch.nn.Linear, x: torch.Tensor, key: str, segments: Segments) -> torch.Tensor:
    return linear(x, module.weight, module.bias, key, segments)


def bert_layer(
    layer: Any, hidden: torch.Tensor, attn_mask: torch.Tensor | None, paths: dict[str, str], segments: Segments = NO_SEGMENTS
) -> torch.Tensor:
    """``BertLayer(hidden, attn_mask)`` in eval mode, each task's deltas on its own rows."""
    sa, so = layer.attention.self, layer.attention.output
    shape = (*hidden.shape[:-1], -1, sa.attention_head_size)
    q = _proj(sa.query, hidden, paths["attention.self.query"], segments).view(shape).transpose(1, 2)
    k = _proj(sa.key, hidden, paths["attention.self.key"], segments).view(shape).transpose(1, 2)
    v = _proj(sa.value, hidden, paths["attention.self.value"], segments).view(shape).transpose(1, 2)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
    ctx, _ = attention(sa, q, k, v, attn_mask, dropout=0.0, scaling=sa.scaling)
    ctx = ctx.reshape(*hidden.shape[:-1], -1).contiguous()
    attended = so.LayerNorm(_proj(so.dense, ctx, paths["attention.output.dense"], segments) + hidden)
    inter = layer.intermediate
    mid = inter.intermediate_act_fn(_proj(inter.dense, attended, paths["intermediate.dense"], segments))
    out = layer.output
    return out.LayerNorm(_proj(out.dense, mid, paths["output.dense"], segments) + attended)
