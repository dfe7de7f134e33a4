"""The one metrics class of every fmplex host, beside Triton's per-model statistics.

Triton already counts requests and latencies per vFM (each vFM is a model);
what only a host knows is its queue -- per-task depth, served requests, rows
and cost, refusals -- its response ledger (every final response per task and
outcome) and how its batches mix. Every series is labelled ``host`` (the
host model) and ``instance`` (each instance of a scaled host publishes its
own: sum them for the host), and ``task`` where it is per task. Each update
is an IPC message to the server, so the worker pushes accumulated totals at
most every ``interval`` seconds instead of per request.

The names (docs/runtime.md lists them) are the same on every host:
``fmplex_task_received_total``, ``fmplex_task_responses_total{outcome}``,
``fmplex_task_queue_depth``, ``fmplex_task_served_requests_total`` ...; a
family adds its own (``fmplex_gen_*``, ``fmplex_mm_*``) through :meth:`metric`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import triton_python_backend_utils as pb_utils

# MetricFamily exists only once the stub runs the model (not while Triton
# imports model.py to auto-complete its config), so look it up late.
COUNTER = "COUNTER"
GAUGE = "GAUGE"

TASK_COUNTERS = {
    "served_requests": "fmplex_task_served_requests_total",
    "served_rows": "fmplex_task_served_rows_total",
    "served_cost": "fmplex_task_served_cost_total",
    "rejected_full": "fmplex_task_rejected_queue_full_total",
    "expired": "fmplex_task_expired_total",
}
RESPONSES = "fmplex_task_responses_total"
RECEIVED = "fmplex_task_received_total"

Stats = Callable[[], dict[str, Any]]


class HostMetrics:
    def __init__(self, host: str, interval: float = 0.25, instance: str = "", ledger: Any = None) -> None:
        self.host = host
        self.instance = instance
        self.interval = interval
        self.ledger = ledger  # a ResponseLedger: its counts become fmplex_task_responses_total
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._next_flush = 0.0
        self._dirty = False
        self._received: dict[str, int] = {}
        self._batch = {"batches": 0.0, "rows": 0.0, "padded_tokens": 0.0, "seconds": 0.0}
        self._batch_sizes: dict[int, int] = {}
        self._queued = {"requests": 0.0, "seconds": 0.0}  # requests taken into batches, and their waits
        # the process's garbage collections and their pauses: written by gc's callback, which runs with every
        # other thread stopped and may interrupt a holder of ``_lock``, so plain attributes and no lock
        self.gc_collections = 0.0
        self.gc_seconds = 0.0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # last value set
        self.metric("fmplex_host_initialized_unixtime", "when this host instance loaded its backbone", GAUGE).set(time.time())
        self.metric("fmplex_host_pid", "process id of this host instance", GAUGE).set(os.getpid())

    # --- direct series -----------------------------------------------------------
    def metric(self, name: str, doc: str, kind: str = COUNTER, **labels: str) -> Any:
        """The series ``name{host, instance, **labels}`` (created on first use)."""
        key = (name, tuple(sorted(labels.items())))
        m = self._metrics.get(key)
        if m is None:
            fam = self._families.get(name)
            if fam is None:
                mf = pb_utils.MetricFamily
                fam = self._families[name] = mf(name=name, description=doc, kind=getattr(mf, kind))
            base = {"host": self.host, **({"instance": self.instance} if self.instance else {})}
            m = self._metrics[key] = fam.Metric(labels={**base, **labels})
        return m

    def bump(self, name: str, total: float, doc: str, **labels: str) -> None:
        """Raise the counter ``name`` to ``total`` (a running total kept by the caller)."""
        key = (name, tuple(sorted(labels.items())))
        last = self._last.get(key, 0.0)
        if total > last:
            self.metric(name, doc, COUNTER, **labels).increment(total - last)
            self._last[key] = total

    def gauge(self, name: str, value: float, doc: str, **labels: str) -> None:
        """Set the gauge ``name`` to ``value`` if it changed: each set is a
        message to the server, and a flush would otherwise resend every task's
        unchanged gauges a few times a second."""
        key = (name, tuple(sorted(labels.items())))
        if self._gauges.get(key) != value:
            self.metric(name, doc, GAUGE, **labels).set(value)
            self._gauges[key] = value

    # --- accumulated between flushes ---------------------------------------------
    def flush_due(self) -> float | None:
        """When unpublished counts must go out (None: nothing new)."""
        return self._next_flush if self._dirty else None

    def received(self, task: str) -> None:
        with self._lock:
            self._received[task] = self._received.get(task, 0) + 1
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
            self._batch_sizes[report.rows] = self._batch_sizes.get(report.rows, 0) + 1

    def gc_pause(self, seconds: float) -> None:
        """A garbage collection stopped the process for ``seconds`` (called from ``gc.callbacks``)."""
        self.gc_collections += 1
        self.gc_seconds += seconds
        self._dirty = True

    def queued(self, requests: int, seconds: float) -> None:
        """``requests`` left the host's queue for a batch, after ``seconds`` of waiting together."""
        with self._lock:
            self._queued["requests"] += requests
            self._queued["seconds"] += seconds

    def maybe_flush(self, stats: Stats | None = None, cache: Any = None, force: bool = False) -> bool:
        """Publish if due (or ``force``): ``stats()`` gives per-task queue counters. Whether it
        published: a host publishes its own metrics at the same moments (``Host.publish``)."""
        if not self._flush_lock.acquire(blocking=force):  # another worker is publishing
            return False
        if force:
            self._next_flush = 0.0
        try:
            return self._flush(stats, cache)
        finally:
            self._flush_lock.release()

    def _flush(self, stats: Stats | None, cache: Any) -> bool:
        now = time.monotonic()
        if now < self._next_flush:
            return False
        self._next_flush = now + self.interval
        self._dirty = False
        snapshot = stats() if stats is not None else {}
        for task, st in snapshot.get("tasks", {}).items():
            self.gauge("fmplex_task_queue_depth", st.get("queued", 0), "requests queued in the host for this task", task=task)
            if "weight" in st:
                self.gauge("fmplex_task_weight", st["weight"], "scheduler weight of this task", task=task)
            for key, name in TASK_COUNTERS.items():
                if key in st:
                    self.bump(name, float(st[key]), f"per-task scheduler counter: {key}", task=task)
        if cache is not None:
            self._flush_cache(cache)
        with self._lock:
            batch = dict(self._batch)
            sizes = dict(self._batch_sizes)
            received = dict(self._received)
            queued = dict(self._queued)
        outcomes = self.ledger.counts() if self.ledger is not None else {}
        for task, n in received.items():
            self.bump(RECEIVED, float(n), "requests that reached the host, per task ('-': slot unresolved)", task=task)
        for (task, outcome), n in outcomes.items():
            self.bump(RESPONSES, float(n), "final responses sent by the host, per task and outcome (exactly one per request)", task=task, outcome=outcome)
        if queued["requests"]:
            self.bump("fmplex_host_queued_requests_total", queued["requests"], "requests taken from the host's queue into a batch")
            self.bump("fmplex_host_queue_seconds_total", queued["seconds"], "time those requests waited in the host's queue (accepted to their batch's start)")
        if self.gc_collections:
            self.bump("fmplex_host_gc_collections_total", self.gc_collections, "garbage collections of the host's process")
            self.bump("fmplex_host_gc_seconds_total", self.gc_seconds, "time they stopped every thread of it")
        if self.ledger is not None and self.ledger.sends:
            self.bump("fmplex_host_response_sends_total", float(self.ledger.sends), "responses the sender thread sent")
            self.bump("fmplex_host_response_send_seconds_total", self.ledger.send_seconds, "time from deciding each of them to its send's return")
        if batch["batches"]:
            for key, value in batch.items():
                self.bump(f"fmplex_batch_{key}_total", value, f"host batches: {key}")
            for rows, n in sizes.items():
                self.bump("fmplex_batch_size_total", float(n), "batches by rows per batch", rows=str(rows))
        return True

    def _flush_cache(self, cache: Any) -> None:
        resident = cache.resident()
        doc = "resident bytes of this task's extension"
        for (task, _version), nbytes in resident.items():
            self.gauge("fmplex_task_extension_bytes", nbytes, doc, task=task)
        tasks = {k[0] for k in resident}
        for name, labels in list(self._metrics):
            if name == "fmplex_task_extension_bytes" and dict(labels).get("task") not in tasks:
                self.gauge(name, 0, doc, **dict(labels))
        st = cache.stats
        self.gauge("fmplex_extension_resident_bytes", st.resident_bytes, "bytes of all resident task extensions")
        self.gauge("fmplex_extension_budget_bytes", cache.budget, "memory budget for task extensions")
        self.bump("fmplex_extension_loads_total", float(st.loads), "extension loads (first loads and reloads)")
        self.bump("fmplex_extension_evictions_total", float(st.evictions), "extensions evicted to stay within budget")
        self.bump("fmplex_extension_reloads_total", float(st.reloads), "loads of previously evicted extensions")
        self.bump("fmplex_extension_reload_seconds_total", st.reload_seconds, "time spent reloading evicted extensions")
