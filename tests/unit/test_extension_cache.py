"""The host's LRU of loaded extensions under a memory budget (no torch needed)."""

from __future__ import annotations

import pytest

from fmplex.runtime.extension_cache import ExtensionCache


class Ext:
    def __init__(self, key: str, nbytes: int) -> None:
        self.key, self.nbytes = key, nbytes


class Loader:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.calls: list[str] = []

    def __call__(self, key: str) -> Ext:
        self.calls.append(key)
        if key not in self.sizes:
            raise FileNotFoundError(key)
        return Ext(key, self.sizes[key])


def test_hits_do_not_reload() -> None:
    loader = Loader({"a": 10})
    cache = ExtensionCache(loader, budget_bytes=100)
    assert cache.get("a") is cache.get("a")
    assert loader.calls == ["a"] and cache.stats.loads == 1


def test_least_recently_used_is_evicted_and_reloaded_on_demand() -> None:
    loader = Loader({"a": 40, "b": 40, "c": 40})
    cache = ExtensionCache(loader, budget_bytes=100)
    cache.get("a")
    cache.get("b")
    cache.get("a")  # b is now least recently used
    cache.get("c")
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats.evictions == 1 and cache.stats.resident_bytes == 80
    again = cache.get("b")  # a request for an evicted task waits for a reload, it is not refused
    assert again.key == "b" and cache.stats.reloads == 1
    assert "a" not in cache  # a was the LRU when b came back
    assert cache.stats.resident_bytes <= 100


def test_pinned_extensions_stay() -> None:
    loader = Loader({"a": 60, "b": 60, "c": 60})
    cache = ExtensionCache(loader, budget_bytes=100)
    cache.pinned = {"a"}
    cache.get("a")
    cache.get("b")
    cache.get("c")
    assert "a" in cache and "b" not in cache and "c" in cache


def test_an_extension_bigger_than_the_budget_still_serves() -> None:
    cache = ExtensionCache(Loader({"big": 500, "a": 10}), budget_bytes=100)
    cache.get("a")
    assert cache.get("big").key == "big"  # just loaded: never evicted by its own load
    assert "a" not in cache


def test_failed_load_changes_nothing() -> None:
    cache = ExtensionCache(Loader({"a": 10}), budget_bytes=100)
    cache.get("a")
    with pytest.raises(FileNotFoundError):
        cache.get("missing")
    assert cache.resident() == {"a": 10} and cache.stats.loads == 1


def test_retain_forgets_undeployed() -> None:
    cache = ExtensionCache(Loader({"a": 10, "b": 10}), budget_bytes=100)
    cache.get("a")
    cache.get("b")
    cache.pinned = {"a", "b"}
    cache.retain({"b"})
    assert cache.resident() == {"b": 10} and cache.pinned == {"b"} and cache.stats.resident_bytes == 10


def test_reload_time_is_measured() -> None:
    ticks = iter([0.0, 1.0, 2.0, 2.5, 3.0, 3.25])
    cache = ExtensionCache(Loader({"a": 80, "b": 80}), budget_bytes=100, clock=lambda: next(ticks))
    cache.get("a")  # 1.0 s
    cache.get("b")  # 0.5 s, evicts a
    cache.get("a")  # reload 0.25 s
    assert cache.stats.load_seconds == pytest.approx(1.75)
    assert cache.stats.reload_seconds == pytest.approx(0.25) and cache.stats.reloads == 1


class SlowLoader:
    """A loader that blocks on ``release`` for the keys in ``slow`` (an injected slow load)."""

    def __init__(self, slow: set[str], fail: set[str] | None = None) -> None:
        import threading  # noqa: PLC0415

        self.slow, self.fail = slow, fail or set()
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Ext:
        with self._lock:
            self.calls.append(key)
        if key in self.slow:
            self.started.set()
            assert self.release.wait(10), "the test never released the slow load"
        if key in self.fail:
            raise OSError(f"cannot read {key}")
        return Ext(key, 10)


def test_a_slow_load_does_not_delay_another_tasks_hit() -> None:
    import threading  # noqa: PLC0415

    loader = SlowLoader(slow={"slow"})
    cache = ExtensionCache(loader, budget_bytes=1000)
    fast = cache.get("fast")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(cache.get("slow")))
    t.start()
    assert loader.started.wait(5)
    # While "slow" is loading (its loader blocked), a hit and a load of other keys return at once.
    assert cache.get("fast") is fast
    assert cache.get("other").key == "other"
    assert cache.loading() == {"slow"} and "slow" not in cache
    loader.release.set()
    t.join(5)
    assert not t.is_alive() and got and got[0].key == "slow"  # type: ignore[attr-defined]
    assert cache.loading() == set() and "slow" in cache


def test_concurrent_requests_for_one_key_load_it_once() -> None:
    import threading  # noqa: PLC0415

    loader = SlowLoader(slow={"a"})
    cache = ExtensionCache(loader, budget_bytes=1000)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    assert loader.started.wait(5)
    loader.release.set()
    for t in threads:
        t.join(5)
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert loader.calls == ["a"] and cache.stats.loads == 1


def test_a_failed_load_fails_its_waiters_and_is_retried_later() -> None:
    import threading  # noqa: PLC0415

    loader = SlowLoader(slow={"bad"}, fail={"bad"})
    cache = ExtensionCache(loader, budget_bytes=1000)
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            cache.get("bad")
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    assert loader.started.wait(5)
    loader.release.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 3 and loader.calls == ["bad"]  # one load, its error shared
    assert cache.loading() == set() and cache.stats.loads == 0
    with pytest.raises(OSError):
        cache.get("bad")  # nothing cached: the next request tries again
    assert loader.calls == ["bad", "bad"]
