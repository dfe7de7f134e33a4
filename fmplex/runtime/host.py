"""The Triton side that every fmplex host shares: one request path, one worker loop.

A host is a plain non-decoupled (or, to stream tokens, decoupled) Python-based
backend model whose ``execute()`` only routes, validates and enqueues, then
returns ``None``; every request is answered later through its response
sender, with the FINAL flag. That lets Triton hand over requests of many vFMs
back to back while the host's own queue decides what runs together:

    execute():  slot -> task (SlotRouter)  ->  host.accept(): decode, enqueue
    workers:    host.take_work()  ->  host.run_work()  ->  ResponseLedger
    sender:     the ledger's thread sends each decided response

:class:`Host` holds everything that is the same on every backbone: settings,
routing, the response ledger and its sender thread, the metrics, the worker
loop, and the drain at finalize. A subclass supplies only what differs: how
it loads (``setup``), decodes a request (``accept``), takes and runs its work
(``take_work``/``run_work``) and what it still owes at shutdown (``drain``).

Every accepted request gets exactly one final response: its answer, or an
error if it was refused, expired, failed, or the host is shutting down.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, ClassVar

import triton_python_backend_utils as pb_utils

from fmplex.registry import Registry, RegistryView

from .ledger import Answer, ResponseLedger
from .metrics import HostMetrics
from .routing import Route, SlotRouter
from .scheduler import QueueFull
from .settings import HostSettings, read_settings
from .validation import RequestError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DRAIN_TIMEOUT_S = 30.0  # finalize: the longest it waits for workers and the sender thread


class ShuttingDown(RuntimeError):
    """The host is stopping: no new work (UNAVAILABLE, outcome ``shutdown``)."""


class TaskUnavailable(RuntimeError):
    """A task's artifact cannot be loaded: its requests fail, others are served."""


