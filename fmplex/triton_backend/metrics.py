"""The host's own Prometheus metrics, beside Triton's per-vFM statistics.

Triton already counts requests and latencies per vFM (each vFM is a model); what
only the host knows is the scheduler's view — per-task queue depth, served
rows and cost, refusals — and how well batches mix. Each metric update is an
IPC message to the server, so the worker pushes accumulated deltas at most
every ``interval`` seconds instead of per request.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import triton_python_backend_utils as pb_utils

# MetricFamily exists only once the stub runs the model (not while Triton
# imports model.py to auto-complete its config), so look it up late.
COUNTER = "COUNTER"
GAUGE = "GAUGE"

_TASK_COUNTERS = {
    "served_requests": "fmplex_task_served_requests_total",
    "served_rows": "fmplex_task_served_rows_total",
    "served_cost": "fmplex_task_served_cost_total",
    "rejected_full": "fmplex_task_rejected_queue_full_total",
    "expired": "fmplex_task_expired_total",
}


class HostMetrics:
    def __init__(self, host: str, interval: float = 0.25, instance: str = "") -> None:
        self.host = host
        # Each instance of a scaled host publishes its own series (label
        # ``instance``): gauges such as the stub pid or the queue depth would
        # otherwise show whichever instance wrote last. Sum them for the host.
        self.instance = instance
        self.interval = interval
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, str], Any] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._next_flush = 0.0
        self._dirty = False
        self._received: dict[str, int] = {}
        self._outcomes: dict[tuple[str, str], int] = {}
        self._batch = {"batches": 0.0, "rows": 0.0, "padded_tokens": 0.0, "seconds": 0.0}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._gauge("fmplex_host_initialized_unixtime", "when this host instance loaded its backbone").set(time.time())
        self._gauge("fmplex_host_pid", "process id of this host instance").set(os.getpid())

    def _family(self, name: str, kind: Any, doc: str) -> Any:
        fam = self._families.get(name)
        if fam is None:
            mf = pb_utils.MetricFamily
            fam = self._families[name] = mf(name=name, description=doc, kind=getattr(mf, kind))
        return fam

    def _metric(self, name: str, kind: Any, doc: str, task: str = "") -> Any:
        key = (name, task)
        m = self._metrics.get(key)
        if m is None:
            labels = {"host": self.host, **({"instance": self.instance} if self.instance else {}), **({"task": task} if task else {})}
            m = self._metrics[key] = self._family(name, kind, doc).Metric(labels=labels)
        return m

    def _gauge(self, name: str, doc: str, task: str = "") -> Any:
        return self._metric(name, GAUGE, doc, task)

    def flush_due(self) -> float | None:
        """When unpublished counts must go out (None: nothing new)."""
        return self._next_flush if self._dirty else None

    def received(self, task: str) -> None:
        with self._lock:
            self._received[task] = self._received.get(task, 0) + 1

    def outcome(self, task: str, outcome: str) -> None:
        """One final response (or a suppressed/failed send) of ``task``."""
        with self._lock:
            key = (task, outcome)
            self._outcomes[key] = self._outcomes.get(key, 0) + 1
        self._dirty = True

    def touch(self) -> None:
        """Something changed that the next flush should publish."""
        self._dirty = True

    def batch(self, report: Any) -> None:
        self._dirty = True
        with self._lock:
            self._batch["batches"] += 1
            self._batch["rows"] += report.rows
            self._batch["padded_tokens"] += report.padded_tokens
            self._batch["seconds"] += report.seconds

    def maybe_flush(self, scheduler: Any, lock: Any, cache: Any = None, force: bool = False) -> None:
        if not self._flush_lock.acquire(blocking=not force):  # another worker is publishing
            return
        if force:
            self._next_flush = 0.0
        try:
            self._flush(scheduler, lock, cache)
        finally:
            self._flush_lock.release()

    def _flush(self, scheduler: Any, lock: Any, cache: Any) -> None:
        now = time.monotonic()
        if now < self._next_flush:
            return
        self._next_flush = now + self.interval
        self._dirty = False
        with lock:
            stats = scheduler.stats()
        tasks = stats.get("tasks", stats)
        for task, st in tasks.items():
            if not isinstance(st, dict):
                continue
            self._gauge("fmplex_task_queue_depth", "requests queued in the host for this task", task).set(st.get("queued", 0))
            self._gauge("fmplex_task_weight", "scheduler weight of this task", task).set(st.get("weight", 0))
            for key, name in _TASK_COUNTERS.items():
                self._bump(name, task, float(st.get(key, 0)), f"per-task scheduler counter: {key}")
        if cache is not None:
            resident = cache.resident()
            for (task, _version), nbytes in resident.items():
                self._gauge("fmplex_task_extension_bytes", "resident bytes of this task's extension", task).set(nbytes)
            for (name, task), metric in self._metrics.items():
                if name == "fmplex_task_extension_bytes" and task not in {k[0] for k in resident}:
                    metric.set(0)
            st = cache.stats
            self._gauge("fmplex_extension_resident_bytes", "bytes of all resident task extensions").set(st.resident_bytes)
            self._gauge("fmplex_extension_budget_bytes", "memory budget for task extensions").set(cache.budget)
            self._bump("fmplex_extension_loads_total", "", float(st.loads), "extension loads (first loads and reloads)")
            self._bump("fmplex_extension_evictions_total", "", float(st.evictions), "extensions evicted to stay within budget")
            self._bump("fmplex_extension_reloads_total", "", float(st.reloads), "loads of previously evicted extensions")
            self._bump("fmplex_extension_reload_seconds_total", "", st.reload_seconds, "time spent reloading evicted extensions")
        with self._lock:
            batch = dict(self._batch)
            received = dict(self._received)
            outcomes = dict(self._outcomes)
        for task, n in received.items():
            self._bump("fmplex_task_received_total", task, float(n), "requests that reached the host, per task ('-': slot unresolved)")
        for (task, outcome), n in outcomes.items():
            self._bump_labelled("fmplex_task_responses_total", task, outcome, float(n))
        for key, value in batch.items():
            self._bump(f"fmplex_batch_{key}_total", "", value, f"host batches: {key}")

    def _bump_labelled(self, name: str, task: str, outcome: str, total: float) -> None:
        key = (name, f"{task}\0{outcome}")
        last = self._last.get(key, 0.0)
        if total > last:
            m = self._metrics.get(key)
            if m is None:
                fam = self._family(name, COUNTER, "final responses sent by the host, per task and outcome (exactly one per request)")
                m = self._metrics[key] = fam.Metric(labels={"host": self.host, "task": task, "outcome": outcome})
            m.increment(total - last)
            self._last[key] = total

    def _bump(self, name: str, task: str, total: float, doc: str) -> None:
        last = self._last.get((name, task), 0.0)
        if total > last:
            self._metric(name, COUNTER, doc, task).increment(total - last)
            self._last[(name, task)] = total
