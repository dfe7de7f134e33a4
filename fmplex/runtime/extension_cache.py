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

Thread-safe without holding a lock during a load: a host's worker threads
share one cache, and a load (milliseconds to seconds) must never delay
another task's hit. The lock guards only the bookkeeping; a miss registers
the key as *loading*, loads outside the lock, then installs the result.
Concurrent requests for a key that is loading wait for that one load (and
share its error if it fails), so a key is loaded once, however many workers
ask for it at the same time.
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


class _Load:
    """A load in progress: its waiters block on ``done``, then read the outcome."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


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
        self._loading: dict[Hashable, _Load] = {}
        self._lock = threading.Lock()  # bookkeeping only; never held during a load

    def get(self, key: Hashable) -> Any:
        """The extension for ``key``, loading (and evicting others) if needed."""
        with self._lock:
            ext = self._items.get(key)
            if ext is not None:
                self._items.move_to_end(key)
                return ext
            load = self._loading.get(key)
            owner = load is None
            if owner:
                load = self._loading[key] = _Load()
        assert load is not None
        if not owner:  # another thread is loading this key: share its result
            load.done.wait()
            if load.error is not None:
                raise load.error
            return load.value
        t0 = self.clock()
        try:
            ext = self.loader(key)  # may raise: nothing changes then
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            load.error = exc
            load.done.set()
            raise
        took = self.clock() - t0
        with self._lock:
            self._loading.pop(key, None)
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
        load.value = ext
        load.done.set()
        return ext

    def loading(self) -> set[Hashable]:
        """Keys being loaded right now."""
        with self._lock:
            return set(self._loading)

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
