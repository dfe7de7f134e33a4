"""The generative host: one Triton model per (backbone, streaming mode) that every LM vFM shares.

Two variants of the same code, told apart by the model config:

* ``fm.smollm2`` (non-decoupled): ``execute()`` validates and enqueues, then
  returns ``None``; the worker answers each request once, FINAL, with the
  whole text — so plain HTTP/gRPC ``infer`` (and HTTP ``generate``) work.
* ``fm.smollm2.stream`` (decoupled): the worker sends one response per new
  piece of text as the tokens come, the last one with the FINAL flag — for
  gRPC ``stream_infer`` and HTTP ``generate_stream``.

    accept():    prompt + sampling -> Sequence -> engine.submit (WFQ queues)
    take_work(): the engine, while it has work
    run_work():  engine.step(): admit (scheduler order, free rows) + one batched
                 forward -> per-sequence updates -> the response ledger

Routing, the response ledger (exactly once; sent by its own thread), the
worker loop and the metrics are :class:`fmplex.runtime.host.Host`'s.

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
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fmplex.artifacts import read_manifest, version_dir
from fmplex.kinds import slot_of_output
from fmplex.registry import Registry, RegistryView, TaskEntry
from fmplex.runtime.extension_cache import ExtensionCache
from fmplex.runtime.host import ShuttingDown, TaskUnavailable, input_array
from fmplex.runtime.ledger import Answer
from fmplex.runtime.routing import Route, SlotRouter
from fmplex.runtime.settings import HostSettings
from fmplex.runtime.validation import RequestError, decode_utf8

from .engine import Engine, SamplingParams, Sequence, Update
from .engine_host import EngineHost
from .serving import TEXT_PREFIX, backbone_of_host, check_artifact
from .smollm import load_smollm2, set_threads


@dataclasses.dataclass(frozen=True)
class GenerativeSettings(HostSettings):
    max_rows: int = 8  # running sequences per decode step
    prefill_tokens: int = 1024
    max_context: int = 2048
    policy: str = "wfq"
    shutdown_grace_s: float = 5.0
    default_max_tokens: int = 16
    max_tokens_limit: int = 512
    max_text_bytes: int = 16384
    adapter_budget_mb: float = 1024.0


@dataclasses.dataclass(eq=False)
class Job:
    answer: Answer
    output: str  # TXT_<slot>


def _text_slot(name: str) -> int | None:
    return slot_of_output(name) if name.startswith(TEXT_PREFIX) else None


class TritonPythonModel(EngineHost):
    Settings = GenerativeSettings
    finish_queue_on_stop = False  # finalize aborts what runs (the signal watch drained it already)
    kind = "generative host"

    def setup(self, args: dict[str, Any]) -> int:
        st: GenerativeSettings = self.settings
        self.spec, _ = backbone_of_host(self.name)
        self.decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(self.config))
        set_threads(st.torch_threads)
        self.view = RegistryView(Path(st.repository))
        self.router = SlotRouter(self.view, self.spec.name, self.name, st.slots, _text_slot, "TXT_<slot>", single_output=True)
        self.lm = load_smollm2()
        self.start_engine(Engine(self.lm, max_rows=st.max_rows, prefill_tokens=st.prefill_tokens, max_context=st.max_context, policy=st.policy))
        self._draining_since: float | None = None
        self._failed_queue = False
        self.cache = ExtensionCache(self._load_adapter, int(st.adapter_budget_mb * 2**20))
        self._watch_shutdown_signals()
        return 1

    def describe(self) -> str:
        mode = "decoupled (streaming)" if self.decoupled else "whole answers"
        return f"{mode}, {self.settings.slots} slots, backbone {self.spec.name}, {self.engine.max_rows} rows per step, pid {os.getpid()}"

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

    def drain(self) -> list[Answer]:
        self.engine.abort_all("host is shutting down")  # answers through the sinks
        return []

    # --- request path ----------------------------------------------------------
    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        assert route is not None
        if self._draining_since is not None:
            raise ShuttingDown("host is shutting down")
        job = Job(answer, next(iter(route.wanted)))
        try:  # SamplingParams, the tokenizer and the engine refuse bad values with ValueError
            prompt, params = self._prompt(request), self._sampling(request)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        adapter = self._adapter(route.entry)
        timeout_us = request.timeout()
        probe = answer.sender.is_cancelled if self.decoupled else request.is_cancelled
        try:
            seq = Sequence(
                route.entry.name,
                self.engine.tokenize(prompt),
                params,
                adapter=adapter,
                sink=self._on_update,
                cancelled=probe,
                deadline=now + timeout_us / 1e6 if timeout_us else None,
                tag=job,
            )
            self.engine.submit(seq, now)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def _prompt(self, request: Any) -> str:
        arr = input_array(request, "TEXT")
        if arr is None:
            raise RequestError("missing input TEXT (BYTES, shape [1]: one prompt)")
        flat = arr.reshape(-1)
        if flat.shape[0] != 1:
            raise RequestError(f"TEXT must hold exactly one prompt (shape [1]), got shape {list(arr.shape)}")
        text = decode_utf8(flat[0], self.settings.max_text_bytes)
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
            arr = input_array(request, key.upper())
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
        stop_arr = input_array(request, "STOP")
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
        max_tokens = values.pop("max_tokens", self.settings.default_max_tokens)
        if isinstance(max_tokens, int) and max_tokens > self.settings.max_tokens_limit:
            raise RequestError(f"max_tokens {max_tokens} is more than this host's limit of {self.settings.max_tokens_limit}")
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stop), **values)

    # --- tasks -----------------------------------------------------------------
    def apply_registry(self, reg: Registry) -> None:
        mine = [t for t in reg.tasks.values() if t.backbone == self.spec.name and t.deployed]
        self.set_policies(mine)
        live = {(t.name, int(t.deployed_version or t.version)) for t in mine}
        self.cache.retain(live)
        self.cache.pinned = {(t.name, int(t.deployed_version or t.version)) for t in mine if t.pinned}

    def _adapter(self, entry: TaskEntry) -> Any:
        if entry.kind == "generate":
            return None
        key = (entry.name, int(entry.deployed_version or entry.version))
        try:
            return self.cache.get(key)
        except Exception as exc:  # noqa: BLE001 - a task that cannot load fails only its own requests
            raise TaskUnavailable(f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}") from None

    def _load_adapter(self, key: tuple[str, int]) -> Any:
        vdir = version_dir(self.view.repo, *key)
        read_manifest(vdir)
        adapter = check_artifact(vdir, self.spec.name)
        if adapter is None:
            raise TaskUnavailable(f"task '{key[0]}' v{key[1]} has no adapter")
        return adapter

    # --- worker ----------------------------------------------------------------
    def take_work(self, now: float) -> Any:
        draining = self._draining_since
        if draining is not None:
            if not self._failed_queue:
                self._failed_queue = True
                self.engine.fail_queued("host is shutting down")
            if now - draining >= self.settings.shutdown_grace_s:
                self.engine.abort_all("host is shutting down")
        return super().take_work(now)

    def stats(self) -> dict[str, Any]:
        with self.engine._lock:
            return self.engine.scheduler.stats()

    def _on_update(self, update: Update) -> None:
        """Called by the engine (worker thread) for every new piece of text and at the end."""
        job: Job = update.seq.tag
        if update.error is not None:
            self.fail_sequence(job.answer, update)
            return
        if self.decoupled:
            if update.text or update.done:
                out = pb_utils.Tensor(job.output, np.array([update.text.encode("utf-8")], dtype=np.object_))
                response = pb_utils.InferenceResponse(output_tensors=[out])
                if update.done:
                    self.ledger.final(job.answer, response, "ok")
                else:
                    self.ledger.partial(job.answer, response)
        elif update.done:
            out = pb_utils.Tensor(job.output, np.array([update.seq.text.encode("utf-8")], dtype=np.object_))
            self.answer_ok(job.answer, [out])


__all__ = ["TritonPythonModel"]
