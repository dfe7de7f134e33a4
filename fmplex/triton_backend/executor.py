"""Running one scheduled batch: tokenize, shared forward, per-task extensions.

The executor knows torch and the backbone but nothing of Triton or of
scheduling: it gets work items (one per request), fills in each one's result
or error, and never raises for a single bad item. Rows of all tasks go through
the backbone in one padded forward pass (inter-task batching), with each
task's body applied to its own rows only:

- soft prompts: the row's input embeddings are ``[prompt ; tokens]``;
- LoRA / IA3 / adapters: per-row deltas inside the shared Linears, with the
  rows' owners (:class:`fmplex.row_deltas.Segments`) built once per pass and
  passed explicitly through every layer (:mod:`.segments`);
- forks: below a task's fork point its rows run the shared layers, above it
  the task's own copies, all rows of that task together (intra-task batching).

Then each task's head runs once on all of its rows.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np
import torch
from transformers.masking_utils import create_bidirectional_mask

from fmplex.backbones import BackboneSpec, load_backbone
from fmplex.row_deltas import NO_SEGMENTS, Segments

from . import segments
from .extensions import Extension, SlotOutputs
from fmplex.runtime.validation import Rows


@dataclasses.dataclass(eq=False)
class WorkItem:
    rows: Rows
    extension: Extension | None
    result: SlotOutputs | None = None
    error: str | None = None
    client_fault: bool = False  # the request was bad (vs. the task or the host failing)
    tokens: list[np.ndarray] | None = None


@dataclasses.dataclass
class BatchReport:
    rows: int
    padded_tokens: int
    tasks: int
    seconds: float


class Executor:
    def __init__(self, spec: BackboneSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.tokenizer, self.model = load_backbone(spec.name, device)
        self.config = self.model.config
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # A fast tokenizer refuses concurrent calls ("Already borrowed"); workers share it.
        self._tok_lock = threading.Lock()
        self.vocab_size = int(self.config.vocab_size)
        self.layer_paths = [segments.layer_paths(j) for j in range(len(self.model.encoder.layer))]

    # --- steps ---------------------------------------------------------------
    def tokenize(self, items: list[WorkItem]) -> None:
        """One batched tokenizer call for every text row of the batch."""
        texts: list[str] = []
        owners: list[WorkItem] = []
        for item in items:
            if item.rows.texts is not None:
                item.tokens = []
                texts.extend(item.rows.texts)
                owners.extend([item] * len(item.rows.texts))
            else:
                item.tokens = list(item.rows.ids or [])
        if texts:
            with self._tok_lock:
                enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, padding=False, verbose=False)["input_ids"]
            for owner, ids in zip(owners, enc):
                owner.tokens.append(np.asarray(ids, dtype=np.int64))  # type: ignore[union-attr]
        for item in items:
            longest = max((len(t) for t in item.tokens or []), default=0)
            if longest > self.spec.max_tokens:
                item.client_fault = True
                item.error = f"input has {longest} tokens, more than the backbone's limit of {self.spec.max_tokens}"

    @torch.inference_mode()
    def forward(self, rows: list[np.ndarray], owners: list[Extension | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [rows, longest, hidden] and mask for a batch of rows.

        A dense batch pads every row to the longest one; when rows differ a
        lot in length (a task's soft prompt makes its rows longer) that waste
        costs more than another pass, so the rows are split into a few
        length groups (:func:`plan_passes`) and the results stitched back,
        zero-padded where masked.
        """
        lengths = [len(r) + (0 if o is None else o.prompt_len) for r, o in zip(rows, owners)]
        plan = plan_passes(lengths)
        if len(plan) == 1:
            return self._pass(rows, owners)
        longest = max(lengths)
        hidden = torch.zeros((len(rows), longest, self.config.hidden_size), device=self.device)
        mask = torch.zeros((len(rows), longest), dtype=torch.long, device=self.device)
        for group in plan:
            h, m = self._pass([rows[i] for i in group], [owners[i] for i in group])
            idx = torch.tensor(group, dtype=torch.long, device=self.device)
            hidden[idx, : h.shape[1]] = h
            mask[idx, : m.shape[1]] = m
        return hidden, mask

    def _pass(self, rows: list[np.ndarray], owners: list[Extension | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [rows, length, hidden] and mask of one shared pass.

        Row i is ``[prompt of owners[i] ; rows[i]]``, right-padded to the
        longest; positions count from 0 at the first prompt vector, as PEFT's
        prompt tuning does.
        """
        prompts = [0 if o is None else o.prompt_len for o in owners]
        total = [p + len(r) for p, r in zip(prompts, rows)]
        length = max(total)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, prompts[i] : total[i]] = torch.from_numpy(r)
            mask[i, : total[i]] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.embeddings.word_embeddings(ids)
        for i, o in enumerate(owners):
            if prompts[i]:
                embeds[i, : prompts[i]] = o.prompt  # type: ignore[union-attr]
        hidden = self.model.embeddings(inputs_embeds=embeds, token_type_ids=torch.zeros_like(ids))
        attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        everyone = torch.arange(len(rows), device=self.device)
        segs = Segments.of_rows(owners, self.device)  # once per pass; rebuilt only where forks split the rows
        shared_segs, shared_key = segs, None
        for j, layer in enumerate(self.model.encoder.layer):
            paths = self.layer_paths[j]
            forked = [o is not None and o.fork_point is not None and o.fork_point <= j for o in owners]
            if not any(forked):
                hidden = segments.bert_layer(layer, hidden, attn, paths, segs)
                continue
            shared = everyone[~torch.tensor(forked, device=self.device)]
            out = torch.empty_like(hidden)
            if len(shared):
                key = tuple(forked)
                if key != shared_key:
                    shared_segs, shared_key = Segments.of_rows([owners[int(i)] for i in shared], self.device), key
                sub = create_bidirectional_mask(config=self.config, inputs_embeds=hidden[shared], attention_mask=mask[shared])
                out[shared] = segments.bert_layer(layer, hidden[shared], sub, paths, shared_segs)
            for ext, idx in _groups(owners, forked, self.device):
                own = ext.fork_layers[j - ext.fork_point]
                sub = create_bidirectional_mask(config=self.config, inputs_embeds=hidden[idx], attention_mask=mask[idx])
                out[idx] = segments.bert_layer(own, hidden[idx], sub, paths, NO_SEGMENTS)
            hidden = out
        return hidden, mask

    def encode(self, rows: list[np.ndarray], extension: Extension | None = None) -> torch.Tensor:
        """Pooled sentence vectors of token-id rows (one task, or the plain backbone)."""
        from fmplex.backbones import pool  # noqa: PLC0415

        hidden, mask = self.forward(rows, [extension] * len(rows))
        p = 0 if extension is None else extension.prompt_len
        return pool(self.spec, hidden[:, p:], mask[:, p:])

    def embed(self, texts: list[str], batch_size: int = 32, progress: Any = None, extension: Extension | None = None) -> torch.Tensor:
        """Pooled vectors of many texts (truncated to the token limit).

        The control plane fits task heads on exactly what the host computes,
        so it uses this same path rather than its own copy of the pooling.
        """
        out = []
        limit = self.spec.max_tokens - (0 if extension is None else extension.prompt_len)
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            with self._tok_lock:
                enc = self.tokenizer(chunk, truncation=True, max_length=limit, padding=False)["input_ids"]
            out.append(self.encode([np.asarray(e, dtype=np.int64) for e in enc], extension))
            if progress is not None:
                progress(len(chunk))
        return torch.cat(out) if out else torch.zeros((0, self.spec.hidden_size))

    def run(self, items: list[WorkItem]) -> BatchReport:
        t0 = time.perf_counter()
        self.tokenize(items)
        live = [it for it in items if it.error is None and it.extension is not None]
        for it in live:
            longest = max(len(t) for t in it.tokens or [])
            if longest + it.extension.prompt_len > self.spec.max_tokens:  # type: ignore[union-attr]
                it.client_fault = True
                it.error = (
                    f"input has {longest} tokens; with this task's {it.extension.prompt_len} prompt vectors "  # type: ignore[union-attr]
                    f"that is more than the backbone's limit of {self.spec.max_tokens}"
                )
        live = [it for it in live if it.error is None]
        if not live:
            return BatchReport(0, 0, 0, time.perf_counter() - t0)
        rows = [r for it in live for r in it.tokens or []]
        owners = [it.extension for it in live for _ in it.tokens or []]
        hidden, mask = self.forward(rows, owners)
        # Segments: each item's row range in the batch, grouped by extension.
        groups: dict[int, list[tuple[WorkItem, int, int]]] = {}
        start = 0
        for it in live:
            n = len(it.tokens or [])
            groups.setdefault(id(it.extension), []).append((it, start, start + n))
            start += n
        for segs in groups.values():
            self._apply(segs, hidden, mask)
        return BatchReport(len(rows), int(hidden.shape[0] * hidden.shape[1]), len(groups), time.perf_counter() - t0)

    @staticmethod
    def _apply(segs: list[tuple[WorkItem, int, int]], hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """One head call for all rows of one task; its failure is its own."""
        ext = segs[0][0].extension
        assert ext is not None
        index = torch.tensor([i for _, a, b in segs for i in range(a, b)], dtype=torch.long, device=hidden.device)
        h, m = hidden.index_select(0, index), mask.index_select(0, index)
        p = ext.prompt_len
        try:
            with torch.inference_mode():
                res = ext.outputs(h[:, p:], m[:, p:], h[:, 0])
            for arr in [res.out, *(res.tok or [])]:
                if arr is not None and not np.isfinite(arr).all():
                    raise FloatingPointError("extension produced NaN or Inf")
        except Exception as exc:  # noqa: BLE001 - any task fault stays with the task
            for it, _, _ in segs:
                it.error = f"task extension failed: {type(exc).__name__}: {exc}"
            return
        pos = 0
        for it, a, b in segs:
            n = b - a
            it.result = SlotOutputs(
                out=None if res.out is None else res.out[pos : pos + n],
                txt=None if res.txt is None else res.txt[pos : pos + n],
                tok=None if res.tok is None else res.tok[pos : pos + n],
            )
            pos += n


# Fixed cost of one more forward pass, in padded token-rows (measured on the
# 2-core CPU: a 1-row pass costs ~10 ms of which ~7 ms do not scale with rows).
PASS_OVERHEAD = 32


def plan_passes(lengths: list[int], max_passes: int = 3, overhead: int = PASS_OVERHEAD) -> list[list[int]]:
    """Split rows into at most ``max_passes`` length groups minimising padded
    token-rows plus ``overhead`` per pass (exact DP over rows sorted by length)."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    srt = [lengths[i] for i in order]
    if n <= 1 or srt[0] == srt[-1]:
        return [list(range(n))]
    inf = float("inf")
    # best[k][j]: cost of the first j sorted rows in k passes; cut[k][j]: where the last pass starts
    best = [[inf] * (n + 1) for _ in range(max_passes + 1)]
    cut = [[0] * (n + 1) for _ in range(max_passes + 1)]
    best[0][0] = 0.0
    for k in range(1, max_passes + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + (j - i) * srt[j - 1] + overhead
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    k = min(range(1, max_passes + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while k > 0:
        i = cut[k][j]
        groups.append(sorted(order[i:j]))
        j, k = i, k - 1
    return groups[::-1]


def _groups(owners: list[Any], forked: list[bool], device: torch.device) -> list[tuple[Any, torch.Tensor]]:
    """Rows of each forked extension, together (intra-task batching)."""
    out: dict[int, tuple[Any, list[int]]] = {}
    for i, (o, f) in enumerate(zip(owners, forked)):
        if f:
            out.setdefault(id(o), (o, []))[1].append(i)
    return [(o, torch.tensor(rows, dtype=torch.long, device=device)) for o, rows in out.values()]


def set_threads(n: int) -> None:
    """One intra-op thread per serving process by default: on 2 cores, two
    threads stalled 10 ms forwards for 300-500 ms (see DESIGN.md)."""
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process


def pad_tokens(rows: list[np.ndarray]) -> np.ndarray:
    """Per-token outputs of one request as one array [rows, longest, d], zero-padded."""
    longest = max(r.shape[0] for r in rows)
    out = np.zeros((len(rows), longest, rows[0].shape[1]), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
