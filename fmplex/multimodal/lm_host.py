"""The ``lm`` stage host: the Triton model every multimodal vFM talks to.

A multimodal vFM is an ensemble with one step on this host (slot routing, as
for the MiniLM host: the task is known from the slot outputs Triton asks
for). Per request -- ``TEXT`` plus optional ``IMAGES`` FP32 ``[n, 3, H, W]``:

    execute():      slot -> task -> validate -> tokenize (task prompt + TEXT)
      n == 0:       straight to the LM queue (the encoder never sees it)
      n > 0:        one BLS request per image to the encode stage host, issued
                    from a small thread pool, so a prompt's images spread over
                    encoder batches and batch with other prompts' and tasks' images
    LM engine:      each request becomes a sequence of the generative engine
                    (``lm_engine``), submitted once its images are encoded: the
                    weighted-fair scheduler admits sequences of all tasks into
                    shared steps (prefill of the new ones + one decode token of
                    every running one), deadlines expire queued ones, and each
                    finished sequence is one final response through the ledger

Non-decoupled: ``execute()`` returns ``None`` and each request is answered
later with the FINAL flag (Triton >= 24.06), so plain HTTP/gRPC ``infer`` work.
Every accepted request gets exactly one final response. Routing, the response
ledger and its sender thread, the worker loop, the drain and the metrics are
:class:`fmplex.runtime.host.Host`'s; this class decodes a request, dispatches
its images and runs the LM.

Measured with Triton 2.51 (tests/e2e/test_multimodal.py): synchronous BLS
``exec()`` from threads that are not ``execute()``'s own works, concurrently
from several threads, and Triton's dynamic batcher of the encode host merges
those BLS requests into one batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fmplex.artifacts import ArtifactError, read_manifest, version_dir
from fmplex.generative.engine import SamplingParams, Sequence, Update
from fmplex.generative.engine_host import EngineHost
from fmplex.registry import Registry, RegistryView, TaskEntry
from fmplex.runtime.ledger import Answer
from fmplex.runtime.routing import Route, SlotRouter
from fmplex.runtime.scheduler import QueueFull
from fmplex.runtime.settings import HostSettings
from fmplex.runtime.validation import RequestError

from .interface import SLOT_OUTPUTS, slot_of
from .lm_engine import lm_sequence, make_engine
from .models import STAGE_FILE, ByteTokenizer, ModelError, check_pair, read_stage
from .placement import apply_placement, format_cpus
from .request import LMRequest, RequestLimits, TaskDefaults, decode_request
from .stages import LMStage


@dataclasses.dataclass(frozen=True)
class LMStageSettings(HostSettings):
    slots: int = 64
    cpus: str = ""  # cores this stage may use ("" = all)
    encode_model: str = ""  # "" = fm.<backbone>.encode
    max_images: int = 8
    max_new_tokens_limit: int = 256
    max_text_bytes: int = 4096
    queue_limit: int = 256  # requests waiting here (encoding or queued for the engine), all tasks together
    images_per_encode_request: int = 1
    encode_concurrency: int = 16
    max_rows: int = 8  # running sequences per engine step
    prefill_tokens: int = 1024  # prompt tokens admitted into one step
    policy: str = "wfq"


@dataclasses.dataclass(eq=False)
class Job:
    request: Any
    answer: Answer
    task: str
    slot: int
    wanted: frozenset[str]
    lm: LMRequest
    arrival: float
    deadline: float | None
    features: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    pending: int = 0
    error: str | None = None
    encoded_at: float = 0.0


class TritonPythonModel(EngineHost):
    Settings = LMStageSettings
    kind = "lm stage"

    def setup(self, args: dict[str, Any]) -> int:
        st: LMStageSettings = self.settings
        self.device, self.cpus = apply_placement(st.cpus, st.torch_threads, st.device)
        files = read_stage(self.model_dir / str(args["model_version"]), "lm")
        self.backbone = files.meta["backbone"]
        repo = Path(st.repository)
        self.encode_model = st.encode_model or f"fm.{self.backbone}.encode"
        check_pair(self._encode_meta(repo), files.meta)  # never pair an LM with another model's encoder
        self.lm = LMStage(files, self.device)
        self.start_engine(make_engine(self.lm, max_rows=st.max_rows, prefill_tokens=st.prefill_tokens, policy=st.policy))
        vision = files.config.vision_config
        self.image_shape = (int(vision.num_channels), int(vision.image_size), int(vision.image_size))
        self.limits = RequestLimits(st.max_images, st.max_new_tokens_limit, st.max_text_bytes)
        self.images_per_call = max(1, st.images_per_encode_request)
        self.view = RegistryView(repo)
        self.router = SlotRouter(self.view, self.backbone, self.name, st.slots, slot_of, "/".join(p + "<slot>" for p in SLOT_OUTPUTS))
        self._defaults: dict[tuple[str, int], TaskDefaults] = {}
        self._encoding: set[Job] = set()  # jobs whose images are at the encoder
        self._served: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max(1, st.encode_concurrency), thread_name_prefix="fmplex-mm-bls")
        return 1

    def describe(self) -> str:
        return (f"{self.backbone}, encoder {self.encode_model}, {self.settings.slots} slots, {self.engine.max_rows} rows per step, "
                f"device {self.device}, cpus {format_cpus(self.cpus)}, pid {os.getpid()}")  # fmt: skip

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self.metrics.metric("fmplex_mm_stage_load_seconds", "time this stage host took to load", "GAUGE").set(self.load_seconds)

    def _encode_meta(self, repo: Path) -> dict[str, Any]:
        edir = repo / self.encode_model
        versions = sorted((int(p.name) for p in edir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) if edir.is_dir() else []
        if not versions:
            raise ModelError(f"no encode stage '{self.encode_model}' in {repo}")
        try:
            return json.loads((edir / str(versions[0]) / STAGE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read the encode stage's {STAGE_FILE}: {exc}") from None

    def drain(self) -> list[Answer]:
        self._pool.shutdown(wait=True, cancel_futures=True)  # cancelled encode calls leave their jobs unanswered: failed here
        self.engine.abort_all("lm stage is shutting down")  # what the workers left (answers through the sinks)
        with self._cv:
            left, self._encoding = list(self._encoding), set()
        return [job.answer for job in left]

    # --- request path ----------------------------------------------------------
    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        assert route is not None
        job = self._job(request, answer, route.entry, route.slot, route.wanted, now)
        with self._cv:
            if self.engine.queued() + len(self._encoding) >= self.settings.queue_limit:
                raise QueueFull(job.task, self.settings.queue_limit)
            if job.lm.images is None:
                try:
                    self._submit(job, None, now)
                except ValueError as exc:  # the engine refuses the prompt (QueueFull passes: a 503)
                    raise RequestError(str(exc)) from None
            else:
                self._encoding.add(job)
                self.metrics.touch()
        if job.lm.images is not None:
            self._dispatch_encode(job)

    def _submit(self, job: Job, features: torch.Tensor | None, now: float) -> None:
        """Under ``_cv``: the job's sequence into the engine's queues (QueueFull: the task's queue is full)."""
        lm = job.lm
        params = SamplingParams(max_tokens=lm.max_new_tokens, temperature=lm.temperature, seed=lm.seed)
        seq = lm_sequence(
            self.lm, job.task, lm.ids, features, params, sink=self._on_update, cancelled=job.request.is_cancelled,
            deadline=job.deadline, tag=job, want_prompt_logits=any(n.startswith("LOGITS_") for n in job.wanted),
        )  # fmt: skip
        self.engine.submit(seq, now)
        self.metrics.touch()
        self._cv.notify()

    def _task_defaults(self, entry: TaskEntry) -> TaskDefaults:
        key = (entry.name, int(entry.deployed_version or entry.version))
        found = self._defaults.get(key)
        if found is None:
            try:
                manifest = read_manifest(version_dir(self.view.repo, *key))
            except ArtifactError as exc:
                raise RuntimeError(f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}") from None
            found = self._defaults[key] = TaskDefaults(
                prompt=str(manifest.get("prompt", "")),
                max_new_tokens=int(manifest.get("max_new_tokens", 32)),
                temperature=float(manifest.get("temperature", 0.0)),
            )
        return found

    def _job(self, request: Any, answer: Answer, entry: TaskEntry, slot: int, wanted: frozenset[str], now: float) -> Job:
        lm = decode_request(request, self.lm, self.image_shape, self._task_defaults(entry), self.limits, self.backbone)
        timeout_us = request.timeout()
        return Job(request, answer, entry.name, slot, wanted, lm, time.monotonic(), now + timeout_us / 1e6 if timeout_us else None)

    def apply_registry(self, reg: Registry) -> None:
        """Each deployed task's weight, queue limit and deadline, as on the SmolLM2 host."""
        self.set_policies(e for e in reg.tasks.values() if e.backbone == self.backbone and e.deployed)

    # --- the encode stage (BLS) --------------------------------------------------
    def _dispatch_encode(self, job: Job) -> None:
        images = job.lm.images
        assert images is not None
        groups = [images[i : i + self.images_per_call] for i in range(0, len(images), self.images_per_call)]
        job.features = [None] * len(groups)
        job.pending = len(groups)
        for index, group in enumerate(groups):
            self._pool.submit(self._encode_call, job, index, group)

    def _encode_call(self, job: Job, index: int, pixels: np.ndarray) -> None:
        error = None
        feats = None
        if job.error is None and not job.request.is_cancelled():
            try:
                req = pb_utils.InferenceRequest(
                    model_name=self.encode_model,
                    inputs=[pb_utils.Tensor("PIXEL_VALUES", pixels)],
                    requested_output_names=["FEATURES"],
                )
                resp = req.exec()
                if resp.has_error():
                    error = resp.error().message()
                else:
                    feats = pb_utils.get_output_tensor_by_name(resp, "FEATURES").as_numpy()
                    if feats.shape != (len(pixels), *self.lm.feature_shape):
                        error = f"returned features of shape {list(feats.shape)}, expected {[len(pixels), *self.lm.feature_shape]}"
            except Exception as exc:  # noqa: BLE001 - reported on the request
                error = f"{type(exc).__name__}: {exc}"
        refused: Exception | None = None
        submitted = False
        with self._cv:
            if error is not None and job.error is None:
                job.error = f"encode stage {self.encode_model} failed: {error}"
            job.features[index] = feats
            job.pending -= 1
            done = job.pending == 0
            if done:
                self._encoding.discard(job)
                self.metrics.touch()
                job.encoded_at = time.monotonic()
                if job.error is None and not job.request.is_cancelled():
                    try:
                        self._submit(job, torch.from_numpy(np.concatenate([f for f in job.features if f is not None])), job.encoded_at)
                        submitted = True
                    except Exception as exc:  # noqa: BLE001 - QueueFull, or a prompt the model refuses
                        refused = exc
        if not done or submitted:
            return
        codes = pb_utils.TritonError
        if isinstance(refused, QueueFull):
            self.fail(job.answer, str(refused), codes.UNAVAILABLE, "queue_full")
        elif isinstance(refused, ValueError):
            self.fail(job.answer, str(refused), codes.INVALID_ARG, "invalid")
        elif refused is not None:
            self.fail(job.answer, f"internal error: {type(refused).__name__}: {refused}", codes.INTERNAL, "internal")
        elif job.error is not None:
            self.fail(job.answer, job.error, codes.UNAVAILABLE, "encode_error")
        else:
            self.fail(job.answer, "request cancelled", codes.CANCELLED, "cancelled")

    def stats(self) -> dict[str, Any]:
        """Per task: requests waiting here (encoding or queued for the engine), published as
        ``fmplex_task_queue_depth`` -- the queue the autoscaler reads -- and requests served."""
        with self._cv:
            encoding: dict[str, int] = {}
            for job in self._encoding:
                encoding[job.task] = encoding.get(job.task, 0) + 1
            served = dict(self._served)
        with self.engine._lock:
            queued = {t: s["queued"] for t, s in self.engine.scheduler.stats()["tasks"].items()}
        tasks = set(encoding) | set(queued) | set(served)
        return {"tasks": {t: {"queued": queued.get(t, 0) + encoding.get(t, 0), "served_requests": served.get(t, 0)} for t in tasks}}

    # --- the LM engine ---------------------------------------------------------------
    def _on_update(self, update: Update) -> None:
        """Called by the engine (worker thread) when a sequence ends: its one final response."""
        if not update.done:
            return
        seq: Sequence = update.seq
        job: Job = seq.tag
        if update.error is not None:
            self.fail_sequence(job.answer, update)
            return
        started = seq.admitted_at if seq.admitted_at is not None else seq.submitted_at
        first = seq.first_token_at if seq.first_token_at is not None else started
        end = seq.finished_at if seq.finished_at is not None else time.monotonic()
        timing = [started - job.arrival, first - job.arrival, end - job.arrival]
        logits = seq.prompt_logits
        values = {
            "GEN_TEXT_": np.array([ByteTokenizer.decode(seq.generated).encode("utf-8")], dtype=np.object_),
            "GEN_IDS_": np.array(seq.generated, dtype=np.int64),
            "PROMPT_IDS_": np.array(seq.prompt_ids, dtype=np.int64),
            "LOGITS_": None if logits is None else np.ascontiguousarray(logits.numpy(), dtype=np.float32),
            "TIMING_": np.array([1e3 * t for t in timing], dtype=np.float32),  # interface.TIMING_FIELDS
        }
        tensors = [pb_utils.Tensor(f"{p}{job.slot}", v) for p, v in values.items() if f"{p}{job.slot}" in job.wanted and v is not None]
        with self._cv:
            self._served[job.task] = self._served.get(job.task, 0) + 1
        self.answer_ok(job.answer, tensors)
        m = self.metrics
        m.metric("fmplex_mm_generated_tokens_total", "tokens generated", task=job.task).increment(len(seq.generated))
        m.metric("fmplex_mm_prompt_tokens_total", "prompt tokens prefilled", task=job.task).increment(len(seq.prompt_ids))
        m.metric("fmplex_mm_prefill_seconds_total", "time from admission to the first token", task=job.task).increment(first - started)
        m.metric("fmplex_mm_decode_seconds_total", "time from the first token to the answer", task=job.task).increment(end - first)
        if job.lm.images is not None:
            m.metric("fmplex_mm_images_total", "images of served requests", task=job.task).increment(job.lm.n_images)
            m.metric("fmplex_mm_encode_wait_seconds_total", "time from arrival until all images were encoded", task=job.task).increment(
                job.encoded_at - job.arrival
            )
