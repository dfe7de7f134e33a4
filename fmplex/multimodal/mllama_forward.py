"""Batched engine steps of the Mllama language model: self-attention and cross-attention rows together.

An Mllama text model is a Llama decoder with some layers replaced by gated
cross-attention layers that attend to the request's image states. One step
of the engine carries rows of many requests -- text-only ones, ones with one
image, ones with several -- and runs them as one forward:

* self-attention layers are the Llama ones
  (:meth:`~fmplex.generative.forward.LlamaForward.self_attention_layer`): the
  new tokens packed flat, each row on its own KV cache row;
* a cross-attention layer runs on the tokens of the rows that have images.
  Each such row's image keys/values (``k_norm(k_proj(states))``,
  ``v_proj(states)``: computed once, at its prefill) sit in a cross cache row
  of their own, padded to the longest row's; one SDPA call over those rows
  with a boolean mask gives every token exactly its own row's keys, and of
  those the images Mllama's processor lets it see
  (``get_cross_attention_token_mask``: an image from its token up to the
  next image's, adjacent image tokens together). A token that
  sees no image (before the first image token) attends to all of its row's
  image keys and has its MLP output zeroed, as ``_prepare_cross_attention_mask``
  and the full-text-row mask do; a decoded token sees what the prompt's last
  token sees, as ``MllamaForConditionalGeneration.generate`` does.
* text-only rows skip cross-attention layers entirely, as
  ``MllamaTextModel`` skips them without cross-attention states.

The answers equal each request run alone through transformers (greedy tokens
identical, prefill logits within 1e-5 in fp32:
tests/unit/test_multimodal_stages.py). No Triton imports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fmplex.generative.forward import LlamaForward, LlamaLayer, StepBatch, projection_weights
from fmplex.generative.kv_cache import KVCache
from fmplex.generative.sequence import Sequence
from fmplex.row_deltas import Segments, linear

__all__ = ["CrossLayer", "MllamaForward"]


class CrossLayer:
    """References to one Mllama cross-attention decoder layer's weights, norms and gates (no copies)."""

    def __init__(self, layer: Any, cross_li: int) -> None:
        attn, mlp = layer.cross_attn, layer.mlp
        self.cross_li = cross_li  # its layer in the cross cache
        self.w = projection_weights(attn, mlp)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.attn_gate = layer.cross_attn_attn_gate
        self.mlp_gate = layer.cross_attn_mlp_gate


@dataclasses.dataclass
class CrossState:
    """A sequence's cross-attention inputs while it runs (``seq.state``)."""

    keys: int  # its image keys in the cross cache row (images x tiles x patches); 0 = text-only
    decode_mask: torch.Tensor | None  # [keys] bool: what a decoded token sees
    decode_live: bool  # False: a decoded token sees no image (its cross MLP output is zeroed)


