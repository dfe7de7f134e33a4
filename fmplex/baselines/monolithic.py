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
``MAX_NEW_TOKENS``, ``TEMPERATURE``, ``SEED``, decoded and checked by the same
:func:`fmplex.multimodal.request.decode_request` as the lm host) with the public output names
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
from fmplex.multimodal.request import RequestLimits, TaskDefaults, decode_request
from fmplex.multimodal.stages import EncodeStage, LMStage
from fmplex.runtime.host import Host
from fmplex.runtime.ledger import Answer
from fmplex.runtime.routing import Route
from fmplex.runtime.scheduler import QueueFull
from fmplex.runtime.settings import HostSettings


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
        self.defaults = TaskDefaults(st.prompt, st.max_new_tokens, st.temperature)
        self.limits = RequestLimits(st.max_images, st.max_new_tokens_limit, st.max_text_bytes)
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
        arrival = time.monotonic()
        lm = decode_request(request, self.lm, self.encoder.image_shape, self.defaults, self.limits)
        wanted = frozenset(request.requested_output_names())
        return Job(answer, request, wanted, lm.ids, lm.images, lm.max_new_tokens, lm.temperature, lm.seed, arrival)

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
