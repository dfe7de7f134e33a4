"""The ``lm`` stage host: the Triton model every multimodal vFM talks to.

A multimodal vFM is an ensemble with one step on this host (slot routing, as
for the MiniLM host: the task is known from the slot outputs Triton asks
for). Per request -- ``TEXT`` plus optional ``IMAGES`` FP32 ``[n, 3, H, W]``:

    execute():      slot -> task -> validate -> tokenize (task prompt + TEXT)
      n == 0:       straight to the LM queue (the encoder never sees it)
      n > 0:        one BLS request per image to the encode stage host, issued
                    from a small thread pool, so a prompt's images spread over
                    encoder batches and batch with other prompts' and tasks' images
    LM worker:      prefill (features merged / cross-attended) + decode on the
                    KV cache -> one final response through the response sender

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

import collections
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
from fmplex.registry import RegistryView, TaskEntry
from fmplex.runtime.host import Host, input_array
from fmplex.runtime.ledger import Answer
from fmplex.runtime.routing import Route, SlotRouter
from fmplex.runtime.scheduler import QueueFull
from fmplex.runtime.settings import HostSettings
from fmplex.runtime.validation import RequestError, decode_utf8

from .interface import SLOT_OUTPUTS, slot_of
from .models import EOS_ID, STAGE_FILE, ByteTokenizer, ModelError, check_pair, read_stage
from .placement import apply_placement, format_cpus
from .stages import LMStage


@dataclasses.dataclass(frozen=True)
class LMStageSettings(HostSettings):
    slots: int = 64
    cpus: str = ""  # cores this stage may use ("" = all)
    encode_model: str = ""  # "" = fm.<backbone>.encode
    max_images: int = 8
    max_new_tokens_limit: int = 256
    max_text_bytes: int = 4096
    queue_limit: int = 256
    images_per_encode_request: int = 1
    encode_concurrency: int = 16


@dataclasses.dataclass(frozen=True)
class Served:
    """One request's LM work, as the shared batch counters want it."""

    rows: int
    padded_tokens: int
    seconds: float


@dataclasses.dataclass
class TaskSettings:
    """What makes a multimodal task a task: its prompt and generation defaults."""

    prompt: str = ""
    max_new_tokens: int = 32
    temperature: float = 0.0


@dataclasses.dataclass(eq=False)
class Job:
    request: Any
    answer: Answer
    task: str
    slot: int
    wanted: frozenset[str]
    ids: list[int]
    images: np.ndarray | None
    max_new_tokens: int
    temperature: float
    seed: int | None
    arrival: float
    features: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    pending: int = 0
    error: str | None = None
    encoded_at: float = 0.0


