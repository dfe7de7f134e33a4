"""The engine's key/value cache: one preallocated tensor per layer, one row per running sequence.

``[max_rows, kv_heads, capacity, head_dim]`` for K and for V, row i = the i-th
running sequence. Preallocated so that a decode step writes in place instead of
concatenating; grown by doubling when a sequence outruns it (rare: positions
are bounded by the context limit) and shrunk back once the engine is idle, so
that one long answer does not pin its memory. A finished sequence's row is
refilled with the last running one (``move``: O(its length) copy), which keeps
the running rows dense at ``[:rows]`` for one attention call over the batch.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Per-layer K and V: ``[max_rows, kv_heads, capacity, head_dim]``, grown by doubling."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int) -> None:
        self.shape = (layers, rows, kv_heads, head_dim)
        self.initial = capacity
        self._alloc(capacity)

    @torch.inference_mode()
    def _alloc(self, capacity: int) -> None:
        layers, rows, kv, hd = self.shape
        self.capacity = capacity
        self.k = [torch.zeros(rows, kv, capacity, hd) for _ in range(layers)]
        self.v = [torch.zeros(rows, kv, capacity, hd) for _ in range(layers)]

    @torch.inference_mode()
    def ensure(self, length: int, used_rows: int, used_len: int) -> None:
        """Room for ``length`` positions, keeping rows ``[:used_rows]`` up to ``used_len``."""
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        old_k, old_v = self.k, self.v
        self._alloc(cap)
        for new, old in ((self.k, old_k), (self.v, old_v)):
            for n, o in zip(new, old):
                n[:used_rows, :, :used_len] = o[:used_rows, :, :used_len]

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]

    def reset(self) -> None:
        """Back to the initial capacity once idle: long answers do not pin memory."""
        if self.capacity != self.initial:
            self._alloc(self.initial)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
