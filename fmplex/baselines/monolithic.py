"""The monolithic baseline: one Triton Python model per task, whole pipeline in one process.

What a team deploys today without stage hosts: each task is its own model
that holds the complete multimodal model -- vision tower, projector, LM and
``lm_head`` -- and runs a request start to end (encode its images, prefill,
decode) before the next; one instance per task, sized by hand. It exists for
``perf/bench_multimodal_trace.py`` to compare the staged deployment (shared
``encode`` and ``lm`` stage hosts, tasks as vFMs, autoscaled per stage) with.

Same weights, same answers: it loads the two stage directories that
``fmplex multimodal init`` wrote (``encode_dir``/``lm_dir`` parameters, checked
to come from one model) into the same pure-torch :class:`EncodeStage` and
:class:`LMStage` the stage hosts run, and tokenizes ``prompt + TEXT`` as the lm
host does, so greedy tokens equal the staged answer for the same request (the
encoder sees a request's images as one batch here instead of mixed into shared
batches; images never interact, see ``stages``).

Interface: the multimodal vFM's (``TEXT``, optional ``IMAGES [n, 3, H, W]``,
``MAX_NEW_TOKENS``, ``TEMPERATURE``, ``SEED``) with the public output names
(``GENERATED_TEXT``, ``TOKEN_IDS``, ``PROMPT_IDS``, ``TIMING_MS`` as in
``interface.TIMING_FIELDS``). The task's prompt and defaults are config
parameters. ``execute()`` only queues (arrival time taken there, as the lm
host does) and one worker thread answers each request through its response
sender with the FINAL flag -- the same non-decoupled pattern and FIFO queue
as the lm host, so the timing fields mean the same in both deployments.
The model directory holds ``config.pbtxt`` and a one-line ``1/model.py``
importing this class (the baseline's repository never changes while serving);
:mod:`fmplex.baselines.monolithic_config` writes both. The request path,
response ledger, worker loop and drain are :class:`fmplex.runtime.host.Host`'s.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fmplex.multimodal.models import EOS_ID, ByteTokenizer, check_pair, read_stage
from fmplex.multimodal.placement import apply_placement
from fmplex.multimodal.stages import EncodeStage, LMStage
from fmplex.runtime.host import Host, input_array
from fmplex.runtime.ledger import Answer
from fmplex.runtime.routing import Route
from fmplex.runtime.scheduler import QueueFull
from fmplex.runtime.settings import HostSettings
from fmplex.runtime.validation import RequestError, decode_utf8


@dataclasses.dataclass(frozen=True)
class MonolithicSettings(HostSettings):
    encode_dir: str = ""
    lm_dir: str = ""
    cpus: str = ""
    prompt: str = ""  # the task's prompt, prepended to TEXT
    max_new_tokens: int = 32  # the task's default
    temperature: float = 0.0  # the task's default
    max_images: int = 8
    max_new_tokens_limit: int = 256
    max_text_bytes: int = 16384
    queue_limit: int = 256


@dataclasses.dataclass(eq=False)
class Job:
    answer: Answer
    request: Any
    wanted: frozenset[str]
    ids: list[int]
    images: np.ndarray | None
    max_new_tokens: int
    temperature: float
    seed: int | None
    arrival: float


def _scalar(request: Any, name: str, kind: type) -> Any:
    arr = input_array(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {list(arr.shape)}")
    return kind(arr.reshape(-1)[0])


class TritonPythonModel(Host):
    Settings = MonolithicSettings
    kind = "model"

    def setup(self, args: dict[str, Any]) -> int:
        st: MonolithicSettings = self.settings
        self.device, _ = apply_placement(st.cpus, st.torch_threads, st.device)
        enc = read_stage(Path(st.encode_dir), "encode")
        lm = read_stage(Path(st.lm_dir), "lm")
        check_pair(enc.meta, lm.meta)
        self.backbone = enc.meta["backbone"]
        self.encoder = EncodeStage(enc, self.device)
        self.lm = LMStage(lm, self.device)
        self._queue: collections.deque[Job] = collections.deque()
        return 1

    def describe(self) -> str:
        return f"monolithic baseline of {self.backbone}"

    def accept(self, request: Any, answer: Answer, route: Route | None, now: float) -> None:
        answer.task = self.name
        job = self._job(request, answer)
        with self._cv:
            if len(self._queue) >= self.settings.queue_limit:
                raise QueueFull(self.name, self.settings.queue_limit)
            self._queue.append(job)
            self._cv.notify()

    def take_work(self, now: float) -> Any:
        return self._queue.popleft() if self._queue else None

    def drain(self) -> list[Answer]:
        with self._cv:
            left, self._queue = list(self._queue), collections.deque()
        return [job.answer for job in left]

    def work_failed(self, work: Any, exc: Exception) -> None:
        self.fail(work.answer, f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL, "internal")

    def _job(self, request: Any, answer: Answer) -> Job:
        st: MonolithicSettings = self.settings
        arrival = time.monotonic()
        text_arr = input_array(request, "TEXT")
        if text_arr is None or text_arr.size != 1:
            raise RequestError(f"TEXT must hold exactly one prompt, got {0 if text_arr is None else text_arr.size}")
        text = decode_utf8(text_arr.reshape(-1)[0], st.max_text_bytes)
        images = input_array(request, "IMAGES")
        n = 0
        if images is not None:
            if images.ndim != 4 or tuple(images.shape[1:]) != self.encoder.image_shape:
                raise RequestError(f"IMAGES must be FP32 [n, {', '.join(map(str, self.encoder.image_shape))}], got {list(images.shape)}")
            n = int(images.shape[0])
            if n > st.max_images:
                raise RequestError(f"{n} images in one request, more than the limit of {st.max_images}")
            if not np.isfinite(images).all():
                raise RequestError("IMAGES contains NaN or Inf")
        max_new = _scalar(request, "MAX_NEW_TOKENS", int)
        max_new = st.max_new_tokens if max_new is None else max_new
        if not 1 <= max_new <= st.max_new_tokens_limit:
            raise RequestError(f"MAX_NEW_TOKENS must be 1..{st.max_new_tokens_limit}, got {max_new}")
        temperature = _scalar(request, "TEMPERATURE", float)
        temperature = st.temperature if temperature is None else temperature
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise RequestError(f"TEMPERATURE must be >= 0, got {temperature}")
        try:
            ids = self.lm.tokenizer.encode(st.prompt + text, n)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if len(ids) + max_new > self.lm.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the model's {self.lm.max_positions} positions")
        pixels = np.ascontiguousarray(images, dtype=np.float32) if n else None
        wanted = frozenset(request.requested_output_names())
        return Job(answer, request, wanted, ids, pixels, max_new, float(temperature), _scalar(request, "SEED", int), arrival)

    def run_work(self, job: Job) -> None:
        if job.request.is_cancelled():
            self.fail(job.answer, "request cancelled", pb_utils.TritonError.CANCELLED, "cancelled")
            return
        feats = None if job.images is None else self.encoder.encode(torch.from_numpy(job.images))
        prefill = time.monotonic()
        gen = self.lm.generate(job.ids, feats, job.max_new_tokens, temperature=job.temperature, seed=job.seed, eos_id=EOS_ID)
        # As the lm host: queue_ms ends where the LM starts (this request's images encoded first, here in-line).
        timing = [prefill - job.arrival, prefill + gen.prefill_s - job.arrival, time.monotonic() - job.arrival]
        values = {
            "GENERATED_TEXT": np.array([ByteTokenizer.decode(gen.tokens).encode("utf-8")], dtype=np.object_),
            "TOKEN_IDS": np.array(gen.tokens, dtype=np.int64),
            "PROMPT_IDS": np.array(job.ids, dtype=np.int64),
            "TIMING_MS": np.array([1e3 * t for t in timing], dtype=np.float32),
        }
        wanted = job.wanted or frozenset(values)
        self.answer_ok(job.answer, [pb_utils.Tensor(k, v) for k, v in values.items() if k in wanted])
