"""One batched model step of the engine: what a forward is, and the Llama one.

A *forward* takes the step's rows -- ``rows[:n_old]`` decode one token (their
last), ``rows[n_old:]`` prefill their prompts -- and returns each row's
next-token logits. It owns whatever per-row state the model needs (a KV cache)
and keeps it aligned with the engine's rows (``move`` when the engine refills a
finished row with the last one).

:class:`LlamaForward` is our own loop over the Llama layers of a loaded decoder
(its weights and norm/rotary modules, not a copy), because a step mixes rows at
different positions and tasks:
  * the new tokens of all rows are packed flat ([tokens, hidden], no padding)
    through every projection, with explicit position ids for the rotary
    embedding; a row may bring its own prompt embeddings (``prompt_embeds``:
    image features in place of placeholder tokens) instead of its ids';
  * each task's LoRA or IA3 delta changes its own rows only: the rows' owners
    (:class:`fmplex.row_deltas.Segments`) are built once per step and passed
    to every projection;
  * attention runs per row against that row's KV cache, with a boolean mask
    (row r sees its own keys ``< past_r + i + 1``): one SDPA call over the
    decode rows (one query each) and, in a step that admits prompts, one more
    over the prefill rows, their queries padded to the longest prompt among
    them only. Padding the decode rows to a prompt's length too would make a
    step with one long prompt cost rows x prompt instead of rows + prompt,
    and stall every running sequence for it.
Greedy decoding gives the same token ids as ``model.generate(do_sample=False)``
on the sequence alone (fp32; tests/unit/test_generative_engine.py).

A step is four parts -- ``pack`` (the :class:`StepBatch`), ``embed``,
``self_attention_layer`` per layer, ``finish`` (logits) -- so that a decoder
with other layer kinds among its Llama layers reuses them
(:mod:`fmplex.multimodal.mllama_forward`: Mllama's cross-attention layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fmplex.row_deltas import Segments, linear

from .kv_cache import KVCache
from .sequence import Sequence

__all__ = ["Forward", "LlamaForward", "LlamaLayer", "StepBatch"]


class Forward:
    """The engine's model step (a base class: subclasses run a model)."""

    max_positions: int  # positions a sequence may reach
    vocab_size: int  # prompt token ids must lie in [0, vocab_size)
    cache: Any = None

    def __call__(self, rows: list[Sequence], n_old: int) -> tuple[torch.Tensor, int]:
        """Logits ``[len(rows), vocab]`` of each row's next token, and the padded
        attention volume (rows x padded query length). Advances ``seq.past``;
        sets ``seq.prompt_logits`` for prefilled rows that asked for them."""
        raise NotImplementedError

    def move(self, src: int, dst: int, seq: Sequence) -> None:
        """Row ``src`` (holding ``seq``) becomes row ``dst``."""

    def reset(self) -> None:
        """The engine is idle (or failed a step): release what can be released."""

    def release(self, seq: Sequence) -> None:
        """``seq`` left the batch."""
        seq.state = None


@dataclasses.dataclass
class StepBatch:
    """One step's rows as every layer reads them: the new tokens packed flat
    (``starts[r]:starts[r + 1]`` are row r's), their positions, rows and offsets,
    the self-attention mask and the rows' owners (built once per step)."""

    rows: list[Sequence]
    n_old: int  # rows[:n_old] decode one token, the others prefill
    ids: torch.Tensor  # [t] new token ids
    pos: torch.Tensor  # [t] their positions
    row_of: torch.Tensor  # [t] the row of each token
    off_of: torch.Tensor  # [t] its offset among its row's new tokens
    lens: list[int]  # new tokens per row
    starts: list[int]
    max_n: int  # the longest row's new tokens (the prefill rows' padded query length)
    max_kv: int  # the longest decode row's keys after this step
    decode_only: bool  # one token per row: token r is row r
    n_dec: int  # rows[:n_dec] are attended with one query each (all if decode_only, else the n_old decoding ones)
    mask: torch.Tensor  # their self-attention: [n_dec, 1, 1, max_kv], True = may attend
    segs: Segments
    prefill_kv: int = 0  # the longest prefill row's keys after this step
    prefill_mask: torch.Tensor | None = None  # [b - n_old, 1, max_n, prefill_kv] (None: no prefill rows)
    cos: torch.Tensor | None = None  # rotary [t, 1, head_dim], set by ``embed``
    sin: torch.Tensor | None = None


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def projection_weights(attn: Any, mlp: Any) -> dict[str, Any]:
    """A layer's attention and MLP projection weights by name (references, no copies)."""
    return {**{n: getattr(attn, n).weight for n in PROJECTIONS}, **{n: getattr(mlp, n).weight for n in MLP_PROJECTIONS}}


