"""Running one scheduled batch: tokenize, shared forward, per-task extensions.

The executor knows torch and the backbone but nothing of Triton or of
scheduling: it gets work items (one per request), fills in each one's result
or error, and never raises for a single bad item. Rows of all tasks go through
the backbone in one padded forward pass (inter-task batching); then the rows
of each task go through its extension together (intra-task batching).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any
import numpy as np
import torch

from fmplex.backbones import BackboneSpec, load_backbone, pool

from .extensions import Extension
from .validation import Rows


@dataclasses.dataclass(eq=False)
class WorkItem:
    rows: Rows
    extension: Extension | None
    result: tuple[np.ndarray, np.ndarray | None] | None = None
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
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.vocab_size = int(self.model.config.vocab_size)

    # --- steps ---------------------------------------------------------------
    def tokenize(self, items: list[WorkItem]) -> None:
        """One batched tokenizer call for every text row of the batch."""
        texts: list[str] = []
        owners: list[WorkItem] = []
        for item in items:
            if item.rows.texts is not None:
                texts.extend(item.rows.texts)
                owners.extend([item] * len(item.rows.texts))
            else:
                item.tokens = list(item.rows.ids or [])
        if not texts:
            return
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, padding=False, verbose=False)["input_ids"]
        for item in {id(o): o for o in owners}.values():
            item.tokens = []
        for owner, ids in zip(owners, enc):
            owner.tokens.append(np.asarray(ids, dtype=np.int64))  # type: ignore[union-attr]
        for item in items:
            longest = max((len(t) for t in item.tokens or []), default=0)
            if longest > self.spec.max_tokens:
                item.client_fault = True
                item.error = f"input has {longest} tokens, more than the backbone's limit of {self.spec.max_tokens}"

    @torch.inference_mode()
    def encode(self, rows: list[np.ndarray]) -> torch.Tensor:
        """Pooled sentence vectors for token-id rows, padded to the longest."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.from_numpy(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        return pool(self.spec, hidden, mask)

    def embed(self, texts: list[str], batch_size: int = 32, progress: Any = None) -> torch.Tensor:
        """Pooled vectors of many texts, truncated to the token limit.

        The control plane fits task heads on exactly what the host computes,
        so it uses this same path rather than its own copy of the pooling.
        """
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = self.tokenizer(chunk, truncation=True, max_length=self.spec.max_tokens, padding=False)["input_ids"]
            out.append(self.encode([np.asarray(e, dtype=np.int64) for e in enc]))
            if progress is not None:
                progress(len(chunk))
        return torch.cat(out) if out else torch.zeros((0, self.spec.hidden_size))

    def run(self, items: list[WorkItem]) -> BatchReport:
        t0 = time.perf_counter()
        self.tokenize(items)
        live = [it for it in items if it.error is None and it.extension is not None]
        if not live:
            return BatchReport(0, 0, 0, time.perf_counter() - t0)
        rows = [r for it in live for r in it.tokens or []]
        pooled = self.encode(rows)
        # Segments: each item's row range in the batch, grouped by extension.
        groups: dict[int, list[tuple[WorkItem, int, int]]] = {}
        start = 0
        for it in live:
            n = len(it.tokens or [])
            groups.setdefault(id(it.extension), []).append((it, start, start + n))
            start += n
        for segs in groups.values():
            self._apply(segs, pooled)
        padded = len(rows) * max(len(r) for r in rows)
        return BatchReport(len(rows), padded, len(groups), time.perf_counter() - t0)

    @staticmethod
    def _apply(segs: list[tuple[WorkItem, int, int]], pooled: torch.Tensor) -> None:
        """One extension call for all rows of one task; its failure is its own."""
        ext = segs[0][0].extension
        assert ext is not None
        index = torch.tensor([i for _, a, b in segs for i in range(a, b)], dtype=torch.long, device=pooled.device)
        try:
            out, txt = ext.outputs(pooled.index_select(0, index))
            if not np.isfinite(out).all():
                raise FloatingPointError("extension produced NaN or Inf")
        except Exception as exc:  # noqa: BLE001 - any task fault stays with the task
            for it, _, _ in segs:
                it.error = f"task extension failed: {type(exc).__name__}: {exc}"
            return
        pos = 0
        for it, a, b in segs:
            n = b - a
            it.result = (out[pos : pos + n], None if txt is None else txt[pos : pos + n])
            pos += n


def set_threads(n: int) -> None:
    """One intra-op thread per serving process by default: on 2 cores, two
    threads stalled 10 ms forwards for 300-500 ms (see DESIGN.md)."""
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