class MllamaForward(LlamaForward):
    """Batched steps of an ``MllamaTextModel`` (+ ``lm_head``): a KV cache for its
    self-attention layers and a cross cache for its cross-attention layers."""

    model_type = "mllama_text_model"

    def __init__(self, decoder: Any, lm_head: torch.Tensor, config: Any, *, tiles: int, patches: int, image_token_id: int,
                 max_rows: int, kv_capacity: int = 128) -> None:  # fmt: skip
        self.cross_layers = [int(i) for i in config.cross_attention_layers]
        super().__init__(decoder, lm_head, config, max_rows=max_rows, kv_capacity=kv_capacity)
        self.vocab_size = int(self._embed.shape[0])  # the image token lies past config.vocab_size
        self.tiles, self.patches = tiles, patches
        self.image_token_id = image_token_id
        self.cross = KVCache(len(self.cross_layers), max_rows, self.n_kv, self.head_dim, max(1, kv_capacity))
        # self-attention layer li's row in the KV cache (cross layers have none)
        self._cache_li = {li: i for i, li in enumerate(li for li in range(len(self._layers)) if li not in self.cross_layers)}

    def wrap_layer(self, li: int, layer: Any) -> Any:
        if li in self.cross_layers:
            return CrossLayer(layer, self.cross_layers.index(li))
        return LlamaLayer(layer)

    def self_attention_layers(self) -> int:
        return len(self._layers) - len(self.cross_layers)

    def move(self, src: int, dst: int, seq: Sequence) -> None:
        self.cache.move(src, dst, seq.past)
        keys = seq.state.keys if seq.state is not None else 0
        if keys:
            self.cross.move(src, dst, keys)

    def reset(self) -> None:
        self.cache.reset()
        self.cross.reset()

    @torch.inference_mode()
    def __call__(self, rows: list[Sequence], n_old: int) -> tuple[torch.Tensor, int]:
        step = self.pack(rows, n_old)
        prompt_masks = self._admit(step)
        cross = self._cross_batch(step, prompt_masks)
        h = self.embed(step)
        for li, layer in enumerate(self._layers):
            if isinstance(layer, CrossLayer):
                if cross is not None:
                    h = self._cross_layer(h, layer, li, cross)
            else:
                h = self.self_attention_layer(h, layer, li, self._cache_li[li], step)
        return self.finish(h, step)

    # --- cross-attention ------------------------------------------------------------------
    def _admit(self, step: StepBatch) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Prefill rows: their image keys/values into the cross cache, their state; returns
        each image row's prompt mask ([prompt tokens, keys] bool) and live flags ([prompt tokens])."""
        rows, n_old = step.rows, step.n_old
        keep = max((s.state.keys for s in rows[:n_old] if s.state is not None), default=0)
        new_keys = [0 if s.context is None else int(s.context.shape[0]) * self.tiles * self.patches for s in rows[n_old:]]
        self.cross.ensure(max([keep, *new_keys]), used_rows=n_old, used_len=keep)
        masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        feats = []
        for r, keys in zip(range(n_old, len(rows)), new_keys):
            seq = rows[r]
            if not keys:
                seq.state = CrossState(0, None, False)
                continue
            see = self._prompt_mask(seq.prompt_ids, int(seq.context.shape[0]))  # [prompt tokens, keys]
            live = see.any(dim=-1)
            see[~live] = True  # a row that sees no image attends to all of them (its MLP output is zeroed)
            masks[r] = (see, live)
            seq.state = CrossState(keys, see[-1].clone(), bool(live[-1]))
            feats.append((r, seq.context.reshape(keys, -1).to(self._embed.dtype)))
        if feats:
            states = torch.cat([f for _, f in feats])  # every new row's image states, one projection per layer
            for layer in self._layers:
                if not isinstance(layer, CrossLayer):
                    continue
                k = layer.k_norm(F.linear(states, layer.w["k_proj"]).view(-1, self.n_kv, self.head_dim))
                v = F.linear(states, layer.w["v_proj"]).view(-1, self.n_kv, self.head_dim)
                ck, cv = self.cross.k[layer.cross_li], self.cross.v[layer.cross_li]
                at = 0
                for r, f in feats:
                    n = f.shape[0]
                    ck[r, :, :n] = k[at : at + n].transpose(0, 1)
                    cv[r, :, :n] = v[at : at + n].transpose(0, 1)
                    at += n
        return masks

    def _prompt_mask(self, ids: list[int], images: int) -> torch.Tensor:
        """Which image keys each prompt token sees, as Mllama's processor and
        ``_prepare_cross_attention_mask`` build it (tiles x patches keys per image)."""
        from transformers.models.mllama.processing_mllama import (  # noqa: PLC0415
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        sparse = get_cross_attention_token_mask(ids, self.image_token_id)
        dense = convert_sparse_cross_attention_mask_to_dense([sparse], [[self.tiles] * images], self.tiles, len(ids))
        tiles = torch.from_numpy(dense[0]).bool()  # [prompt tokens, images, tiles]
        return tiles.repeat_interleave(self.patches, dim=2).reshape(len(ids), -1)

    def _cross_batch(self, step: StepBatch, prompt_masks: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> CrossBatch | None:
        """The step's image rows as the cross-attention layers read them (None: no row has images)."""
        rows = step.rows
        image_rows = [r for r, s in enumerate(rows) if s.state is not None and s.state.keys]
        if not image_rows:
            return None
        bi = len(image_rows)
        max_n = max(step.lens[r] for r in image_rows)
        max_keys = max(rows[r].state.keys for r in image_rows)
        mask = torch.zeros(bi, max_n, max_keys, dtype=torch.bool)
        live = []
        for i, r in enumerate(image_rows):
            st: CrossState = rows[r].state
            n = step.lens[r]
            if r < step.n_old:
                mask[i, 0, : st.keys] = st.decode_mask
                live.append(torch.tensor([st.decode_live]))
            else:
                see, row_live = prompt_masks[r]
                mask[i, :n, : st.keys] = see
                live.append(row_live)
            mask[i, n:, : st.keys] = True  # padded queries: any finite row (their outputs are dropped)
        all_rows = bi == len(rows)
        if all_rows:
            tokens, row_of, off_of = None, step.row_of, step.off_of
        else:
            flag = torch.zeros(len(rows), dtype=torch.bool)
            flag[image_rows] = True
            tokens = torch.nonzero(flag[step.row_of], as_tuple=True)[0]
            row_of = (torch.cumsum(flag.long(), 0) - 1)[step.row_of[tokens]]  # index among the image rows
            off_of = step.off_of[tokens]
        owners = [rows[r].adapter for r in image_rows]
        decode_only = max_n == 1
        return CrossBatch(
            rows=None if all_rows else torch.tensor(image_rows, dtype=torch.long), tokens=tokens, row_of=row_of,
            off_of=off_of, max_n=max_n, max_keys=max_keys, decode_only=decode_only, mask=mask[:, None],
            live=torch.cat(live).to(self._embed.dtype)[:, None],
            segs=Segments.of_rows(owners) if decode_only else Segments.of_tokens(owners, row_of),
        )  # fmt: skip

    def _cross_layer(self, h: torch.Tensor, layer: CrossLayer, li: int, cb: CrossBatch) -> torch.Tensor:
        """``MllamaCrossAttentionDecoderLayer`` on the image rows' tokens (the others pass unchanged)."""
        nh, hd = self.n_heads, self.head_dim
        hs = h if cb.tokens is None else h.index_select(0, cb.tokens)
        t = hs.shape[0]
        x = layer.input_norm(hs)
        q = layer.q_norm(linear(x, layer.w["q_proj"], None, (li, "q_proj"), cb.segs).view(t, nh, hd))
        ck, cv = self.cross.k[layer.cross_li], self.cross.v[layer.cross_li]
        if cb.rows is None:
            k, v = ck[: cb.mask.shape[0], :, : cb.max_keys], cv[: cb.mask.shape[0], :, : cb.max_keys]
        else:
            k, v = ck[cb.rows, :, : cb.max_keys], cv[cb.rows, :, : cb.max_keys]
        if cb.decode_only:
            qb = q.unsqueeze(2)  # [image rows, heads, 1, hd]: token i is image row i
        else:
            qb = q.new_zeros(cb.mask.shape[0], nh, cb.max_n, hd)
            qb[cb.row_of, :, cb.off_of] = q
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=cb.mask, scale=self.scaling, enable_gqa=True)
        o = o.squeeze(2) if cb.decode_only else o[cb.row_of, :, cb.off_of]
        hs = hs + layer.attn_gate.tanh() * linear(o.reshape(t, nh * hd), layer.w["o_proj"], None, (li, "o_proj"), cb.segs)
        x = layer.post_norm(hs)
        gate = linear(x, layer.w["gate_proj"], None, (li, "gate_proj"), cb.segs)
        up = linear(x, layer.w["up_proj"], None, (li, "up_proj"), cb.segs)
        mlp = linear(F.silu(gate) * up, layer.w["down_proj"], None, (li, "down_proj"), cb.segs)
        hs = hs + layer.mlp_gate.tanh() * (cb.live * mlp)
        if cb.tokens is None:
            return hs
        return h.index_copy(0, cb.tokens, hs)


@dataclasses.dataclass
class CrossBatch:
    """The step's rows that have images, as a cross-attention layer reads them (built once per step)."""

    rows: torch.Tensor | None  # their step rows (None: all rows of the step, in order)
    tokens: torch.Tensor | None  # their tokens among the step's (None: all)
    row_of: torch.Tensor  # [their tokens] index among the image rows
    off_of: torch.Tensor  # [their tokens] offset among the row's new tokens
    max_n: int
    max_keys: int
    decode_only: bool
    mask: torch.Tensor  # [image rows, 1, max_n, max_keys] bool: the image keys each token sees
    live: torch.Tensor  # [their tokens, 1]: 0 where a token sees no image (its MLP output is zeroed)
    segs: Segments