def _scalar(request: Any, name: str, kind: type) -> Any:
    arr = input_array(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {list(arr.shape)}")
    return kind(arr.reshape(-1)[0])


class TritonPythonModel(Host):
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
        vision = files.config.vision_config
        self.image_shape = (int(vision.num_channels), int(vision.image_size), int(vision.image_size))
        self.images_per_call = max(1, st.images_per_encode_request)
        self.view = RegistryView(repo)
        self.router = SlotRouter(self.view, self.backbone, self.name, st.slots, slot_of, "/".join(p + "<slot>" for p in SLOT_OUTPUTS))
        self._settings: dict[tuple[str, int], TaskSettings] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._in_encode = 0
        self._encoding: set[Job] = set()  # jobs whose images are at the encoder
        self._waiting: dict[str, int] = {}  # per task: accepted, not yet taken by the LM worker
        self._served: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max(1, st.encode_concurrency), thread_name_prefix="fmplex-mm-bls")
        return 1

    def describe(self) -> str:
        return (f"{self.backbone}, encoder {self.encode_model}, {self.settings.slots} slots, device {self.device}, "
                f"cpus {format_cpus(self.cpus)}, pid {os.getpid()}")  # fmt: skip

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
        with self._cv:
            left, self._queue = list(self._queue) + list(self._encoding), collections.deque()
            self._encoding = set()
        return [job.answer for job in left]

    # --- request path ----------------------------------------------------------
    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        assert route is not None
        job = self._job(request, answer, route.entry, route.slot, route.wanted)
        with self._cv:
            if len(self._queue) + self._in_encode >= self.settings.queue_limit:
                raise QueueFull(job.task, self.settings.queue_limit)
            self._wait(job.task, +1)
            if job.images is None:
                self._queue.append(job)
                self._cv.notify()
            else:
                self._in_encode += 1
                self._encoding.add(job)
        if job.images is not None:
            self._dispatch_encode(job)

    def _task_settings(self, entry: TaskEntry) -> TaskSettings:
        key = (entry.name, int(entry.deployed_version or entry.version))
        found = self._settings.get(key)
        if found is None:
            try:
                manifest = read_manifest(version_dir(self.view.repo, *key))
            except ArtifactError as exc:
                raise RuntimeError(f"task '{entry.name}' v{key[1]} cannot be loaded: {exc}") from None
            found = self._settings[key] = TaskSettings(
                prompt=str(manifest.get("prompt", "")),
                max_new_tokens=int(manifest.get("max_new_tokens", 32)),
                temperature=float(manifest.get("temperature", 0.0)),
            )
        return found

    def _job(self, request: Any, answer: Answer, entry: TaskEntry, slot: int, wanted: frozenset[str]) -> Job:
        settings = self._task_settings(entry)
        text_arr = input_array(request, "TEXT")
        if text_arr is None or text_arr.size != 1:
            raise RequestError(f"TEXT must hold exactly one prompt, got {0 if text_arr is None else text_arr.size}")
        text = decode_utf8(text_arr.reshape(-1)[0], self.settings.max_text_bytes)
        images = input_array(request, "IMAGES")
        n = 0
        if images is not None:
            if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
                shape = "[n, " + ", ".join(map(str, self.image_shape)) + "]"
                raise RequestError(f"IMAGES must be FP32 {shape} for {self.backbone}, got {list(images.shape)}")
            n = int(images.shape[0])
            if n > self.settings.max_images:
                raise RequestError(f"{n} images in one request, more than the limit of {self.settings.max_images}")
            if not np.isfinite(images).all():
                raise RequestError("IMAGES contains NaN or Inf")
        max_new = _scalar(request, "MAX_NEW_TOKENS", int)
        max_new = settings.max_new_tokens if max_new is None else max_new
        if not 1 <= max_new <= self.settings.max_new_tokens_limit:
            raise RequestError(f"MAX_NEW_TOKENS must be 1..{self.settings.max_new_tokens_limit}, got {max_new}")
        temperature = _scalar(request, "TEMPERATURE", float)
        temperature = settings.temperature if temperature is None else temperature
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise RequestError(f"TEMPERATURE must be >= 0, got {temperature}")
        seed = _scalar(request, "SEED", int)
        try:
            ids = self.lm.tokenizer.encode(settings.prompt + text, n)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if len(ids) + max_new > self.lm.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the model's {self.lm.max_positions} positions")
        return Job(
            request, answer, entry.name, slot, wanted, ids, np.ascontiguousarray(images, dtype=np.float32) if n else None,
            max_new, float(temperature), seed, time.monotonic(),
        )  # fmt: skip

    # --- the encode stage (BLS) --------------------------------------------------
    def _dispatch_encode(self, job: Job) -> None:
        assert job.images is not None
        groups = [job.images[i : i + self.images_per_call] for i in range(0, len(job.images), self.images_per_call)]
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
        with self._cv:
            if error is not None and job.error is None:
                job.error = f"encode stage {self.encode_model} failed: {error}"
            job.features[index] = feats
            job.pending -= 1
            done = job.pending == 0
            if done:
                self._in_encode -= 1
                self._encoding.discard(job)
                job.encoded_at = time.monotonic()
                if job.error is None and not job.request.is_cancelled():
                    self._queue.append(job)
                    self._cv.notify()
                else:
                    self._wait(job.task, -1)
        if done and job.error is not None:
            self.fail(job.answer, job.error, pb_utils.TritonError.UNAVAILABLE, "encode_error")
        elif done and job.request.is_cancelled():
            self.fail(job.answer, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled")

    def _wait(self, task: str, delta: int) -> None:
        """Requests of ``task`` waiting here (encoding or queued for the LM), published as
        ``fmplex_task_queue_depth`` -- the queue the autoscaler reads. Under ``_cv``."""
        self._waiting[task] = self._waiting.get(task, 0) + delta
        self.metrics.touch()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            tasks = set(self._waiting) | set(self._served)
            return {"tasks": {t: {"queued": self._waiting.get(t, 0), "served_requests": self._served.get(t, 0)} for t in tasks}}

    # --- the LM worker -------------------------------------------------------------
    def take_work(self, now: float) -> Any:
        if not self._queue:
            return None
        job = self._queue.popleft()
        self._wait(job.task, -1)
        return job

    def work_failed(self, work: Any, exc: Exception) -> None:
        self.fail(work.answer, f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL, "internal")

    def run_work(self, job: Job) -> None:
        if job.request.is_cancelled():
            self.fail(job.answer, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
            return
        feats = None
        if job.images is not None:
            feats = torch.from_numpy(np.concatenate([f for f in job.features if f is not None]))
        want_logits = any(n.startswith("LOGITS_") for n in job.wanted)
        started = time.monotonic()
        gen = self.lm.generate(
            job.ids, feats, job.max_new_tokens, temperature=job.temperature, seed=job.seed, eos_id=EOS_ID, want_logits=want_logits
        )
        timing = [started - job.arrival, started + gen.prefill_s - job.arrival, time.monotonic() - job.arrival]
        values = {
            "GEN_TEXT_": np.array([ByteTokenizer.decode(gen.tokens).encode("utf-8")], dtype=np.object_),
            "GEN_IDS_": np.array(gen.tokens, dtype=np.int64),
            "PROMPT_IDS_": np.array(job.ids, dtype=np.int64),
            "LOGITS_": None if gen.prefill_logits is None else np.ascontiguousarray(gen.prefill_logits.numpy(), dtype=np.float32),
            "TIMING_": np.array([1e3 * t for t in timing], dtype=np.float32),  # interface.TIMING_FIELDS
        }
        tensors = [pb_utils.Tensor(f"{p}{job.slot}", v) for p, v in values.items() if f"{p}{job.slot}" in job.wanted and v is not None]
        with self._cv:
            self._served[job.task] = self._served.get(job.task, 0) + 1
        self.answer_ok(job.answer, tensors)
        self.metrics.batch(Served(rows=1, padded_tokens=gen.prompt_tokens + len(gen.tokens), seconds=gen.prefill_s + gen.decode_s))
        m = self.metrics
        m.metric("fmplex_mm_generated_tokens_total", "tokens generated", task=job.task).increment(len(gen.tokens))
        m.metric("fmplex_mm_prompt_tokens_total", "prompt tokens prefilled", task=job.task).increment(gen.prompt_tokens)
        m.metric("fmplex_mm_prefill_seconds_total", "time in prefill", task=job.task).increment(gen.prefill_s)
        m.metric("fmplex_mm_decode_seconds_total", "time in decode", task=job.task).increment(gen.decode_s)
        if job.images is not None:
            m.metric("fmplex_mm_images_total", "images of served requests", task=job.task).increment(len(job.images))
            m.metric("fmplex_mm_encode_wait_seconds_total", "time from arrival until all images were encoded", task=job.task).increment(
                job.encoded_at - job.arrival
            )
