"""The MiniLM-family host: one Triton model per encoder backbone that every vFM of it shares.

Everything a host has in common (routing, the response ledger and its sender
thread, the worker loop, the drain, metrics) is :class:`fmplex.runtime.host.Host`.
This class only decodes a request's rows and runs a batch:

    accept():    rows (TEXT or INPUT_IDS) -> Pending -> scheduler.submit
    take_work(): failed expired requests, or scheduler.next_batch (WFQ)
    run_work():  extensions (cache) -> executor.run -> slot outputs -> ledger
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fmplex.artifacts import version_dir
from fmplex.backbones import backbone_for_host
from fmplex.kinds import FLOAT_PREFIX, TEXT_PREFIX, TOKEN_PREFIX, slot_of_output
from fmplex.registry import Registry, RegistryView, TaskEntry
from fmplex.runtime.extension_cache import ExtensionCache
from fmplex.runtime.host import input_array
from fmplex.runtime.scheduled_host import ScheduledHost
from fmplex.runtime.ledger import Answer
from fmplex.runtime.routing import Job, Route, SlotRouter
from fmplex.runtime.scheduler import Pending, TaskPolicy
from fmplex.runtime.settings import SchedulerSettings, worker_count
from fmplex.runtime.validation import Limits, decode_rows

from .executor import Executor, WorkItem, pad_tokens, set_threads
from .extensions import Extension, load_extension


@dataclasses.dataclass(frozen=True)
class EncoderSettings(SchedulerSettings):
    saturated_batch_rows: int = 64  # growth is on for text (see SchedulerSettings)
    max_batch_tokens: int = 8192  # padded tokens of a max_batch_rows batch
    max_rows_per_request: int = 256
    max_text_bytes: int = 16384
    extension_budget_mb: float = 1024.0


class TritonPythonModel(ScheduledHost):
    Settings = EncoderSettings
    kind = "host"

    def setup(self, args: dict[str, Any]) -> int:
        st: EncoderSettings = self.settings
        self.spec = backbone_for_host(self.name)
        set_threads(st.torch_threads)
        self.view = RegistryView(Path(st.repository))
        self.router = SlotRouter(self.view, self.spec.name, self.name, st.slots, slot_of_output, "OUT_<slot>/TXT_<slot>")
        self.executor = Executor(self.spec, st.device)
        self.limits = Limits(
            max_rows=st.max_rows_per_request,
            max_text_bytes=st.max_text_bytes,
            max_tokens=self.spec.max_tokens,
            vocab_size=self.executor.vocab_size,
        )
        self.workers = worker_count(st.workers, st.device)
        self.scheduler = st.make_scheduler(self.workers, max_tokens=st.max_batch_tokens)
        self.cache = ExtensionCache(self._load_extension, int(st.extension_budget_mb * 2**20))
        self._live: tuple[set[tuple[str, int]], set[tuple[str, int]]] | None = None  # (deployed, pinned) for a worker
        return self.workers

    def describe(self) -> str:
        return f"{self.settings.slots} slots, backbone {self.spec.name} on {self.settings.device}, pid {os.getpid()}"

    # --- request path ----------------------------------------------------------
    def apply_registry(self, reg: Registry) -> None:
        mine = [t for t in reg.tasks.values() if t.backbone == self.spec.name and t.deployed]
        live = {(t.name, int(t.deployed_version or t.version)) for t in mine}
        pinned = {(t.name, int(t.deployed_version or t.version)) for t in mine if t.pinned}
        with self._cv:
            self._live = (live, pinned)
            for entry in mine:
                self.scheduler.set_policy(
                    entry.name,
                    TaskPolicy(
                        weight=entry.weight,
                        queue_limit=entry.queue_limit,
                        deadline_s=entry.deadline_ms / 1000.0 if entry.deadline_ms else None,
                    ),
                )

    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        assert route is not None
        rows = decode_rows(input_array(request, "TEXT"), input_array(request, "INPUT_IDS"), input_array(request, "ATTENTION_MASK"), self.limits)
        job = Job(request, answer, route.entry, route.slot, route.wanted, rows)
        timeout_us = request.timeout()
        tokens = min(rows.token_estimate(), self.spec.max_tokens)
        pending = Pending(
            task=route.entry.name,
            rows=rows.count,
            tokens=tokens,
            arrival=now,
            deadline=now + timeout_us / 1e6 if timeout_us else None,
            batch_key=tokens.bit_length(),  # length bucket: rows of similar length pad little
            payload=job,
        )
        self.submit(pending, now)

    # --- worker ----------------------------------------------------------------
    def run_batch(self, batch: list[Pending]) -> None:
        codes = pb_utils.TritonError
        with self._cv:
            live, self._live = self._live, None
        if live is not None:  # registry changed: forget undeployed tasks, honour pins
            self.cache.retain(live[0] | {(p.payload.entry.name, int(p.payload.entry.deployed_version or 0)) for p in batch})
            self.cache.pinned = set(live[1])
        items: list[WorkItem] = []
        jobs: list[Job] = []
        for p in batch:
            job: Job = p.payload
            if job.request.is_cancelled():
                self.fail(job.answer, "request cancelled", codes.CANCELLED, "cancelled")
                continue
            ext, err = self._extension(job.entry)
            items.append(WorkItem(job.data, ext, error=err))
            jobs.append(job)
        try:
            report = self.executor.run(items)
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole
            traceback.print_exc()
            for job in jobs:
                self.fail(job.answer, f"batch failed: {type(exc).__name__}: {exc}", codes.INTERNAL, "internal")
            return
        self.metrics.batch(report)
        for job, item in zip(jobs, items):
            if item.error is not None or item.result is None:
                code = codes.INVALID_ARG if item.client_fault else codes.INTERNAL
                self.fail(job.answer, item.error or "no result", code, "invalid" if item.client_fault else "task_error")
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
                self.fail(job.answer, f"task '{job.entry.name}' does not produce {', '.join(missing)}", codes.INVALID_ARG, "invalid")
                continue
            self.answer_ok(job.answer, tensors)

    def _extension(self, entry: TaskEntry) -> tuple[Extension | None, str | None]:
        key = (entry.name, int(entry.deployed_version or entry.version))
        try:
            return self.cache.get(key), None
        except Exception as exc:  # noqa: BLE001 - a task that cannot load fails only its own requests
            return None, f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}"

    def _load_extension(self, key: tuple[str, int]) -> Extension:
        return load_extension(version_dir(self.view.repo, *key), self.spec, config=self.executor.config, device=self.settings.device)
