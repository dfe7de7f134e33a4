"""The physical FM: one Triton model per backbone that every vFM of it shares.

Triton sees a plain non-decoupled Python-backend model (``fm.<backbone>``)
whose ``execute()`` only validates and enqueues, then returns ``None``; each
request is answered later through its response sender, with the FINAL flag.
That lets Triton hand us requests of many vFMs back to back, and our own
scheduler — not Triton's dynamic batcher — decides what runs together:

    execute():  slot -> task (registry)  ->  validate  ->  scheduler.submit
    worker:     scheduler.next_batch  ->  executor.run  ->  response senders

Every accepted request gets exactly one final response: its answer, or an
error if it was refused, expired, failed, or the host is shutting down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fmplex.backbones import backbone_for_host
from fmplex.kinds import FLOAT_PREFIX, TEXT_PREFIX, TOKEN_PREFIX, slot_of_output
from fmplex.registry import Registry, RegistryView, TaskEntry
from fmplex.artifacts import ArtifactError, version_dir

from .executor import Executor, WorkItem, pad_tokens, set_threads
from .extension_cache import ExtensionCache
from .extensions import Extension, load_extension
from .metrics import HostMetrics
from .scheduler import Pending, QueueFull, TaskPolicy, make_scheduler
from .validation import Limits, RequestError, Rows, decode_rows

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclasses.dataclass(eq=False)
class Job:
    """What the scheduler carries for one request (its opaque payload)."""

    request: Any
    sender: Any
    entry: TaskEntry
    slot: int
    rows: Rows
    wanted: frozenset[str]
    answered: bool = False


def worker_count(value: str, device: str) -> int:
    """Batches run at once. On a CPU each worker is one torch thread running
    its own batch (ops release the GIL), so "auto" = one per core this
    process may use, up to 4: a single worker left the second core of a
    2-core machine idle while isolated per-task models used both. On a GPU
    one worker keeps the device busy with larger batches."""
    if value != "auto":
        n = int(value)
        if n < 1:
            raise ValueError(f"workers must be >= 1 or 'auto', got {value}")
        return n
    if device != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _param(config: dict[str, Any], key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _error(message: str, code: Any = None) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code if code is not None else pb_utils.TritonError.INVALID_ARG))


class TritonPythonModel:
    # --- lifecycle -------------------------------------------------------------
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.spec = backbone_for_host(self.name)
        self.slots = int(_param(config, "slots", "256"))
        set_threads(int(os.environ.get("FMPLEX_TORCH_THREADS", _param(config, "torch_threads", "1"))))
        repo = Path(args["model_repository"]).resolve().parent
        self.view = RegistryView(Path(_param(config, "repository", str(repo))))
        self.device = _param(config, "device", "cpu")  # cpu, or cuda[:n] on a GPU machine
        self.executor = Executor(self.spec, self.device)
        self.limits = Limits(
            max_rows=int(_param(config, "max_rows_per_request", "256")),
            max_text_bytes=int(_param(config, "max_text_bytes", "16384")),
            max_tokens=self.spec.max_tokens,
            vocab_size=self.executor.vocab_size,
        )
        self.scheduler = make_scheduler(
            _param(config, "policy", "wfq"),
            max_rows=int(_param(config, "max_batch_rows", "16")),
            max_tokens=int(_param(config, "max_batch_tokens", "8192")),
            max_lag=float(_param(config, "max_lag", "4096")),
            max_queue_delay_s=float(_param(config, "max_queue_delay_us", "0")) / 1e6,
        )
        budget = int(float(_param(config, "extension_budget_mb", "1024")) * 2**20)
        self.extensions = ExtensionCache(self._load_extension, budget)
        self._live: tuple[set[tuple[str, int]], set[tuple[str, int]]] | None = None  # (deployed, pinned) for the worker
        self.metrics = HostMetrics(self.name, instance=str(args.get("model_instance_name", "")))
        self._seen_generation = -1
        self._cv = threading.Condition()
        self._running = True
        self.workers = worker_count(_param(config, "workers", "auto"), self.device)
        self._threads = [threading.Thread(target=self._loop, name=f"fmplex-worker-{i}", daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()
        pb_utils.Logger.log_info(
            f"fmplex host {self.name}: {self.slots} slots, backbone {self.spec.name}, {self.workers} worker(s) on {self.device}, pid {os.getpid()}"
        )

    def finalize(self) -> None:
        """Stop taking work, finish what is queued (bounded), fail the rest."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        deadline = time.monotonic() + 30
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._cv:
            left = self.scheduler.drain()
        for p in left:
            self._fail(p.payload, "host is shutting down", pb_utils.TritonError.UNAVAILABLE, "shutdown")
        try:  # publish the last counts: a scaled-down instance takes its series with it
            self.metrics.maybe_flush(self.scheduler, self._cv, self.extensions, force=True)
        except Exception:  # noqa: BLE001 - metrics are best effort
            traceback.print_exc()

    # --- request path ----------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        reg = self.view.current()
        if reg.generation != self._seen_generation:
            self._apply_policies(reg)
        now = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            task = "-"  # until the slot is resolved
            try:
                entry, slot, wanted = self._route(request, reg)
                task = entry.name
                self.metrics.received(task)
                rows = decode_rows(
                    _input(request, "TEXT"), _input(request, "INPUT_IDS"), _input(request, "ATTENTION_MASK"), self.limits
                )
                job = Job(request, sender, entry, slot, rows, wanted)
                timeout_us = request.timeout()
                tokens = min(job.rows.token_estimate(), self.spec.max_tokens)
                pending = Pending(
                    task=job.entry.name,
                    rows=job.rows.count,
                    tokens=tokens,
                    arrival=now,
                    deadline=now + timeout_us / 1e6 if timeout_us else None,
                    batch_key=tokens.bit_length(),  # length bucket: rows of similar length pad little
                    payload=job,
                )
                with self._cv:
                    self.scheduler.submit(pending, now)
                    self._cv.notify()
            except RequestError as exc:
                self._reply(sender, task, _error(str(exc)), "invalid")
            except QueueFull as exc:
                self._reply(sender, task, _error(str(exc), pb_utils.TritonError.UNAVAILABLE), "queue_full")
            except Exception as exc:  # noqa: BLE001 - never leave a request unanswered
                self._reply(sender, task, _error(f"internal error: {exc}", pb_utils.TritonError.INTERNAL), "internal")
        with self._cv:
            self._cv.notify()  # the worker also publishes counts of what was refused here
        return None

    def _route(self, request: Any, reg: Registry) -> tuple[TaskEntry, int, frozenset[str]]:
        wanted = frozenset(request.requested_output_names())
        slots = {slot_of_output(n) for n in wanted}
        if not wanted or None in slots or len(slots) != 1:
            raise RequestError(f"request slot outputs of one task (OUT_<slot>/TXT_<slot>), got {sorted(wanted)}")
        slot = slots.pop()
        assert slot is not None
        if not 0 <= slot < self.slots:
            raise RequestError(f"slot {slot} is outside this host's {self.slots} slots")
        entry = reg.slot_map(self.spec.name).get(slot)
        if entry is None:
            reg = self.view.current()  # at once on an unknown slot
            entry = reg.slot_map(self.spec.name).get(slot)
        if entry is None:
            raise RequestError(f"no task is deployed on slot {slot} of {self.name}")
        return entry, slot, wanted

    def _apply_policies(self, reg: Registry) -> None:
        mine = [t for t in reg.tasks.values() if t.backbone == self.spec.name and t.deployed]
        live = {(t.name, int(t.deployed_version or t.version)) for t in mine}
        pinned = {(t.name, int(t.deployed_version or t.version)) for t in mine if t.pinned}
        with self._cv:
            self._live = (live, pinned)
            for entry in reg.tasks.values():
                if entry.backbone == self.spec.name and entry.deployed:
                    self.scheduler.set_policy(
                        entry.name,
                        TaskPolicy(
                            weight=entry.weight,
                            queue_limit=entry.queue_limit,
                            deadline_s=entry.deadline_ms / 1000.0 if entry.deadline_ms else None,
                        ),
                    )
            self._seen_generation = reg.generation

    # --- worker ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    now = time.monotonic()
                    expired = self.scheduler.expire(now)
                    batch = self.scheduler.next_batch(now) if not expired else []
                    if expired or batch or not self._running:
                        break
                    wake = self.scheduler.next_wakeup(now)
                    flush = self.metrics.flush_due()  # idle hosts still publish their last batches
                    if flush is not None and (wake is None or flush < wake):
                        wake = flush
                    self._cv.wait(timeout=None if wake is None else max(0.0, wake - now))
                    if flush is not None and time.monotonic() >= flush:
                        break
                stopping = not self._running
            if expired:
                self.metrics.touch()
            for p in expired:
                self._fail(p.payload, f"deadline exceeded: queued {1e3 * (now - p.arrival):.1f} ms", pb_utils.TritonError.UNAVAILABLE, "expired")
            if batch:
                try:
                    self._run(batch)
                except Exception as exc:  # noqa: BLE001 - the worker must survive any batch
                    traceback.print_exc()
                    for p in batch:
                        if not p.payload.answered:
                            self._fail(p.payload, f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL, "internal")
            elif stopping and not expired:
                return
            try:
                self.metrics.maybe_flush(self.scheduler, self._cv, self.extensions)
            except Exception:  # noqa: BLE001 - metrics are best effort
                traceback.print_exc()

    def _run(self, batch: list[Pending]) -> None:
        with self._cv:
            live, self._live = self._live, None
        if live is not None:  # registry changed: forget undeployed tasks, honour pins
            self.extensions.retain(live[0] | {(p.payload.entry.name, int(p.payload.entry.deployed_version or 0)) for p in batch})
            self.extensions.pinned = set(live[1])
        items: list[WorkItem] = []
        jobs: list[Job] = []
        for p in batch:
            job: Job = p.payload
            if job.request.is_cancelled():
                self._fail(job, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
                continue
            ext, err = self._extension(job.entry)
            items.append(WorkItem(job.rows, ext, error=err))
            jobs.append(job)
        try:
            report = self.executor.run(items)
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole
            traceback.print_exc()
            for job in jobs:
                self._fail(job, f"batch failed: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL, "internal")
            return
        self.metrics.batch(report)
        for job, item in zip(jobs, items):
            if item.error is not None or item.result is None:
                code = pb_utils.TritonError.INVALID_ARG if item.client_fault else pb_utils.TritonError.INTERNAL
                self._fail(job, item.error or "no result", code, "invalid" if item.client_fault else "task_error")
                continue
            res = item.result
            produced = {
                FLOAT_PREFIX: None if res.out is None else np.ascontiguousarray(res.out),
                TEXT_PREFIX: None if res.txt is None else np.asarray(res.txt, dtype=np.object_),
                TOKEN_PREFIX: None if res.tok is None else pad_tokens(res.tok),
            }
            tensors, missing = [], []
            for prefix, value in produced.items():
                name = f"{prefix}{job.slot}"
                if name in job.wanted:
                    if value is None:
                        missing.append(name)
                    else:
                        tensors.append(pb_utils.Tensor(name, value))
            if missing:
                self._fail(job, f"task '{job.entry.name}' does not produce {', '.join(missing)}", pb_utils.TritonError.INVALID_ARG, "invalid")
                continue
            self._send(job, pb_utils.InferenceResponse(output_tensors=tensors), "ok")

    def _extension(self, entry: TaskEntry) -> tuple[Extension | None, str | None]:
        key = (entry.name, int(entry.deployed_version or entry.version))
        try:
            return self.extensions.get(key), None
        except Exception as exc:  # noqa: BLE001 - a task that cannot load fails only its own requests
            return None, f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}"

    def _load_extension(self, key: tuple[str, int]) -> Extension:
        return load_extension(version_dir(self.view.repo, *key), self.spec, config=self.executor.config, device=self.device)

    def _fail(self, job: Job, message: str, code: Any, outcome: str) -> None:
        self._send(job, _error(message, code), outcome)

    def _send(self, job: Job, response: Any, outcome: str) -> None:
        if job.answered:  # never a second final response (counted: must stay 0)
            self.metrics.outcome(job.entry.name, "duplicate_suppressed")
            return
        job.answered = True
        self._reply(job.sender, job.entry.name, response, outcome)

    def _reply(self, sender: Any, task: str, response: Any, outcome: str) -> None:
        """The one place a final response leaves the host: counted per outcome."""
        self.metrics.outcome(task, outcome)
        try:
            sender.send(response, flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - e.g. the client went away
            self.metrics.outcome(task, "send_failed")
            pb_utils.Logger.log_warn(f"fmplex: could not send a response for task '{task}': {exc}")


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