def error_response(message: str, code: Any = None) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def input_array(request: Any, name: str) -> Any:
    """A request input as numpy, or None if the client did not send it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class Host:
    """Base class of every fmplex host model (``TritonPythonModel`` subclasses it)."""

    Settings: ClassVar[type[HostSettings]] = HostSettings
    finish_queue_on_stop: ClassVar[bool] = True  # finalize: serve what is queued (else drain() fails it)
    kind: ClassVar[str] = "host"  # for log lines

    settings: Any
    router: SlotRouter | None = None  # None: a host without tasks (a baseline)
    view: RegistryView | None = None
    cache: Any = None  # an ExtensionCache whose residency is published, if any

    # --- lifecycle -------------------------------------------------------------
    def initialize(self, args: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.config = json.loads(args["model_config"])
        self.name = str(self.config["name"])
        self.model_dir = Path(args["model_repository"])
        self.settings = read_settings(self.config, self.Settings, repository=str(self.model_dir.resolve().parent))
        self.ledger = ResponseLedger(FINAL, on_send_error=self._log_send_error)
        self.metrics = HostMetrics(self.name, instance=str(args.get("model_instance_name", "")), ledger=self.ledger)
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)
        self._cv = threading.Condition()
        self._running = True
        self._seen_generation = -1
        workers = self.setup(args)
        self._threads = [threading.Thread(target=self._loop, name=f"fmplex-worker-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()
        self.load_seconds = time.perf_counter() - t0
        pb_utils.Logger.log_info(f"fmplex {self.kind} {self.name}: {self.describe()}, {workers} worker(s), loaded in {self.load_seconds:.2f} s")

    def finalize(self) -> None:
        """Stop taking work, finish what is queued (bounded), fail the rest, send it all."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for answer in self.drain():
            self.fail(answer, f"{self.kind} is shutting down", pb_utils.TritonError.UNAVAILABLE, "shutdown")
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if not self.ledger.close(timeout=max(1.0, deadline - time.monotonic())):
            pb_utils.Logger.log_warn(f"fmplex {self.name}: responses still unsent at shutdown")
        try:  # publish the last counts: a scaled-down instance takes its series with it
            if self.metrics.maybe_flush(self.stats, self.cache, force=True):
                self.publish()
        except Exception:  # noqa: BLE001 - metrics are best effort
            traceback.print_exc()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        """Time each garbage collection: it holds the interpreter lock, so every thread of the host that runs Python waits."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.metrics.gc_pause(time.perf_counter() - self._gc_started)

    # --- hooks for a host ------------------------------------------------------
    def setup(self, args: dict[str, Any]) -> int:
        """Load the model, build router and queues; return the number of worker threads."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"pid {os.getpid()}"

    def apply_registry(self, reg: Registry) -> None:
        """The registry changed (weights, queue limits, deployed tasks)."""

    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        """Decode one request and enqueue it (raise RequestError, QueueFull, ... to refuse)."""
        raise NotImplementedError

    def take_work(self, now: float) -> Any:
        """Under the condition lock: the next unit of work, or None to wait."""
        raise NotImplementedError

    def next_wakeup(self, now: float) -> float | None:
        """Under the condition lock: when ``take_work`` may have something by itself."""
        return None

    def run_work(self, work: Any) -> None:
        """Outside the lock: run one unit of work and answer through the ledger."""
        raise NotImplementedError

    def work_failed(self, work: Any, exc: Exception) -> None:
        """``run_work`` raised: fail what it left unanswered."""

    def work_done(self, work: Any) -> None:
        """Under the condition lock: ``run_work`` returned (or failed); its rows are no longer in flight."""

    def drain(self) -> list[Answer]:
        """At finalize, after the workers stopped: every answer still owed."""
        return []

    def stats(self) -> dict[str, Any]:
        """Per-task queue counters for the metrics (``{"tasks": {name: {...}}}``)."""
        return {}

    def publish(self) -> None:
        """Family-specific metrics, published with the shared ones (each time they flush, at most once
        per metrics interval; the flush comes after every change, also once the host is idle)."""

    # --- answers ---------------------------------------------------------------
    def answer_ok(self, answer: Answer, tensors: list[Any]) -> None:
        self.ledger.final(answer, pb_utils.InferenceResponse(output_tensors=tensors), "ok")

    def fail(self, answer: Answer, message: str, code: Any, outcome: str) -> None:
        self.ledger.final(answer, error_response(message, code), outcome)

    def _log_send_error(self, task: str, exc: Exception) -> None:
        """On the response thread: log, and wake an idle worker so the new
        ``send_failed`` count is published (nothing else may wake it)."""
        pb_utils.Logger.log_warn(f"fmplex: could not send a response for task '{task}': {exc}")
        self.metrics.touch()
        with self._cv:
            self._cv.notify()

    # --- request path ----------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        reg = self.view.current() if self.view is not None else None
        if reg is not None and reg.generation != self._seen_generation:
            self.apply_registry(reg)
            self._seen_generation = reg.generation
        now = time.monotonic()
        codes = pb_utils.TritonError
        for request in requests:
            answer = Answer(request.get_response_sender())
            try:
                route = None
                if self.router is not None and reg is not None:
                    route = self.router.route(request.requested_output_names(), reg)
                    answer.task = route.entry.name
                self.metrics.received(answer.task)
                self.accept(request, answer, route, now)
            except RequestError as exc:
                self.fail(answer, str(exc), codes.INVALID_ARG, "invalid")
            except QueueFull as exc:
                self.fail(answer, str(exc), codes.UNAVAILABLE, "queue_full")
            except ShuttingDown as exc:
                self.fail(answer, str(exc), codes.UNAVAILABLE, "shutdown")
            except TaskUnavailable as exc:
                self.fail(answer, str(exc), codes.INTERNAL, "task_error")
            except Exception as exc:  # noqa: BLE001 - never leave a request unanswered
                traceback.print_exc()
                self.fail(answer, f"internal error: {exc}", codes.INTERNAL, "internal")
        with self._cv:
            self._cv.notify()  # a worker takes the work (and publishes counts of what was refused here)
        return None

    # --- worker ----------------------------------------------------------------
    def _loop(self) -> None:
        done = None  # the work this worker ran last, reported back under the lock
        while True:
            work = None
            with self._cv:
                if done is not None:
                    self.work_done(done)
                    done = None
                while True:
                    now = time.monotonic()
                    if not self._running and not self.finish_queue_on_stop:
                        return
                    work = self.take_work(now)
                    if work is not None or not self._running:
                        break
                    wake = self.next_wakeup(now)
                    flush = self.metrics.flush_due()  # idle hosts still publish their last counts
                    if flush is not None and (wake is None or flush < wake):
                        wake = flush
                    self._cv.wait(timeout=None if wake is None else max(0.0, wake - now))
                    if flush is not None and time.monotonic() >= flush:
                        break
                stopping = not self._running
            if work is not None:
                try:
                    self.run_work(work)
                except Exception as exc:  # noqa: BLE001 - the worker must survive any batch
                    traceback.print_exc()
                    self.work_failed(work, exc)
                done = work
            elif stopping:
                return
            self._publish_metrics()

    def _publish_metrics(self) -> None:
        try:
            if self.metrics.maybe_flush(self.stats, self.cache):
                self.publish()  # at the same moments: an idle host's last flush carries the family's last counts too
        except Exception:  # noqa: BLE001 - metrics are best effort
            traceback.print_exc()
