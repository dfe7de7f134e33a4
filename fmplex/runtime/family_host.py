"""A host for a backbone family that supplies ``decode`` and ``run_batch`` (vision, time series).

The text host decodes tokens and runs its own executor; the newer families
come as one object each (``VisionFamily``, ``SeriesFamily``) that already
decodes a request's inputs (one-line ``RequestError``), loads a task from its
artifact and runs one shared pass over the rows of many tasks. What is left
for Triton is the same for both, and it lives here:

    accept():    decode (family) -> Pending(cost) -> WFQ scheduler
    take_work(): failed expired requests, or scheduler.next_batch
    run_work():  tasks (ExtensionCache) -> family.run_batch -> slot outputs -> ledger

A subclass names its family, its host outputs and how one request is decoded
(:meth:`FamilyHost.decode`) and answered (:meth:`FamilyHost.tensors`).
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from fmplex.artifacts import version_dir
from fmplex.registry import Registry, RegistryView, TaskEntry

from .extension_cache import ExtensionCache
from .host import TaskUnavailable
from .scheduled_host import ScheduledHost
from .ledger import Answer
from .routing import Job, Route, SlotRouter
from .scheduler import Pending, TaskPolicy
from .settings import SchedulerSettings, worker_count


@dataclasses.dataclass(frozen=True)
class FamilyHostSettings(SchedulerSettings):
    max_batch_rows: int = 16  # rows of one shared pass while a light task waits
    max_lag: float = 64.0  # in the family's cost units (rows, or rows x rounds)
    workers: str = "1"
    max_rows_per_request: int = 64
    extension_budget_mb: float = 1024.0


def slot_parser(prefixes: tuple[str, ...]) -> Any:
    """``slot_of`` for the router: ``OUT_17`` -> 17 for any of ``prefixes`` (each ends with ``_``)."""

    def slot_of(name: str) -> int | None:
        for prefix in prefixes:
            rest = name[len(prefix) :]
            if name.startswith(prefix) and rest.isascii() and rest.isdigit():
                return int(rest)
        return None

    return slot_of


class FamilyHost(ScheduledHost):
    Settings = FamilyHostSettings
    catalog: dict[str, Any] = {}  # fmplex.backbones.VISION / SERIES: the backbone is the one whose host model this is
    backbone: str = ""
    prefixes: tuple[str, ...] = ()  # host output prefixes, e.g. ("OUT_", "TXT_")

    # --- hooks ------------------------------------------------------------------------------
    def make_family(self, settings: Any) -> Any:
        raise NotImplementedError

    def decode(self, request: Any, task_of: Any) -> tuple[Any, Any, int, int]:
        """(decoded data, task or None, rows, scheduler cost); RequestError for a bad request.
        ``task_of()`` loads the request's task (for a decoder that needs it)."""
        raise NotImplementedError

    def tensors(self, job: Job, result: Any) -> dict[str, Any]:
        """Host output name (with the slot) -> array, for one answered request."""
        raise NotImplementedError

    # --- setup ------------------------------------------------------------------------------
    def setup(self, args: dict[str, Any]) -> int:
        st = self.settings
        os.environ.setdefault("OMP_NUM_THREADS", str(st.torch_threads))
        import torch  # noqa: PLC0415 - after the thread setting

        torch.set_num_threads(max(1, st.torch_threads))
        found = [n for n, spec in self.catalog.items() if spec.host_model == self.name]
        if not found:
            raise ValueError(f"no backbone of this family is served by host model '{self.name}' (known: {', '.join(self.catalog)})")
        self.backbone = found[0]
        self.family = self.make_family(st)
        self.family.executor  # noqa: B018 - load the backbone now, not on the first request
        self.view = RegistryView(Path(st.repository))
        pattern = "/".join(f"{p}<slot>" for p in self.prefixes)
        self.router = SlotRouter(self.view, self.backbone, self.name, st.slots, slot_parser(self.prefixes), pattern)
        self.workers = worker_count(st.workers, st.device)
        # The family's cost (rows, or rows x rounds) is the only budget: no token bound.
        self.scheduler = st.make_scheduler(self.workers, max_tokens=1 << 30, cost_fn=lambda p: float(p.tokens))
        self.cache = ExtensionCache(self._load_task, int(st.extension_budget_mb * 2**20))
        self._live: set[tuple[str, int]] | None = None
        return self.workers

    def describe(self) -> str:
        return f"{self.settings.slots} slots, backbone {self.backbone} on {self.settings.device}, pid {os.getpid()}"

    # --- request path -----------------------------------------------------------------------
    def apply_registry(self, reg: Registry) -> None:
        mine = [t for t in reg.tasks.values() if t.backbone == self.backbone and t.deployed]
        with self._cv:
            self._live = {(t.name, int(t.deployed_version or t.version)) for t in mine}
            self.cache.pinned = {(t.name, int(t.deployed_version or t.version)) for t in mine if t.pinned}
            for entry in mine:
                self.scheduler.set_policy(
                    entry.name,
                    TaskPolicy(weight=entry.weight, queue_limit=entry.queue_limit,
                               deadline_s=entry.deadline_ms / 1000.0 if entry.deadline_ms else None),
                )  # fmt: skip

    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        assert route is not None
        data, task, rows, cost = self.decode(request, lambda: self._task(route.entry))
        job = Job(request, answer, route.entry, route.slot, route.wanted, data, task)
        timeout_us = request.timeout()
        pending = Pending(
            task=route.entry.name, rows=rows, tokens=max(1, cost), arrival=now,
            deadline=now + timeout_us / 1e6 if timeout_us else None, payload=job,
        )  # fmt: skip
        self.submit(pending, now)

    # --- worker -----------------------------------------------------------------------------
    def run_batch(self, batch: list[Pending]) -> None:
        codes = pb_utils.TritonError
        with self._cv:
            live, self._live = self._live, None
        if live is not None:  # registry changed: forget undeployed tasks
            self.cache.retain(live | {_key(p.payload.entry) for p in batch})
        jobs: list[Job] = []
        for p in batch:
            job: Job = p.payload
            if job.request.is_cancelled():
                self.fail(job.answer, "request cancelled", codes.CANCELLED, "cancelled")
                continue
            if job.task is None:
                try:
                    job.task = self._task(job.entry)
                except Exception as exc:  # noqa: BLE001 - a task that cannot load fails only its own requests
                    self.fail(job.answer, str(exc), codes.INTERNAL, "task_error")
                    continue
            jobs.append(job)
        if not jobs:
            return
        try:
            results = self.family.run_batch([(job.task, job.data) for job in jobs])
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole
            traceback.print_exc()
            for job in jobs:
                self.fail(job.answer, f"batch failed: {type(exc).__name__}: {exc}", codes.INTERNAL, "internal")
            return
        report = getattr(self.family.executor, "last", None)
        if report is not None:
            self.metrics.batch(_Report(int(report.rows), float(report.seconds)))
        for job, result in zip(jobs, results):
            if result.error is not None or result.outputs is None:
                self.fail(job.answer, result.error or "no result", codes.INTERNAL, "task_error")
                continue
            produced = self.tensors(job, result.outputs)
            missing = sorted(n for n in job.wanted if n not in produced)
            if missing:
                self.fail(job.answer, f"task '{job.entry.name}' does not produce {', '.join(missing)}", codes.INVALID_ARG, "invalid")
                continue
            self.answer_ok(job.answer, [pb_utils.Tensor(n, produced[n]) for n in sorted(job.wanted)])

    # --- tasks ------------------------------------------------------------------------------
    def _task(self, entry: TaskEntry) -> Any:
        key = _key(entry)
        try:
            return self.cache.get(key)
        except Exception as exc:  # noqa: BLE001 - one line for the client
            raise TaskUnavailable(f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}") from None

    def _load_task(self, key: tuple[str, int]) -> Any:
        assert self.view is not None
        return self.family.load_task(version_dir(self.view.repo, *key))


@dataclasses.dataclass(frozen=True)
class _Report:
    rows: int
    seconds: float
    padded_tokens: int = 0


def _key(entry: TaskEntry) -> tuple[str, int]:
    return (entry.name, int(entry.deployed_version or entry.version))