class LlamaLayer:
    """References to one decoder layer's weights and norm modules (no copies)."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.w = projection_weights(attn, mlp)
        for name, proj in (("q_proj", attn.q_proj), ("o_proj", attn.o_proj), ("gate_proj", mlp.gate_proj)):
            if getattr(proj, "bias", None) is not None:
                raise ValueError(f"{name} has a bias: not a plain Llama layer")
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaForward(Forward):
    """Batched steps of a Llama decoder (``LlamaModel`` + an ``lm_head`` weight) on a :class:`KVCache`."""

    model_type = "llama"  # the decoder config this forward runs

    def __init__(self, decoder: Any, lm_head: torch.Tensor, config: Any, *, max_rows: int, kv_capacity: int = 128) -> None:
        if getattr(config, "model_type", "") != self.model_type:
            raise ValueError(f"{type(self).__name__} runs {self.model_type} decoders, got model_type {getattr(config, 'model_type', None)!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"the MLP activation must be silu, got {config.hidden_act!r}")
        self.max_positions = int(config.max_position_embeddings)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.scaling = self.head_dim**-0.5  # as LlamaAttention
        self.vocab_size = int(config.vocab_size)
        self._embed = decoder.embed_tokens.weight
        self._layers = [self.wrap_layer(li, layer) for li, layer in enumerate(decoder.layers)]
        self._norm = decoder.norm
        self._rotary = decoder.rotary_emb
        self._lm_head = lm_head
        self.cache = KVCache(self.self_attention_layers(), max_rows, self.n_kv, self.head_dim, kv_capacity)

    def wrap_layer(self, li: int, layer: Any) -> Any:
        """What the step loop holds of decoder layer ``li``."""
        return LlamaLayer(layer)

    def self_attention_layers(self) -> int:
        """Layers with a KV cache layer of their own (all of them in Llama)."""
        return len(self._layers)

    @classmethod
    def of_causal_lm(cls, model: Any, *, max_rows: int, kv_capacity: int = 128) -> LlamaForward:
        """From a ``LlamaForCausalLM``."""
        return cls(model.model, model.lm_head.weight, model.config, max_rows=max_rows, kv_capacity=kv_capacity)

    def move(self, src: int, dst: int, seq: Sequence) -> None:
        self.cache.move(src, dst, seq.past)

    def reset(self) -> None:
        self.cache.reset()

    @torch.inference_mode()
    def __call__(self, rows: list[Sequence], n_old: int) -> tuple[torch.Tensor, int]:
        step = self.pack(rows, n_old)
        h = self.embed(step)
        for li, layer in enumerate(self._layers):
            h = self.self_attention_layer(h, layer, li, li, step)
        return self.finish(h, step)

    # --- the parts of a step (a forward for a model with other layer kinds reuses them) ---
    def pack(self, rows: list[Sequence], n_old: int) -> StepBatch:
        """The step's new tokens packed flat, the self-attention mask, the rows' owners,
        and room in the KV cache for every row's new positions."""
        ids: list[int] = []
        pos: list[int] = []
        row_of: list[int] = []
        off_of: list[int] = []
        lens = []
        for r, seq in enumerate(rows):
            new = seq.prompt_ids if r >= n_old else [seq.generated[-1]]
            ids.extend(new)
            pos.extend(range(seq.past, seq.past + len(new)))
            row_of.extend([r] * len(new))
            off_of.extend(range(len(new)))
            lens.append(len(new))
        b, t = len(rows), len(ids)
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        kv_len = [seq.past + n for seq, n in zip(rows, lens)]
        max_n = max(lens)
        decode_only = t == b
        n_dec = b if decode_only else n_old  # rows attended with one query each (a one-token prompt is one too)
        max_kv = max(kv_len[:n_dec], default=0)
        prefill_kv = max(kv_len[n_dec:], default=0)
        self.cache.ensure(max(max_kv, prefill_kv), used_rows=n_old, used_len=max((s.past for s in rows[:n_old]), default=0))
        row_t = torch.tensor(row_of, dtype=torch.long)
        mask = (torch.arange(max_kv)[None, :] < torch.tensor(kv_len[:n_dec], dtype=torch.long)[:, None])[:, None, None, :]
        prefill_mask = None
        if n_dec < b:
            last = torch.tensor(lens[n_dec:])[:, None] - 1
            qpos = torch.tensor([s.past for s in rows[n_dec:]])[:, None] + torch.minimum(torch.arange(max_n)[None, :], last)
            prefill_mask = (torch.arange(prefill_kv)[None, None, :] <= qpos[:, :, None])[:, None]
        owners = [seq.adapter for seq in rows]
        segs = Segments.of_rows(owners) if decode_only else Segments.of_tokens(owners, row_t)  # decode: token r is row r
        return StepBatch(
            rows=rows, n_old=n_old, ids=torch.tensor(ids, dtype=torch.long), pos=torch.tensor(pos, dtype=torch.long),
            row_of=row_t, off_of=torch.tensor(off_of, dtype=torch.long), lens=lens, starts=starts, max_n=max_n,
            max_kv=max_kv, decode_only=decode_only, n_dec=n_dec, mask=mask, segs=segs, prefill_kv=prefill_kv, prefill_mask=prefill_mask,
        )  # fmt: skip

    def embed(self, step: StepBatch) -> torch.Tensor:
        """The new tokens' input embeddings [t, hidden] (a row's own ``prompt_embeds`` where it brings them);
        sets the step's rotary cos/sin."""
        h = F.embedding(step.ids, self._embed)  # [t, hidden]
        for r in range(step.n_old, len(step.rows)):
            embeds = step.rows[r].prompt_embeds
            if embeds is not None:
                h[step.starts[r] : step.starts[r + 1]] = embeds.to(h.dtype)
        cos, sin = self._rotary(h[None], step.pos[None])
        step.cos, step.sin = cos[0][:, None, :], sin[0][:, None, :]  # [t, 1, head_dim]
        return h

    def self_attention_layer(self, h: torch.Tensor, layer: LlamaLayer, li: int, cache_li: int, step: StepBatch) -> torch.Tensor:
        """One Llama decoder layer (weights ``layer``, adapter key ``li``) on the KV cache's layer ``cache_li``."""
        t = h.shape[0]
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        segs, row_t, pos_t = step.segs, step.row_of, step.pos
        x = layer.input_norm(h)
        q = self._proj(x, layer, li, "q_proj", segs).view(t, nh, hd)
        k = self._proj(x, layer, li, "k_proj", segs).view(t, nkv, hd)
        v = self._proj(x, layer, li, "v_proj", segs).view(t, nkv, hd)
        q = q * step.cos + _rotate_half(q) * step.sin
        k = k * step.cos + _rotate_half(k) * step.sin
        ck, cv = self.cache.k[cache_li], self.cache.v[cache_li]
        ck[row_t, :, pos_t] = k
        cv[row_t, :, pos_t] = v
        o = self._attend(q, ck, cv, step)
        h = h + self._proj(o.reshape(t, nh * hd), layer, li, "o_proj", segs)
        x = layer.post_norm(h)
        gate = self._proj(x, layer, li, "gate_proj", segs)
        up = self._proj(x, layer, li, "up_proj", segs)
        return h + self._proj(F.silu(gate) * up, layer, li, "down_proj", segs)

    def _attend(self, q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, step: StepBatch) -> torch.Tensor:
        """Self-attention output [t, heads, hd] of the step's tokens ``q`` [t, heads, hd] against the
        cache's keys and values: the one-query rows (tokens ``:n_dec``) in one call, prefill rows in
        another, padded among themselves."""
        n_dec, b, kv = step.n_dec, len(step.rows), step.max_kv
        attend = F.scaled_dot_product_attention
        parts = []
        if n_dec:
            parts.append(attend(q[:n_dec].unsqueeze(2), ck[:n_dec, :, :kv], cv[:n_dec, :, :kv], attn_mask=step.mask,
                                scale=self.scaling, enable_gqa=True).squeeze(2))  # fmt: skip
        if n_dec < b:
            rows_p, offs_p = step.row_of[n_dec:] - n_dec, step.off_of[n_dec:]
            qp = q.new_zeros(b - n_dec, q.shape[1], step.max_n, q.shape[2])
            qp[rows_p, :, offs_p] = q[n_dec:]
            op = attend(qp, ck[n_dec:b, :, : step.prefill_kv], cv[n_dec:b, :, : step.prefill_kv], attn_mask=step.prefill_mask,
                        scale=self.scaling, enable_gqa=True)  # fmt: skip
            parts.append(op[rows_p, :, offs_p])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def finish(self, h: torch.Tensor, step: StepBatch) -> tuple[torch.Tensor, int]:
        """Each row's next-token logits (and prompt logits where asked); advances ``seq.past``."""
        rows, starts = step.rows, step.starts
        last_tok = torch.tensor([s - 1 for s in starts[1:]], dtype=torch.long)
        hidden = self._norm(h.index_select(0, last_tok))
        logits = F.linear(hidden, self._lm_head)
        for r in range(step.n_old, len(rows)):
            if rows[r].want_prompt_logits:
                rows[r].prompt_logits = F.linear(self._norm(h[starts[r] : starts[r + 1]]), self._lm_head)
        for seq, n in zip(rows, step.lens):
            seq.past += n
        return logits, step.n_dec + (len(rows) - step.n_dec) * step.max_n

    @staticmethod
    def _proj(x: torch.Tensor, layer: LlamaLayer, li: int, name: str, segs: Segments) -> torch.Tensor:
        return linear(x, layer.w[name], None, (li, name), segs)
