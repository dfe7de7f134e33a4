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
importing this class (the baseline's repository never changes while serving).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: the config writers below are used by the benchmark
    pb_utils = None

from fmplex.triton_backend.validation import RequestError

from .interface import LM_INPUTS
from .models import EOS_ID, ByteTokenizer, check_pair, read_stage
from .stages import EncodeStage, LMStage

OUTPUTS = {"GENERATED_TEXT": ("TYPE_STRING", "[ 1 ]"), "TOKEN_IDS": ("TYPE_INT64", "[ -1 ]"),
           "PROMPT_IDS": ("TYPE_INT64", "[ -1 ]"), "TIMING_MS": ("TYPE_FP32", "[ 3 ]")}  # fmt: skip
SHIM = "from fmplex.multimodal.monolithic_host import TritonPythonModel  # noqa: F401\n"


def model_config(task: str, encode_dir: Path, lm_dir: Path, prompt: str = "", max_new_tokens: int = 32,
                 temperature: float = 0.0, instances: int = 1, queue_limit: int = 256) -> str:  # fmt: skip
    """``config.pbtxt`` of one task's monolithic model (backend ``python``)."""
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}' for n, t, d, o in LM_INPUTS)
    outputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, (t, d) in OUTPUTS.items())
    params = {
        "encode_dir": str(Path(encode_dir).resolve()),
        "lm_dir": str(Path(lm_dir).resolve()),
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "torch_threads": 1,
        "max_images": 8,
        "max_new_tokens_limit": 256,
        "queue_limit": queue_limit,
    }
    ptext = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v), ensure_ascii=False)} }} }}' for k, v in params.items())
    return f"""# Monolithic baseline (fmplex/multimodal/monolithic_host.py): task '{task}' with its own whole
# multimodal model (vision tower + projector + LM) in one process, {instances} instance(s), no sharing.
name: "{task}"
backend: "python"
max_batch_size: 0
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
{ptext}
"""


def write_model(repo: Path, task: str, encode_dir: Path, lm_dir: Path, **kwargs: Any) -> Path:
    """``repo/task/config.pbtxt`` + ``repo/task/1/model.py`` (the one-line shim)."""
    mdir = Path(repo) / task
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    (mdir / "1" / "model.py").write_text(SHIM, encoding="utf-8")
    (mdir / "config.pbtxt").write_text(model_config(task, encode_dir, lm_dir, **kwargs), encoding="utf-8")
    return mdir


@dataclasses.dataclass(eq=False)
class Job:
    sender: Any
    request: Any
    wanted: frozenset[str]
    ids: list[int]
    images: np.ndarray | None
    max_new_tokens: int
    temperature: float
    seed: int | None
    arrival: float


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request: Any, name: str, kind: type) -> Any:
    arr = _input(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {list(arr.shape)}")
    return kind(arr.reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from .encode_host import param, placement  # noqa: PLC0415 - needs Triton (this module's writers do not)

        t0 = time.perf_counter()
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.device, _ = placement(config, self.name)
        enc = read_stage(Path(param(config, "encode_dir", "")), "encode")
        lm = read_stage(Path(param(config, "lm_dir", "")), "lm")
        check_pair(enc.meta, lm.meta)
        self.encoder = EncodeStage(enc, self.device)
        self.lm = LMStage(lm, self.device)
        self.prompt = param(config, "prompt", "")
        self.default_new = int(param(config, "max_new_tokens", "32"))
        self.default_temperature = float(param(config, "temperature", "0"))
        self.max_images = int(param(config, "max_images", "8"))
        self.max_new_limit = int(param(config, "max_new_tokens_limit", "256"))
        self.queue_limit = int(param(config, "queue_limit", "256"))
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running = True
        self._worker = threading.Thread(target=self._loop, name="fmplex-mono", daemon=True)
        self._worker.start()
        pb_utils.Logger.log_info(f"fmplex monolithic {self.name}: {enc.meta['backbone']}, loaded in {time.perf_counter() - t0:.2f}s")

    def finalize(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        self._worker.join(timeout=30)
        with self._cv:
            left, self._queue = list(self._queue), collections.deque()
        for job in left:
            self._error(job.sender, "model is shutting down", pb_utils.TritonError.UNAVAILABLE)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._job(request, sender)
                with self._cv:
                    if len(self._queue) >= self.queue_limit:
                        raise OverflowError(f"{self.name} queue is full ({self.queue_limit} requests)")
                    self._queue.append(job)
                    self._cv.notify()
            except RequestError as exc:
                self._error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            except OverflowError as exc:
                self._error(sender, str(exc), pb_utils.TritonError.UNAVAILABLE)
            except Exception as exc:  # noqa: BLE001 - never leave a request unanswered
                traceback.print_exc()
                self._error(sender, f"internal error: {exc}", pb_utils.TritonError.INTERNAL)
        return None

    def _job(self, request: Any, sender: Any) -> Job:
        arrival = time.monotonic()
        text_arr = _input(request, "TEXT")
        if text_arr is None or text_arr.size != 1:
            raise RequestError(f"TEXT must hold exactly one prompt, got {0 if text_arr is None else text_arr.size}")
        raw = text_arr.reshape(-1)[0]
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise RequestError(f"TEXT is not valid UTF-8 ({exc})") from None
        images = _input(request, "IMAGES")
        n = 0
        if images is not None:
            if images.ndim != 4 or tuple(images.shape[1:]) != self.encoder.image_shape:
                raise RequestError(f"IMAGES must be FP32 [n, {', '.join(map(str, self.encoder.image_shape))}], got {list(images.shape)}")
            n = int(images.shape[0])
            if n > self.max_images:
                raise RequestError(f"{n} images in one request, more than the limit of {self.max_images}")
            if not np.isfinite(images).all():
                raise RequestError("IMAGES contains NaN or Inf")
        max_new = _scalar(request, "MAX_NEW_TOKENS", int)
        max_new = self.default_new if max_new is None else max_new
        if not 1 <= max_new <= self.max_new_limit:
            raise RequestError(f"MAX_NEW_TOKENS must be 1..{self.max_new_limit}, got {max_new}")
        temperature = _scalar(request, "TEMPERATURE", float)
        temperature = self.default_temperature if temperature is None else temperature
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise RequestError(f"TEMPERATURE must be >= 0, got {temperature}")
        try:
            ids = self.lm.tokenizer.encode(self.prompt + text, n)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if len(ids) + max_new > self.lm.max_positions:
            raise RequestError(f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the model's {self.lm.max_positions} positions")
        pixels = np.ascontiguousarray(images, dtype=np.float32) if n else None
        wanted = frozenset(request.requested_output_names())
        return Job(sender, request, wanted, ids, pixels, max_new, float(temperature), _scalar(request, "SEED", int), arrival)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and self._running:
                    self._cv.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - the worker survives any request
                traceback.print_exc()
                self._error(job.sender, f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)

    def _run(self, job: Job) -> None:
        if job.request.is_cancelled():
            self._error(job.sender, "request cancelled", pb_utils.TritonError.CANCELLED)
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
        tensors = [pb_utils.Tensor(k, v) for k, v in values.items() if k in wanted]
        try:
            job.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 - e.g. the client went away
            pb_utils.Logger.log_warn(f"fmplex monolithic {self.name}: could not send a response: {exc}")

    def _error(self, sender: Any, message: str, code: Any) -> None:
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001
            pb_utils.Logger.log_warn(f"fmplex monolithic {self.name}: could not send an error: {exc}")
