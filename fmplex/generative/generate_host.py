"""The generative host: one Triton model per (backbone, streaming mode) that every LM vFM shares.

Two variants of the same code, told apart by the model config:

* ``fm.smollm2`` (non-decoupled): ``execute()`` validates and enqueues, then
  returns ``None``; the worker answers each request once, FINAL, with the
  whole text — so plain HTTP/gRPC ``infer`` (and HTTP ``generate``) work.
* ``fm.smollm2.stream`` (decoupled): the worker sends one response per new
  piece of text as the tokens come, the last one with the FINAL flag — for
  gRPC ``stream_infer`` and HTTP ``generate_stream``.

    execute():  slot -> task (registry) -> validate -> Sequence -> engine.submit (WFQ queues)
    worker:     engine.step(): admit (scheduler order, free rows) + one batched forward
                -> per-sequence updates -> response senders

Every accepted request gets exactly one final response: its answer, or an
error if it was refused, expired, cancelled, failed, or the host is shutting
down.

Shutdown. Triton tells a model nothing until it unloads it, and at server
shutdown it unloads only after in-flight requests finish or its exit timeout
(10 s under ``fmplex serve``) expires — then it exits without calling
``finalize``, and a 400-token answer (tens of seconds on a CPU) would simply
be cut off (measured: clients saw 'Stream removed' / no final response). But
``fmplex serve`` stops the server with SIGINT to its process group, which
includes this stub: the host catches it (``signal.set_wakeup_fd``: the C-level
handler writes to a socket a watcher thread reads, whatever the stub's main
thread is doing), fails what is still queued at once, lets running sequences
finish for ``shutdown_grace_s`` (default 5 s), then fails the rest — every
client gets its final response before Triton's exit timeout. The code lives in the backend directory
(``<backends>/fmplex_gen/model.py`` imports this module), never in a model
directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fmplex.artifacts import read_manifest, version_dir
from fmplex.kinds import slot_of_output
from fmplex.registry import Registry, RegistryView, TaskEntry
from fmplex.triton_backend.extension_cache import ExtensionCache
from fmplex.triton_backend.metrics import COUNTER, GAUGE, HostMetrics
from fmplex.triton_backend.scheduler import QueueFull, TaskPolicy
from fmplex.triton_backend.validation import RequestError, decode_utf8

from .control import TEXT_PREFIX, backbone_of_host, check_artifact
from .engine import Engine, SamplingParams, Sequence, Update
from .smollm import load_smollm2, set_threads

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclasses.dataclass(eq=False)
class Job:
    request: Any
    sender: Any
    task: str
    output: str  # TXT_<slot>
    answered: bool = False


def _param(config: dict[str, Any], key: str, default: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def _error(message: str, code: Any = None) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code if code is not None else pb_utils.TritonError.INVALID_ARG))


class GenMetrics(HostMetrics):
    """The MiniLM host's metrics (per-task requests/outcomes, batches = decode steps)
    plus what only a decode engine knows: tokens, rows per step, running rows."""

    def engine(self, engine: Engine) -> None:
        st = engine.stats
        for key, doc in (
            ("steps", "decode steps (one batched forward each)"),
            ("rows", "sequences summed over decode steps"),
            ("multi_row_steps", "decode steps that carried more than one sequence"),
            ("tokens_generated", "tokens generated"),
            ("prefill_tokens", "prompt tokens prefilled"),
            ("admitted", "sequences admitted into the running batch"),
        ):
            self._bump(f"fmplex_gen_{key}_total", "", float(getattr(st, key)), doc)
        self._gauge("fmplex_gen_max_rows", "most sequences one decode step carried").set(st.max_rows)
        self._gauge("fmplex_gen_running", "sequences in the running batch").set(len(engine.running))


class TritonPythonModel:
    # --- lifecycle -------------------------------------------------------------
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.spec, _ = backbone_of_host(self.name)
        self.decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(config))
        self.slots = int(_param(config, "slots", "256"))
        set_threads(int(os.environ.get("FMPLEX_TORCH_THREADS", _param(config, "torch_threads", "1"))))
        repo = Path(args["model_repository"]).resolve().parent
        self.view = RegistryView(Path(_param(config, "repository", str(repo))))
        t0 = time.perf_counter()
        self.lm = load_smollm2()
        self.engine = Engine(
            self.lm,
            max_rows=int(_param(config, "max_rows", "8")),
            prefill_tokens=int(_param(config, "prefill_tokens", "1024")),
            max_context=int(_param(config, "max_context", "2048")),
            policy=_param(config, "policy", "wfq"),
        )
        self.engine.log_error = lambda msg: pb_utils.Logger.log_error(f"fmplex {self.name}: {msg}")
        self.shutdown_grace_s = float(_param(config, "shutdown_grace_s", "5"))
        self._draining_since: float | None = None
        self.default_max_tokens = int(_param(config, "default_max_tokens", "16"))
        self.max_tokens_limit = int(_param(config, "max_tokens_limit", "512"))
        self.max_text_bytes = int(_param(config, "max_text_bytes", "16384"))
        budget = int(float(_param(config, "adapter_budget_mb", "1024")) * 2**20)
        self.adapters = ExtensionCache(self._load_adapter, budget)
        self.metrics = GenMetrics(self.name, instance=str(args.get("model_instance_name", "")))
        self._seen_generation = -1
        self._cv = threading.Condition()
        self._running = True
        self._next_engine_flush = 0.0
        self._worker = threading.Thread(target=self._loop, name="fmplex-gen-worker", daemon=True)
        self._worker.start()
        self._watch_shutdown_signals()
        pb_utils.Logger.log_info(
            f"fmplex host {self.name}: {'decoupled (streaming)' if self.decoupled else 'whole answers'}, {self.slots} slots, "
            f"backbone {self.spec.name} loaded in {time.perf_counter() - t0:.1f} s, {self.engine.max_rows} rows per step, pid {os.getpid()}"
        )

    def _watch_shutdown_signals(self) -> None:
        """SIGINT/SIGTERM to this stub = the server is stopping (see the module docstring)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        try:
            r, w = socket.socketpair()
            w.setblocking(False)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_a: None)  # the stub must not die: Triton stops it itself
            signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except (OSError, ValueError) as exc:
            pb_utils.Logger.log_warn(f"fmplex {self.name}: no shutdown signal watch ({exc})")
            return
        self._signal_socks = (r, w)

        def watch() -> None:
            try:
                r.recv(64)
            except OSError:
                return
            with self._cv:
                if self._draining_since is None:
                    self._draining_since = time.monotonic()
                    self._cv.notify_all()

        threading.Thread(target=watch, name="fmplex-gen-signals", daemon=True).start()

    def finalize(self) -> None:
        """Stop the worker after its current step; fail what is still queued or running."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        self._worker.join(timeout=30)
        self.engine.abort_all("host is shutting down")

    # --- request path ----------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        reg = self.view.current()
        if reg.generation != self._seen_generation:
            self._apply_policies(reg)
        now = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            task = "-"
            try:
                entry, output = self._route(request, reg)
                task = entry.name
                self.metrics.received(task)
                if self._draining_since is not None:
                    raise _ShuttingDown("host is shutting down")
                job = Job(request, sender, task, output)
                prompt = self._prompt(request)
                params = self._sampling(request)
                adapter = self._adapter(entry)
                ids = self.engine.tokenize(prompt)
                timeout_us = request.timeout()
                probe = sender.is_cancelled if self.decoupled else request.is_cancelled
                seq = Sequence(
                    task,
                    ids,
                    params,
                    adapter=adapter,
                    sink=self._on_update,
                    cancelled=probe,
                    deadline=now + timeout_us / 1e6 if timeout_us else None,
                    tag=job,
                )
                self.engine.submit(seq, now)
            except (RequestError, ValueError) as exc:
                self._reply(sender, task, _error(str(exc)), "invalid")
                continue
            except QueueFull as exc:
                self._reply(sender, task, _error(str(exc), pb_utils.TritonError.UNAVAILABLE), "queue_full")
                continue
            except _ShuttingDown as exc:
                self._reply(sender, task, _error(str(exc), pb_utils.TritonError.UNAVAILABLE), "shutdown")
                continue
            except _TaskUnavailable as exc:
                self._reply(sender, task, _error(str(exc), pb_utils.TritonError.INTERNAL), "task_error")
                continue
            except Exception as exc:  # noqa: BLE001 - never leave a request unanswered
                self._reply(sender, task, _error(f"internal error: {exc}", pb_utils.TritonError.INTERNAL), "internal")
                continue
            with self._cv:
                self._cv.notify()
        return None

    def _route(self, request: Any, reg: Registry) -> tuple[TaskEntry, str]:
        wanted = list(request.requested_output_names())
        slots = {slot_of_output(n) for n in wanted}
        if len(wanted) != 1 or None in slots or not wanted[0].startswith(TEXT_PREFIX):
            raise RequestError(
                f"request exactly one slot output TXT_<slot> (call a task's vFM, e.g. 'NAME' or 'NAME.stream'), got {len(wanted)} outputs"
            )
        slot = slots.pop()
        assert slot is not None
        if not 0 <= slot < self.slots:
            raise RequestError(f"slot {slot} is outside this host's {self.slots} slots")
        entry = reg.slot_map(self.spec.name).get(slot)
        if entry is None:
            reg = self.view.current()
            entry = reg.slot_map(self.spec.name).get(slot)
        if entry is None:
            raise RequestError(f"no task is deployed on slot {slot} of {self.name}")
        return entry, wanted[0]

    def _prompt(self, request: Any) -> str:
        arr = _input(request, "TEXT")
        if arr is None:
            raise RequestError("missing input TEXT (BYTES, shape [1]: one prompt)")
        flat = arr.reshape(-1)
        if flat.shape[0] != 1:
            raise RequestError(f"TEXT must hold exactly one prompt (shape [1]), got shape {list(arr.shape)}")
        text = decode_utf8(flat[0], self.max_text_bytes)
        if not text:
            raise RequestError("TEXT is empty")
        return text

    def _sampling(self, request: Any) -> SamplingParams:
        """Inputs MAX_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED, STOP, or the same as request
        parameters in lower case (an input wins over a parameter)."""
        try:
            params = json.loads(request.parameters() or "{}")
        except (TypeError, ValueError):
            params = {}
        values: dict[str, Any] = {}
        for key, kind in (("max_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float), ("seed", int)):
            arr = _input(request, key.upper())
            if arr is not None:
                flat = arr.reshape(-1)
                if flat.shape[0] != 1:
                    raise RequestError(f"{key.upper()} must hold one value, got shape {list(arr.shape)}")
                values[key] = flat[0].item()
            elif key in params:
                values[key] = params[key]
            else:
                continue
            value = values[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise RequestError(f"{key} must be an integer, got {value!r}")
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RequestError(f"{key} must be a finite number, got {value!r}")
                values[key] = float(value)
        stop_arr = _input(request, "STOP")
        if stop_arr is not None:
            stop = []
            for item in stop_arr.reshape(-1):
                try:
                    stop.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
                except UnicodeDecodeError:
                    raise RequestError("STOP is not valid UTF-8") from None
        elif "stop" in params:
            if not isinstance(params["stop"], str):
                raise RequestError(f"the stop parameter must be a string, got {params['stop']!r}")
            stop = [params["stop"]]
        else:
            stop = []
        max_tokens = values.pop("max_tokens", self.default_max_tokens)
        if isinstance(max_tokens, int) and max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens {max_tokens} is more than this host's limit of {self.max_tokens_limit}")
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stop), **values)

    # --- tasks -----------------------------------------------------------------
    def _apply_policies(self, reg: Registry) -> None:
        mine = [t for t in reg.tasks.values() if t.backbone == self.spec.name and t.deployed]
        for entry in mine:
            self.engine.set_policy(
                entry.name,
                TaskPolicy(
                    weight=entry.weight,
                    queue_limit=entry.queue_limit,
                    deadline_s=entry.deadline_ms / 1000.0 if entry.deadline_ms else None,
                ),
            )
        live = {(t.name, int(t.deployed_version or t.version)) for t in mine}
        self.adapters.retain(live)
        self.adapters.pinned = {(t.name, int(t.deployed_version or t.version)) for t in mine if t.pinned}
        self._seen_generation = reg.generation

    def _adapter(self, entry: TaskEntry) -> Any:
        if entry.kind == "generate":
            return None
        key = (entry.name, int(entry.deployed_version or entry.version))
        try:
            return self.adapters.get(key)
        except Exception as exc:  # noqa: BLE001 - a task that cannot load fails only its own requests
            raise _TaskUnavailable(f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}") from None

    def _load_adapter(self, key: tuple[str, int]) -> Any:
        vdir = version_dir(self.view.repo, *key)
        read_manifest(vdir)
        adapter = check_artifact(vdir, self.spec.name)
        if adapter is None:
            raise _TaskUnavailable(f"task '{key[0]}' v{key[1]} has no adapter")
        return adapter

    # --- worker ----------------------------------------------------------------
    def _loop(self) -> None:
        failed_queue = False
        while True:
            draining = self._draining_since
            if draining is not None:
                if not failed_queue:
                    failed_queue = True
                    self.engine.fail_queued("host is shutting down")
                if time.monotonic() - draining >= self.shutdown_grace_s:
                    self.engine.abort_all("host is shutting down")
            with self._cv:
                while self._running and not self.engine.has_work():
                    if self._draining_since is not None and not failed_queue:
                        break
                    now = time.monotonic()
                    wake = self.engine.next_wakeup(now)
                    flush = self.metrics.flush_due()
                    if flush is not None and (wake is None or flush < wake):
                        wake = flush
                    self._cv.wait(timeout=None if wake is None else max(0.0, wake - now))
                    if flush is not None and time.monotonic() >= flush:
                        break
                if not self._running:
                    return
            try:
                report = self.engine.step()
            except Exception:  # noqa: BLE001 - the worker must survive any step
                pb_utils.Logger.log_error(f"fmplex {self.name}: {traceback.format_exc()}")
                report = None
            if report is not None:
                self.metrics.batch(report)
            try:
                self.metrics.maybe_flush(self.engine.scheduler, self.engine._lock, self.adapters)
                if time.monotonic() >= self._next_engine_flush:  # each update is an IPC message
                    self._next_engine_flush = time.monotonic() + self.metrics.interval
                    self.metrics.engine(self.engine)
            except Exception:  # noqa: BLE001 - metrics are best effort
                traceback.print_exc()

    def _on_update(self, update: Update) -> None:
        """Called by the engine (worker thread) for every new piece of text and at the end."""
        job: Job = update.seq.tag
        if update.error is not None:
            code = {
                "expired": pb_utils.TritonError.UNAVAILABLE,
                "shutdown": pb_utils.TritonError.UNAVAILABLE,
                "removed": pb_utils.TritonError.UNAVAILABLE,
                "cancelled": pb_utils.TritonError.CANCELLED,
            }.get(update.outcome, pb_utils.TritonError.INTERNAL)
            self._send(job, _error(update.error, code), update.outcome, final=True)
            return
        if self.decoupled:
            if update.text or update.done:
                out = pb_utils.Tensor(job.output, np.array([update.text.encode("utf-8")], dtype=np.object_))
                self._send(job, pb_utils.InferenceResponse(output_tensors=[out]), "ok", final=update.done)
        elif update.done:
            out = pb_utils.Tensor(job.output, np.array([update.seq.text.encode("utf-8")], dtype=np.object_))
            self._send(job, pb_utils.InferenceResponse(output_tensors=[out]), "ok", final=True)

    def _send(self, job: Job, response: Any, outcome: str, final: bool) -> None:
        if job.answered:  # never a response after the final one (counted: must stay 0)
            self.metrics.outcome(job.task, "duplicate_suppressed")
            return
        if not final:
            try:
                job.sender.send(response)
            except Exception as exc:  # noqa: BLE001 - the client went away; the engine notices via cancellation
                pb_utils.Logger.log_warn(f"fmplex: could not stream to a client of task '{job.task}': {exc}")
            return
        job.answered = True
        self._reply(job.sender, job.task, response, outcome)

    def _reply(self, sender: Any, task: str, response: Any, outcome: str) -> None:
        """The one place a final response leaves the host: counted per outcome."""
        self.metrics.outcome(task, outcome)
        try:
            sender.send(response, flags=FINAL)
        except Exception as exc:  # noqa: BLE001
            self.metrics.outcome(task, "send_failed")
            pb_utils.Logger.log_warn(f"fmplex: could not send a response for task '{task}': {exc}")


class _TaskUnavailable(RuntimeError):
    """A task's artifact cannot be loaded: its requests fail, others are served."""


class _ShuttingDown(RuntimeError):
    """The server is stopping: no new work."""


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


__all__ = ["TritonPythonModel"]
