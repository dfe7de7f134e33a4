"""Loaded task extensions within a memory budget (an LRU, like Ray Serve's multiplexer).

Hundreds of tasks may be deployed on one host, but only the ones in use need
their weights resident. The host asks this cache for a task's extension when a
batch needs it; a miss loads it from its artifact (safetensors, mmap-fast),
then least recently used, unpinned extensions are dropped until the resident
total fits the budget. A dropped extension is simply loaded again on its next
request: that request waits for the reload, it never fails because of it. An
extension still referenced by a running batch stays alive until that batch
ends (Python references), so eviction never pulls weights from under a batch.

Pure Python (no torch/Triton): the loader is injected, so it is unit-tested alone.
Thread-safe: a host's worker threads share one cache (a load holds the lock).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Hashable


@dataclasses.dataclass
class CacheStats:
    loads: int = 0
    reloads: int = 0  # loads of something evicted before
    evictions: int = 0
    load_seconds: float = 0.0
    reload_seconds: float = 0.0
    resident_bytes: int = 0


class ExtensionCache:
    def __init__(self, loader: Callable[[Hashable], Any], budget_bytes: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.loader = loader
        self.budget = int(budget_bytes)
        self.clock = clock
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()  # LRU first
        self._bytes: dict[Hashable, int] = {}
        self._evicted: set[Hashable] = set()
        self.pinned: set[Hashable] = set()
        self.stats = CacheStats()
        self._lock = threading.RLock()

    def get(self, key: Hashable) -> Any:
        """The extension for ``key``, loading (and evicting others) if needed."""
        with self._lock:
            ext = self._items.get(key)
            if ext is not None:
                self._items.move_to_end(key)
                return ext
            t0 = self.clock()
            ext = self.loader(key)  # may raise: nothing changes then
            took = self.clock() - t0
            self.stats.loads += 1
            self.stats.load_seconds += took
            if key in self._evicted:
                self._evicted.discard(key)
                self.stats.reloads += 1
                self.stats.reload_seconds += took
            self._items[key] = ext
            self._bytes[key] = int(getattr(ext, "nbytes", 0))
            self.stats.resident_bytes += self._bytes[key]
            self._shrink(keep=key)
            return ext

    def _shrink(self, keep: Hashable) -> None:
        for key in list(self._items):
            if self.stats.resident_bytes <= self.budget:
                return
            if key == keep or key in self.pinned:
                continue
            self._drop(key)
            self._evicted.add(key)
            self.stats.evictions += 1

    def _drop(self, key: Hashable) -> None:
        self._items.pop(key, None)
        self.stats.resident_bytes -= self._bytes.pop(key, 0)

    def retain(self, live: set[Hashable]) -> None:
        """Forget everything not in ``live`` (undeployed tasks, old versions)."""
        with self._lock:
            for key in [k for k in self._items if k not in live]:
                self._drop(key)
            self._evicted &= live
            self.pinned &= live

    def resident(self) -> dict[Hashable, int]:
        """Bytes of each resident extension, least recently used first."""
        with self._lock:
            return {k: self._bytes[k] for k in self._items}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items
