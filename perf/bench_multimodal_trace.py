"""Staged multimodal serving vs one monolithic model per task, on the same trace (issue 6, part 4).

Two deployments of the same K tasks on the same ``llava-tiny`` weights, each a
real tritonserver started here on a fresh repository (free ports, always
stopped), measured one after the other with the same client and the same
requests:

- ``staged``: the model split into the ``encode`` and ``lm`` stage hosts, the
  K tasks as multimodal vFMs (ensembles) on the lm stage; text-only requests
  skip the encoder, images of all tasks share encoder batches. fmplex's
  autoscaler (``fmplex.control.autoscale``, the policy + Prometheus collector
  that ``fmplex autoscale`` runs) scales each stage on its own, within its
  bounds (encode 1..2, lm 1..3, starting at the minimum), while the trace
  plays: one loop per stage in this process, polling every second, applying
  :func:`fmplex.control.scale.scale` (the instance count changed in place
  through Triton's load API). Its time constants are shortened to fit a
  one-minute trace (see ``policy()``).
- ``monolithic``: what a team deploys today -- one Triton Python model per
  task holding the whole pipeline (vision tower + projector + LM, loaded from
  the same stage files; ``fmplex/baselines/monolithic.py``), one
  instance each, fixed.

**The trace** is ``fmplex.trace`` (after the Azure LMM trace: bursty MMPP
arrivals, a text-only share drifting from 70% to 30%, Zipf images per request
and task popularity, lognormal token counts), seeded, with every task taking
both text and image requests. Its rows become requests for these tiny models:
``context_tokens / 8`` bytes of prompt text (4..128), ``generated_tokens / 8``
new tokens (1..32, greedy), ``num_images`` random 32x32 images (at most 4),
deterministic per request, identical for both deployments. The replay is open
loop (each request sent at its time whatever is outstanding) with
tritonclient's gRPC async API; after a warm-up of two requests per task.

**Figures** per deployment: throughput (answered requests/s and generated
tokens/s over the replay), end-to-end latency p50/p99 overall and for
text-only vs image requests, time to first token (TTFT) and time per output
token (TPOT), instances over time per stage (Triton's instance count, polled
twice a second) and instance-seconds as the cost, memory (PSS of tritonserver
+ its stub processes, peak), server CPU seconds, failures (reported, never
dropped). Both hosts answer a request with one final response (not a stream),
so both report ``TIMING_MS`` = [queue, first token, total] measured inside the
host from the request's arrival (``fmplex.multimodal.interface.TIMING_FIELDS``)
and the client derives

    TTFT = client end-to-end - (server total - server first token)
    TPOT = (server total - server first token) / (tokens - 1)   (requests with >= 2 tokens)

i.e. the time the host spent decoding after the first token is taken off the
latency the client saw (network, Triton, queueing and prefill stay in TTFT).

**Reading the figures.** Throughput is the offered load whenever both keep
up (open loop); the differences are in latency and cost. Structural facts
behind them: an lm stage instance runs the generative engine (continuous
batching: sequences of all tasks prefill and decode in shared steps), while
the monolithic deployment always has K workers, each decoding one sequence at
a time (and K processes get K shares of a contended CPU from the kernel's
scheduler); a scale-up starts a
stub process (imports torch and transformers: seconds of CPU) on the same
CPUs that are already overloaded, and the autoscaler decides after ``up_samples``
hot polls. The cost side -- instance-seconds, memory -- is where staging wins:
one encoder and one LM copy serve all K tasks. ``other jobs' CPU`` says how
much of the machine other processes took during each replay: compare runs by it.

Writes ``perf/results/multimodal_trace.json`` and ``multimodal_trace.png``
(latency CDFs, p99 over time with the offered load, instances per stage over
time) and prints the side-by-side table with ratios (staged / monolithic).

    python perf/bench_multimodal_trace.py [--quick] [--repeat N] [--tasks 4] [--rate 12] [--seed S] [--lm-min 1]
                                          [--before CHECKOUT]

``--before CHECKOUT`` adds a third deployment, ``staged-before``: the same
staged repository served by the hosts of another checkout of fmplex (for
example ``git worktree add /tmp/fmplex-before <commit>``), so that a change to
the stage hosts is measured before and after in one run, on the same trace.

On a shared machine run it when it is quiet, or with ``--repeat N`` (the
deployments alternate; the table shows medians), and read the ratios more than
the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fmplex import trace  # noqa: E402
from fmplex.control import autoscale as auto  # noqa: E402
from fmplex.control import serving  # noqa: E402
from fmplex.control.scale import current_instances, scale, stub_processes  # noqa: E402
from fmplex.control import server  # noqa: E402
from fmplex.control.server import TritonProcess, free_ports  # noqa: E402
from fmplex.control.triton_api import Triton  # noqa: E402
from fmplex.baselines import monolithic_config  # noqa: E402
from fmplex.control import workflows  # noqa: E402
from fmplex.families import multimodal as control  # noqa: E402
from fmplex.multimodal.interface import TIMING_FIELDS  # noqa: E402
from fmplex.multimodal.models import get_multimodal  # noqa: E402
from perf.common import RESULTS, cpu_seconds, process_tree, server_memory, write_results  # noqa: E402

BACKBONE = "llava-tiny"
DEPLOYMENTS = ("staged", "monolithic")
BEFORE = "staged-before"  # the staged deployment served by another checkout of the code (--before)
IMAGE_SHAPE = (3, 32, 32)
WINDOW_S = 5.0  # time windows of the per-window series (plots, p99 over time)


def log(msg: str) -> None:
    print(msg, flush=True)


# --- the benchmark's settings ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    tasks: int = 4
    # the trace (fmplex.trace.TraceConfig, scaled to a minute)
    duration_s: float = 75.0
    calm_rate: float = 12.0  # requests/s while calm (about one lm instance's worth in a burst, on 2 CPUs)
    burst_factor: float = 4.0
    mean_calm_s: float = 25.0
    mean_burst_s: float = 15.0
    seed: int = 5  # with the defaults: bursts at ~19-33 s and ~50-62 s, calm in between
    max_images: int = 4
    # trace rows -> requests for the tiny models
    context_per_byte: int = 8  # context_tokens / this = prompt bytes
    prompt_bytes: tuple[int, int] = (4, 128)
    generated_per_token: int = 8  # generated_tokens / this = MAX_NEW_TOKENS
    max_new_tokens: int = 32
    # the staged deployment's autoscaler
    autoscale: bool = True
    encode_bounds: tuple[int, int] = (1, 2)
    lm_bounds: tuple[int, int] = (1, 3)
    interval_s: float = 1.0
    down_window_s: float = 12.0
    timeout_s: float = 120.0  # per request (client)
    lm_params: tuple[tuple[str, str], ...] = ()  # lm stage host parameters set over 'fmplex init's (--lm-param)

    @staticmethod
    def quick(**kw: Any) -> BenchConfig:
        """~25 s of trace with one burst (~10-22 s)."""
        base = dict(duration_s=25.0, mean_calm_s=10.0, mean_burst_s=6.0, seed=7, down_window_s=6.0)
        return BenchConfig(**{**base, **kw})


def task_names(k: int) -> list[str]:
    return [f"mm{i}" for i in range(k)]


def task_prompt(i: int) -> str:
    return f"Task {i}. USER: "


def policy(cfg: BenchConfig) -> auto.PolicyConfig:
    """The autoscaler's policy with its time constants scaled to a one-minute
    trace: the defaults are for bursts of minutes (60 s down window and
    cooldown, 20 s load smoothing, 0.5 s of queued work per instance before a
    queue alone counts as overload). Here a burst lasts ~10 s and a request
    ~15 ms: smoothing 2 s, 0.2 s of queued work, ``down_window_s`` for both the
    down window and the cooldown. Everything else is the policy's default."""
    return dataclasses.replace(
        auto.PolicyConfig(), down_window_s=cfg.down_window_s, down_cooldown_s=cfg.down_window_s, load_tau_s=2.0,
        up_backlog_s=0.2,
    )  # fmt: skip


# --- the requests --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    index: int
    at: float  # seconds from the start of the replay
    task: str
    text: str
    max_new_tokens: int
    images: np.ndarray | None  # [n, 3, 32, 32] float32

    @property
    def n_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])


def trace_config(cfg: BenchConfig) -> trace.TraceConfig:
    names = tuple(task_names(cfg.tasks))
    return trace.TraceConfig(
        duration_s=cfg.duration_s, calm_rate=cfg.calm_rate, burst_factor=cfg.burst_factor,
        mean_calm_s=cfg.mean_calm_s, mean_burst_s=cfg.mean_burst_s, max_images=cfg.max_images,
        text_tasks=names, image_tasks=names,
    )  # fmt: skip


def bursts(cfg: BenchConfig) -> list[tuple[float, float]]:
    """The trace's burst intervals (for the plot): ``trace.generate`` draws the
    arrivals first from the same seeded generator."""
    ts, flags = trace.arrivals(trace_config(cfg), np.random.default_rng(cfg.seed))
    out: list[tuple[float, float]] = []
    before = False
    for t, f in zip(ts, flags):
        if f and not before:
            out.append((float(t), float(t)))
        elif f:
            out[-1] = (out[-1][0], float(t))
        before = bool(f)
    return out


_ALPHABET = np.array(list(b"abcdefghijklmnopqrstuvwxyz  ,.?"), dtype=np.uint8)


def plan(cfg: BenchConfig) -> tuple[list[Item], list[trace.Request]]:
    """The trace and the requests it becomes (deterministic in ``cfg.seed``)."""
    rows = trace.generate(trace_config(cfg), seed=cfg.seed)
    items = []
    lo, hi = cfg.prompt_bytes
    for i, r in enumerate(rows):
        rng = np.random.default_rng([cfg.seed, i])
        n_bytes = int(min(hi, max(lo, round(r.context_tokens / cfg.context_per_byte))))
        text = bytes(rng.choice(_ALPHABET, n_bytes)).decode("ascii")
        new = int(min(cfg.max_new_tokens, max(1, round(r.generated_tokens / cfg.generated_per_token))))
        n = min(r.num_images, cfg.max_images)
        images = rng.standard_normal((n, *IMAGE_SHAPE)).astype(np.float32) if n else None
        items.append(Item(i, r.timestamp_s, r.task, text, new, images))
    return items, rows


# --- the deployments ---------------------------------------------------------------------


@dataclasses.dataclass
class Deployment:
    name: str
    repo: Path
    models: dict[str, str]  # task -> Triton model the client calls
    stages: list[str]  # models whose instances are counted (the cost)
    autoscaled: dict[str, auto.Bounds]  # stage -> bounds (empty: fixed)
    start: Callable[[Path, Any, Path], TritonProcess]
    code: Path | None = None  # the stage hosts run this checkout's fmplex instead of the installed one


@contextlib.contextmanager
def serving_code(code: Path | None) -> Iterator[None]:
    """While a server starts: its stage hosts' backend shims import fmplex from ``code``.

    The Python backend stub runs an isolated interpreter (PYTHONPATH is ignored),
    so the shim itself puts ``code`` first on ``sys.path`` before it imports the host.
    """
    if code is None:
        yield
        return
    saved = dict(server.MULTIMODAL_SHIMS)
    prelude = f"import sys\nsys.path.insert(0, {str(code)!r})\n"
    try:
        server.MULTIMODAL_SHIMS.update({name: prelude + shim for name, shim in saved.items()})
        yield
    finally:
        server.MULTIMODAL_SHIMS.update(saved)


def set_parameters(config: Path, values: dict[str, str]) -> None:
    """Set string ``parameters`` of a written ``config.pbtxt`` (replacing a key's entry or adding it)."""
    text = config.read_text(encoding="utf-8")
    for key, value in values.items():
        entry = f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'
        text, n = re.subn(rf'parameters \{{ key: "{re.escape(key)}" value \{{ string_value: "[^"]*" \}} \}}', lambda _, e=entry: e, text)
        if not n:
            text = text.rstrip("\n") + "\n" + entry + "\n"
    config.write_text(text, encoding="utf-8")


def _start_staged(repo: Path, ports: Any, log_path: Path) -> TritonProcess:
    return serving.start(repo, ports, log_path=log_path, ready_timeout=600)  # hosts, then the vFMs, as 'fmplex serve'


def _start_monolithic(repo: Path, ports: Any, log_path: Path) -> TritonProcess:
    names = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())
    return TritonProcess(repo, ports, load=names, log_path=log_path).launch(timeout=600)


def prepare(work: Path, cfg: BenchConfig, before: Path | None = None) -> dict[str, Deployment]:
    """Both repositories: the staged one as a user builds it (``fmplex init /
    task create / deploy``), the monolithic one on the same stage files. With
    ``before`` (a checkout of an earlier version of fmplex), a third
    deployment serves the same staged repository with that code's hosts."""
    spec = get_multimodal(BACKBONE)
    names = task_names(cfg.tasks)
    staged = work / "staged-repo"
    places = control.placements("shared")  # both stages on all CPUs, each starting at its lower bound
    places["encode"] = dataclasses.replace(places["encode"], instances=cfg.encode_bounds[0])
    places["lm"] = dataclasses.replace(places["lm"], instances=cfg.lm_bounds[0])
    control.init_multimodal(staged, BACKBONE, places, slots=max(8, cfg.tasks))
    if cfg.lm_params:
        set_parameters(staged / spec.lm_model / "config.pbtxt", dict(cfg.lm_params))
    for i, name in enumerate(names):
        workflows.create_task(staged, name, BACKBONE, options=dict(prompt=task_prompt(i), max_new_tokens=cfg.max_new_tokens))
        workflows.deploy(staged, [name])
    mono = work / "monolithic-repo"
    for i, name in enumerate(names):
        monolithic_config.write_model(
            mono, name, staged / spec.encode_model / "1", staged / spec.lm_model / "1",
            prompt=task_prompt(i), max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
    bounds = {spec.encode_model: auto.Bounds(*cfg.encode_bounds), spec.lm_model: auto.Bounds(*cfg.lm_bounds)}
    return {
        "staged": Deployment("staged", staged, {n: n for n in names}, [spec.encode_model, spec.lm_model],
                             bounds if cfg.autoscale else {}, _start_staged),
        "monolithic": Deployment("monolithic", mono, {n: n for n in names}, list(names), {}, _start_monolithic),
        **({BEFORE: Deployment(BEFORE, staged, {n: n for n in names}, [spec.encode_model, spec.lm_model],
                               bounds if cfg.autoscale else {}, _start_staged, before)} if before is not None else {}),
    }  # fmt: skip


# --- the replay (open loop, gRPC async) ------------------------------------------------------


@dataclasses.dataclass
class Record:
    index: int
    task: str
    n_images: int
    sent: float  # seconds from the replay's start
    e2e_s: float | None = None  # None: failed
    tokens: list[int] | None = None
    timing_ms: list[float] | None = None  # TIMING_FIELDS
    error: str = ""

    @property
    def decode_ms(self) -> float | None:
        return None if self.timing_ms is None else self.timing_ms[2] - self.timing_ms[1]

    @property
    def ttft_s(self) -> float | None:
        if self.e2e_s is None or self.decode_ms is None:
            return None
        return self.e2e_s - self.decode_ms / 1e3

    @property
    def tpot_ms(self) -> float | None:
        if self.decode_ms is None or not self.tokens or len(self.tokens) < 2:
            return None
        return self.decode_ms / (len(self.tokens) - 1)


def _inputs(mod: Any, item: Item) -> list[Any]:
    text = mod.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([item.text.encode()], dtype=np.object_))
    new = mod.InferInput("MAX_NEW_TOKENS", [1], "INT32")
    new.set_data_from_numpy(np.array([item.max_new_tokens], dtype=np.int32))
    out = [text, new]
    if item.images is not None:
        im = mod.InferInput("IMAGES", list(item.images.shape), "FP32")
        im.set_data_from_numpy(item.images)
        out.append(im)
    return out


class Replayer:
    """Sends each item at its time (open loop) with tritonclient's gRPC async API."""

    def __init__(self, url: str, models: dict[str, str], timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self.mod = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.models = models
        self.timeout_s = timeout_s
        self.outputs = [grpcclient.InferRequestedOutput("TOKEN_IDS"), grpcclient.InferRequestedOutput("TIMING_MS")]
        self.lag_s: list[float] = []

    def close(self) -> None:
        self.client.close()

    def warm(self, tasks: Sequence[str], cfg: BenchConfig) -> None:
        """One text-only and one image request per task, answered before the replay."""
        rng = np.random.default_rng(12345)
        for task in tasks:
            for n in (0, 1):
                images = rng.standard_normal((n, *IMAGE_SHAPE)).astype(np.float32) if n else None
                item = Item(-1, 0.0, task, "warm up", cfg.max_new_tokens, images)
                self.client.infer(self.models[task], _inputs(self.mod, item), outputs=self.outputs, client_timeout=self.timeout_s)

    def prepare(self, items: Sequence[Item]) -> list[tuple[Item, list[Any]]]:
        """The requests serialized ahead (not on the replay's clock)."""
        return [(item, _inputs(self.mod, item)) for item in items]

    def run(self, prepared: Sequence[tuple[Item, list[Any]]], clock: Callable[[], float]) -> list[Record]:
        records: list[Record] = []
        lock = threading.Lock()
        left = threading.Semaphore(0)

        def send(item: Item, inputs: list[Any]) -> None:
            rec = Record(item.index, item.task, item.n_images, clock())

            def done(result: Any, error: Any) -> None:
                now = clock()
                if error is not None:
                    rec.error = str(error)[:300]
                else:
                    try:
                        rec.tokens = [int(x) for x in result.as_numpy("TOKEN_IDS").reshape(-1)]
                        rec.timing_ms = [float(x) for x in result.as_numpy("TIMING_MS").reshape(-1)]
                        rec.e2e_s = now - rec.sent
                    except Exception as exc:  # noqa: BLE001 - a malformed answer is a failure
                        rec.error = f"bad answer: {exc}"
                with lock:
                    records.append(rec)
                left.release()

            try:
                self.client.async_infer(self.models[item.task], inputs, callback=done, outputs=self.outputs, client_timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - a refused send is a failed request
                done(None, f"send: {exc}")

        for item, inputs in prepared:
            delay = item.at - clock()
            if delay > 0:
                time.sleep(delay)
            self.lag_s.append(max(0.0, clock() - item.at))
            send(item, inputs)
        deadline = time.monotonic() + self.timeout_s + 30
        for _ in prepared:
            if not left.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        with lock:
            got = {r.index for r in records}
            missing = [Record(it.index, it.task, it.n_images, it.at, error="no answer") for it, _ in prepared if it.index not in got]
            return sorted(records + missing, key=lambda r: r.index)


# --- watching the server: instances, processes, memory; the autoscaler -----------------------


class Monitor(threading.Thread):
    """Polls each stage's instance count (Triton's model config) twice a second,
    and its stub processes and the server's memory every ``slow`` polls."""

    def __init__(self, url: str, repo: Path, stages: list[str], pid: int, clock: Callable[[], float], period: float = 0.5,
                 slow: int = 4) -> None:  # fmt: skip
        super().__init__(name="bench-monitor", daemon=True)
        self.url, self.repo, self.stages, self.pid, self.clock = url, repo, stages, pid, clock
        self.period, self.slow = period, slow
        self.instances: list[tuple[float, dict[str, int]]] = []
        self.processes: list[tuple[float, dict[str, int]]] = []
        self.memory: list[tuple[float, float]] = []  # (t, PSS MiB)
        self.halt = threading.Event()

    def sample(self, triton: Triton, slow: bool) -> None:
        t = self.clock()
        counts = {}
        for s in self.stages:
            try:
                counts[s] = current_instances(triton, s)
            except Exception:  # noqa: BLE001 - during a load the config may be briefly unreadable
                counts[s] = self.instances[-1][1].get(s, 0) if self.instances else 0
        self.instances.append((t, counts))
        if slow:
            self.processes.append((t, {s: len(stub_processes(s, self.repo)) for s in self.stages}))
            self.memory.append((t, server_memory(self.pid)["pss_mib"]))

    def run(self) -> None:
        with Triton(self.url) as triton:
            k = 0
            while True:
                self.sample(triton, k % self.slow == 0)
                k += 1
                if self.halt.wait(self.period):
                    self.sample(triton, True)
                    return


class StageScaler(threading.Thread):
    """fmplex's autoscaler on one stage (its own loop, so that a scale of one
    stage, which takes seconds, never delays the other's decisions)."""

    def __init__(self, url: str, metrics_url: str, repo: Path, stage: str, bounds: auto.Bounds, config: auto.PolicyConfig,
                 interval: float, clock: Callable[[], float]) -> None:  # fmt: skip
        super().__init__(name=f"bench-autoscale-{stage}", daemon=True)
        self.url, self.metrics_url, self.repo, self.stage = url, metrics_url, repo, stage
        self.bounds, self.config, self.interval, self.clock = bounds, config, interval, clock
        self.events: list[dict[str, Any]] = []
        self.decisions: list[str] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with Triton(self.url, timeout=300) as triton:

            def apply(name: str, n: int) -> Any:
                t0 = self.clock()
                log(f"    [{t0:6.1f}s] autoscaler: {name} -> {n} ...")
                res = scale(triton, name, n, repository=self.repo)
                self.events.append({"t_s": round(t0, 2), "done_s": round(self.clock(), 2), "stage": name, "from": res.before,
                                    "to": res.after, "load_s": round(res.seconds, 2), "in_place": res.in_place})  # fmt: skip
                log(f"    [{self.clock():6.1f}s] {res.summary()}")
                return res

            scaler = auto.Autoscaler(
                {self.stage: self.bounds},
                scrape_fn=lambda: auto.scrape(self.metrics_url),
                instances_of=lambda name: current_instances(triton, name),
                apply=apply,
                config=self.config,
                echo=lambda line: self.decisions.append(f"{self.clock():.1f}s {line}"),
            )
            while True:
                try:
                    scaler.step()
                except Exception as exc:  # noqa: BLE001 - report and keep polling
                    self.errors.append(f"{self.clock():.1f}s {type(exc).__name__}: {exc}"[:300])
                if self.halt.wait(self.interval):
                    return


@dataclasses.dataclass
class RunResult:
    name: str
    records: list[Record]
    instances: list[tuple[float, dict[str, int]]]
    processes: list[tuple[float, dict[str, int]]]
    memory: list[tuple[float, float]]
    events: list[dict[str, Any]]
    decisions: list[str]
    autoscale_errors: list[str]
    ready_s: float
    replay_s: float
    cpu_s: float
    send_lag_s: list[float]
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    import resource  # noqa: PLC0415

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_deployment(dep: Deployment, items: Sequence[Item], cfg: BenchConfig, work: Path) -> RunResult:
    """Start the deployment's server, warm it, replay the items, stop it (always)."""
    ports = free_ports()
    log_path = work / f"{dep.name}-tritonserver.log"
    t0 = time.perf_counter()
    with serving_code(dep.code):
        proc = dep.start(dep.repo, ports, log_path)
    ready_s = time.perf_counter() - t0
    log(f"  {dep.name}: server ready in {ready_s:.1f}s ({', '.join(dep.stages)})")
    url = f"127.0.0.1:{ports.grpc}"
    origin = [time.perf_counter()]

    def clock() -> float:
        return time.perf_counter() - origin[0]

    scalers: list[StageScaler] = []
    monitor: Monitor | None = None
    try:
        assert proc.proc is not None
        replayer = Replayer(url, dep.models, cfg.timeout_s)
        replayer.warm(sorted(dep.models), cfg)
        prepared = replayer.prepare(items)
        monitor = Monitor(url, dep.repo, dep.stages, proc.proc.pid, clock)
        cpu0 = sum(cpu_seconds(process_tree(proc.proc.pid)).values())
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        origin[0] = time.perf_counter()
        monitor.start()
        for stage, bounds in dep.autoscaled.items():
            scalers.append(StageScaler(url, f"http://127.0.0.1:{ports.metrics}/metrics", dep.repo, stage, bounds, policy(cfg),
                                       cfg.interval_s, clock))  # fmt: skip
            scalers[-1].start()
        records = replayer.run(prepared, clock)
        replay_s = clock()
        cpu_s = sum(cpu_seconds(process_tree(proc.proc.pid)).values()) - cpu0
        client_s = own_cpu_s() - own0
        # Busy CPU that was neither this server nor this client: other jobs on a shared machine (noise).
        other_s = max(0.0, busy_cpu_s() - busy0 - cpu_s - client_s)
        replayer.close()
    finally:
        for s in scalers:
            s.halt.set()
        for s in scalers:
            s.join(timeout=180)
        if monitor is not None:
            monitor.halt.set()
            monitor.join(timeout=30)
        proc.stop()
    return RunResult(
        dep.name, records, monitor.instances, monitor.processes, monitor.memory,
        sorted((e for s in scalers for e in s.events), key=lambda e: e["t_s"]),
        [d for s in scalers for d in s.decisions],
        [e for s in scalers for e in s.errors], ready_s, replay_s, cpu_s, replayer.lag_s, client_s, other_s,
    )  # fmt: skip


# --- figures -------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float, scale_: float = 1e3) -> float | None:
    return round(float(np.percentile(np.asarray(values, dtype=float), q)) * scale_, 2) if len(values) else None


def step_integral(series: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Integral of a step function (value held from each sample to the next) over [lo, hi]."""
    total = 0.0
    for (t, v), nxt in zip(series, series[1:] + [(hi, 0.0)]):
        a, b = max(t, lo), min(nxt[0], hi)
        if b > a:
            total += v * (b - a)
    return total


def figures(res: RunResult, items: Sequence[Item], timeout_s: float = BenchConfig.timeout_s) -> dict[str, Any]:
    """A failed or refused request counts as the client timeout in the
    end-to-end and TTFT percentiles (``*_answered_*``: answered ones only,
    beside them): a deployment that refuses what it cannot serve in time
    must not look faster for it."""
    ok = [r for r in res.records if r.e2e_s is not None]
    failed = [r for r in res.records if r.e2e_s is None]
    span = max([r.sent + (r.e2e_s or 0.0) for r in ok] + [items[-1].at if items else 1.0])

    def lat(rs: Sequence[Record]) -> list[float]:
        return [r.e2e_s if r.e2e_s is not None else timeout_s for r in rs]

    e2e = lat(res.records)
    text = lat([r for r in res.records if r.n_images == 0])
    image = lat([r for r in res.records if r.n_images > 0])
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None] + [timeout_s] * len(failed)
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    queue = [r.timing_ms[0] / 1e3 for r in ok if r.timing_ms]
    tokens = sum(len(r.tokens or []) for r in ok)
    total_series = [(t, float(sum(c.values()))) for t, c in res.instances]
    stage_series = {s: [(t, float(c.get(s, 0))) for t, c in res.instances] for s in (res.instances[0][1] if res.instances else {})}
    inst_s = step_integral(total_series, 0.0, span)
    procs = [(t, float(sum(c.values()))) for t, c in res.processes]
    ups = [e for e in res.events if e["to"] > e["from"]]
    return {
        "requests": len(res.records),
        "answered": len(ok),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "failed_share": round(len(failed) / max(1, len(res.records)), 4),
        "failed_counted_as_ms": round(1e3 * timeout_s, 1),
        "replay_s": round(span, 2),
        "throughput_rps": round(len(ok) / span, 2),
        "tokens_per_s": round(tokens / span, 1),
        "generated_tokens": tokens,
        "e2e_p50_ms": _pct(e2e, 50), "e2e_p99_ms": _pct(e2e, 99),
        "e2e_answered_p50_ms": _pct([r.e2e_s for r in ok], 50), "e2e_answered_p99_ms": _pct([r.e2e_s for r in ok], 99),
        "e2e_text_p50_ms": _pct(text, 50), "e2e_text_p99_ms": _pct(text, 99),
        "e2e_image_p50_ms": _pct(image, 50), "e2e_image_p99_ms": _pct(image, 99),
        "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
        "tpot_p50_ms": _pct(tpot, 50, 1.0), "tpot_p99_ms": _pct(tpot, 99, 1.0),
        "server_queue_p50_ms": _pct(queue, 50), "server_queue_p99_ms": _pct(queue, 99),
        "instance_seconds": round(inst_s, 1),
        "instances_mean": round(inst_s / span, 2) if span else None,
        "instances_max": int(max((v for _, v in total_series), default=0)),
        "instance_seconds_per_stage": {s: round(step_integral(ser, 0.0, span), 1) for s, ser in stage_series.items()},
        "instances_max_per_stage": {s: int(max((v for _, v in ser), default=0)) for s, ser in stage_series.items()},
        # Stub processes (sampled every 2 s): a scaled-up instance's process exists from the scale call on.
        "process_seconds": round(step_integral(procs, 0.0, span), 1),
        "scale_ups": len(ups),
        "scale_downs": sum(e["to"] < e["from"] for e in res.events),
        "scale_up_ready_s": [round(e["done_s"] - e["t_s"], 1) for e in ups],
        "pss_peak_mib": round(max((m for _, m in res.memory), default=0.0), 1),
        "pss_end_mib": round(res.memory[-1][1], 1) if res.memory else None,
        "server_cpu_s": round(res.cpu_s, 1),
        "server_cpu_ms_per_request": round(1e3 * res.cpu_s / max(1, len(ok)), 2),
        "server_ready_s": round(res.ready_s, 1),
        "client_cpu_s": round(res.client_cpu_s, 1),
        "other_jobs_cpu_cores": round(res.other_cpu_s / max(res.replay_s, 1e-9), 2),  # noise: other processes' load meanwhile
        "client_send_lag_p99_ms": _pct(res.send_lag_s, 99),
        "scale_events": res.events,
        "autoscale_errors": res.autoscale_errors[:5],
    }  # fmt: skip


def windows(res: RunResult, duration: float, width: float = WINDOW_S) -> list[dict[str, Any]]:
    """Per window of send time: requests sent, p50/p99 end-to-end, mean instances."""
    out = []
    n = max(1, math.ceil(duration / width))
    for k in range(n):
        lo, hi = k * width, (k + 1) * width
        rs = [r for r in res.records if lo <= r.sent < hi]
        lat = [r.e2e_s for r in rs if r.e2e_s is not None]
        ttft = [r.ttft_s for r in rs if r.ttft_s is not None]
        inst = [sum(c.values()) for t, c in res.instances if lo <= t < hi]
        out.append({
            "t_s": lo, "sent": len(rs), "failed": sum(r.e2e_s is None for r in rs),
            "e2e_p50_ms": _pct(lat, 50), "e2e_p99_ms": _pct(lat, 99), "ttft_p99_ms": _pct(ttft, 99),
            "instances_mean": round(float(np.mean(inst)), 2) if inst else None,
        })  # fmt: skip
    return out


def _changes(samples: list[tuple[float, dict[str, int]]]) -> list[dict[str, Any]]:
    """The samples where a count changed, plus the first and the last."""
    keep: list[tuple[float, dict[str, int]]] = []
    for i, (t, c) in enumerate(samples):
        if not keep or c != keep[-1][1] or i == len(samples) - 1:
            keep.append((t, c))
    return [{"t_s": round(t, 2), **c} for t, c in keep]


def series(res: RunResult) -> dict[str, Any]:
    """Instances per stage (Triton's count) and stub processes over time, as
    changes; the server's PSS every ~2 s."""
    return {
        "instances": _changes(res.instances),
        "stub_processes": _changes(res.processes),
        "pss_mib": [[round(t, 1), round(m, 1)] for t, m in res.memory],
    }


ROWS = (  # (label, key, lower is better; None: not a figure of merit)
    ("requests answered", "answered", False),
    ("failures", "failed", True),
    ("throughput (req/s)", "throughput_rps", False),
    ("generated tokens/s", "tokens_per_s", False),
    ("TTFT p50 (ms)", "ttft_p50_ms", True),
    ("TTFT p99 (ms)", "ttft_p99_ms", True),
    ("TPOT p50 (ms)", "tpot_p50_ms", True),
    ("TPOT p99 (ms)", "tpot_p99_ms", True),
    ("e2e p50 (ms)", "e2e_p50_ms", True),
    ("e2e p99 (ms)", "e2e_p99_ms", True),
    ("e2e p99, answered only (ms)", "e2e_answered_p99_ms", True),
    ("e2e p99 text-only (ms)", "e2e_text_p99_ms", True),
    ("e2e p99 with images (ms)", "e2e_image_p99_ms", True),
    ("server queue p99 (ms)", "server_queue_p99_ms", True),
    ("instances mean / max", None, True),
    ("instance-seconds (cost)", "instance_seconds", True),
    ("scale-ups / downs", "scale_ups", None),
    ("memory PSS peak (MiB)", "pss_peak_mib", True),
    ("server CPU ms / request", "server_cpu_ms_per_request", True),
    ("other jobs' CPU (cores)", "other_jobs_cpu_cores", None),
)


def table(figs: dict[str, dict[str, Any]]) -> str:
    """Side by side, monolithic last, with each staged deployment's ratio to monolithic."""
    mono = figs["monolithic"]
    staged = [n for n in (BEFORE, "staged") if n in figs]
    cols = staged + ["monolithic"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)

    def ratio(x: Any, y: Any) -> str:
        ok = isinstance(x, (int, float)) and isinstance(y, (int, float)) and y
        return f"{x / y:.2f}x" if ok else "-"

    heads = [("staged/mono" if n == "staged" else "before/mono") for n in staged]
    lines = [f"{'':28s} " + " ".join(f"{c:>13s}" for c in cols + heads)]
    for label, key, better in ROWS:
        vals, ratios = [], []
        for n in cols:
            f = figs[n]
            if key == "scale_ups":
                vals.append(f"{f['scale_ups']} / {f['scale_downs']}")
            elif key is None:
                vals.append(f"{f['instances_mean']:g} / {f['instances_max']}")
            else:
                vals.append(fmt(f.get(key)))
        for n in staged:
            f = figs[n]
            if key == "scale_ups":
                ratios.append("-")
            elif key is None:
                ratios.append(ratio(f["instances_mean"], mono["instances_mean"]))
            else:
                ratios.append(ratio(f.get(key), mono.get(key)) if better is not None else "-")
        lines.append(f"{label:28s} " + " ".join(f"{v:>13s}" for v in vals + ratios))
    return "\n".join(lines)


SPREAD_KEYS = ("e2e_p50_ms", "e2e_p99_ms", "ttft_p99_ms", "instance_seconds", "other_jobs_cpu_cores")


def spread(reps: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Over repetitions: [min, max] of the headline figures (the medians' spread)."""
    out = {}
    for key in SPREAD_KEYS:
        values = [r.get(key) for r in reps if isinstance(r.get(key), (int, float))]
        out[key] = [min(values), max(values)] if values else [None, None]
    return out


def _runs(results: dict[str, Any]) -> dict[str, list[RunResult]]:
    """``{name: RunResult or [RunResult, ...]}`` -> lists (repetitions)."""
    return {n: (list(r) if isinstance(r, (list, tuple)) else [r]) for n, r in results.items()}


def notable(decision: str) -> bool:
    """An autoscaler line worth keeping: a change, a failure, or a poll at utilisation >= 0.5."""
    m = re.search(r"util=([0-9.]+)", decision)
    return "keep (steady)" not in decision or (m is not None and float(m.group(1)) >= 0.5)


SUMMED = ("requests", "answered", "failed", "generated_tokens", "scale_ups", "scale_downs")


def median_figures(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Over repetitions: counts summed (requests, failures, scale events), the
    most instances at once, the median of every other number; other values
    listed per repetition."""
    if len(reps) == 1:
        return dict(reps[0])
    out: dict[str, Any] = {}
    for key, _value in reps[0].items():
        values = [r.get(key) for r in reps]
        if key in SUMMED:
            out[key] = sum(values)
        elif key == "instances_max":
            out[key] = max(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = round(float(np.median(values)), 2)
        else:
            out[key] = values
    out["repetitions"] = len(reps)
    return out


def plot(results: dict[str, Any], items: Sequence[Item], cfg: BenchConfig, path: Path) -> Path:
    """The figure; ``results`` maps a deployment to its run or its repetitions
    (the first drawn full, the others fainter)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = _runs(results)
    colors = {"staged": "tab:blue", "monolithic": "tab:orange", BEFORE: "tab:gray"}
    stage_colors = ("tab:green", "tab:purple")
    fig, ax = plt.subplots(2, 2, figsize=(13, 8.5))
    spans = bursts(cfg)
    each = [(name, k, res, 1.0 if k == 0 else 0.35) for name, rs in runs.items() for k, res in enumerate(rs)]

    def lab(text: str, k: int) -> str | None:
        return text if k == 0 else None

    # (a) end-to-end latency CDF: all, text-only, with images
    for name, k, res, alpha in each:
        for label, sel, style in (("all", lambda r: True, "-"), ("text-only", lambda r: r.n_images == 0, ":"),
                                  ("images", lambda r: r.n_images > 0, "--")):  # fmt: skip
            lat = np.sort([1e3 * r.e2e_s for r in res.records if r.e2e_s is not None and sel(r)])
            if len(lat):
                ax[0, 0].plot(lat, np.arange(1, len(lat) + 1) / len(lat), style, color=colors[name], alpha=alpha,
                              label=lab(f"{name} {label}", k))  # fmt: skip
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("end-to-end latency (ms)")
    ax[0, 0].set_ylabel("fraction of requests")
    ax[0, 0].set_title("latency CDF")
    ax[0, 0].legend(fontsize=7)
    # (b) p99 and p50 over time + offered load
    ax2 = ax[0, 1].twinx()
    edges = np.arange(0, cfg.duration_s + WINDOW_S, WINDOW_S)
    ax2.hist([it.at for it in items], bins=edges, color="0.85", weights=np.full(len(items), 1 / WINDOW_S), label="offered req/s")
    ax2.set_ylabel("offered load (req/s)")
    ax[0, 1].set_zorder(ax2.get_zorder() + 1)
    ax[0, 1].patch.set_visible(False)
    for name, k, res, alpha in each:
        w = [x for x in windows(res, cfg.duration_s) if x["e2e_p99_ms"] is not None]
        xs = [x["t_s"] + WINDOW_S / 2 for x in w]
        ax[0, 1].plot(xs, [x["e2e_p99_ms"] for x in w], "o-", color=colors[name], alpha=alpha, label=lab(f"{name} p99", k))
        ax[0, 1].plot(xs, [x["e2e_p50_ms"] for x in w], ".:", color=colors[name], alpha=alpha, label=lab(f"{name} p50", k))
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_xlabel(f"time (s), {WINDOW_S:g} s windows")
    ax[0, 1].set_ylabel("end-to-end latency (ms)")
    ax[0, 1].set_title("latency over the trace (grey: offered load)")
    ax[0, 1].legend(fontsize=7, loc="upper left")
    # (c) instances per stage over time
    for name, k, res, alpha in each:
        if not res.instances:
            continue
        ts = [t for t, _ in res.instances]
        total = [sum(c.values()) for _, c in res.instances]
        ax[1, 0].step(ts, total, where="post", color=colors[name], lw=2, alpha=alpha, label=lab(f"{name}: all instances", k))
        if name == "monolithic":
            continue
        for (stage, color), off in zip(zip(res.instances[0][1], stage_colors), (-0.04, 0.04)):  # offset: visible when equal
            ax[1, 0].step(ts, [c.get(stage, 0) + off for _, c in res.instances], "--", where="post", color=color, alpha=alpha,
                          label=lab(f"{name}: {stage}", k))  # fmt: skip
        if res.processes:
            ax[1, 0].step([t for t, _ in res.processes], [sum(c.values()) for _, c in res.processes], where="post", color="0.5",
                          lw=0.8, alpha=alpha, label=lab(f"{name}: stub processes", k))  # fmt: skip
        for e in res.events:  # when the autoscaler asked (the instance serves once Triton counts it)
            ax[1, 0].axvline(e["t_s"], color="tab:red", ls=":", lw=1, alpha=alpha)
            ax[1, 0].annotate(f"{e['stage'].rsplit('.', 1)[-1]} {e['from']}->{e['to']}", (e["t_s"], 0.3), fontsize=7, rotation=90,
                              color="tab:red", alpha=alpha)  # fmt: skip
    ax[1, 0].set_xlabel("time (s)")
    ax[1, 0].set_ylabel("instances (Triton's count)")
    top = max((sum(c.values()) for rs in runs.values() for r in rs for _, c in r.instances), default=1)
    ax[1, 0].set_ylim(0, top + 2)
    ax[1, 0].set_title("instances over time (red: scale calls)")
    ax[1, 0].legend(fontsize=7, loc="upper left", ncol=2)
    # (d) TTFT CDF
    for name, k, res, alpha in each:
        v = np.sort([1e3 * r.ttft_s for r in res.records if r.ttft_s is not None])
        if len(v):
            ax[1, 1].plot(v, np.arange(1, len(v) + 1) / len(v), color=colors[name], alpha=alpha, label=lab(f"{name} TTFT", k))
    ax[1, 1].set_xscale("log")
    ax[1, 1].set_xlabel("time to first token (ms)")
    ax[1, 1].set_ylabel("fraction of requests")
    ax[1, 1].set_title("TTFT CDF")
    ax[1, 1].legend(fontsize=7)
    for a in (ax[0, 1], ax[1, 0]):
        for lo, hi in spans:
            a.axvspan(lo, hi, color="tab:red", alpha=0.06)
    reps = max(len(rs) for rs in runs.values())
    more = f"; {reps} repetitions, first solid" if reps > 1 else ""
    fig.suptitle(f"{BACKBONE}, {cfg.tasks} tasks, {len(items)} requests over {cfg.duration_s:g} s (red: trace bursts{more})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~25 s of trace instead of ~75 s")
    ap.add_argument("--repeat", type=int, default=1, help="replays per deployment, alternating (the table shows medians)")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rate", type=float, default=None, help="calm arrival rate (requests/s; bursts: x burst factor)")
    ap.add_argument("--burst-factor", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-autoscale", action="store_true", help="staged stages stay at their lower bound")
    ap.add_argument("--lm-min", type=int, default=None, help="fewest lm stage instances (default 1)")
    ap.add_argument("--lm-max", type=int, default=None, help="most lm stage instances (default 3)")
    ap.add_argument("--encode-max", type=int, default=None, help="most encode stage instances (default 2)")
    ap.add_argument("--only", choices=DEPLOYMENTS, default=None, help="run one deployment (no comparison)")
    ap.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                    help="also serve the staged deployment with the fmplex of this checkout (e.g. 'git worktree add "
                         "/tmp/fmplex-before <commit>'): before vs after in one run, same trace and machine")  # fmt: skip
    ap.add_argument("--lm-param", action="append", default=[], metavar="KEY=VALUE",
                    help="set an lm stage host parameter (fmplex.multimodal.lm_host.LMStageSettings) in the staged "
                         "repository, e.g. max_rows=16; repeatable")  # fmt: skip
    ap.add_argument("--out", default="multimodal_trace", help="name of the result files in perf/results/")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.tasks < 1:
        ap.error("--repeat and --tasks must be at least 1")

    kw: dict[str, Any] = {"tasks": args.tasks, "autoscale": not args.no_autoscale}
    for key, value in (("calm_rate", args.rate), ("burst_factor", args.burst_factor), ("seed", args.seed)):
        if value is not None:
            kw[key] = value
    base = BenchConfig.quick() if args.quick else BenchConfig()
    if args.lm_min is not None or args.lm_max is not None:
        lo = base.lm_bounds[0] if args.lm_min is None else args.lm_min
        kw["lm_bounds"] = (lo, max(lo, base.lm_bounds[1]) if args.lm_max is None else args.lm_max)
    if args.encode_max is not None:
        kw["encode_bounds"] = (base.encode_bounds[0], args.encode_max)
    for item in args.lm_param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--lm-param {item!r}: expected KEY=VALUE")
        kw["lm_params"] = (*kw.get("lm_params", ()), (key.strip(), value.strip()))
    cfg = dataclasses.replace(base, **kw)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    items, rows = plan(cfg)
    tsum = trace.summary(rows)
    log(f"trace: {len(items)} requests over {cfg.duration_s:g}s ({tsum.get('rate_per_s', 0):.1f}/s, dispersion "
        f"{tsum.get('dispersion', 0):.1f}), {100 * tsum.get('text_only_share', 0):.0f}% text-only, bursts at "
        + ", ".join(f"{a:.0f}-{b:.0f}s" for a, b in bursts(cfg)))  # fmt: skip
    if args.before is not None and not (args.before / "fmplex" / "__init__.py").is_file():
        ap.error(f"--before {args.before}: not a checkout of fmplex (no fmplex/__init__.py)")
    names = [args.only] if args.only else list(DEPLOYMENTS)
    if args.before is not None:
        names.insert(0, BEFORE)
    runs: dict[str, list[RunResult]] = {n: [] for n in names}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fmplex-mm-trace-") as tmp:
        deps = prepare(Path(tmp), cfg, args.before)
        for k in range(args.repeat):
            for name in names if k % 2 == 0 else names[::-1]:  # alternate, so that a noisy spell does not hit one side only
                log(f"== {name}" + (f" (repetition {k + 1} of {args.repeat})" if args.repeat > 1 else ""))
                res = run_deployment(deps[name], items, cfg, Path(tmp))
                runs[name].append(res)
                f = figures(res, items, cfg.timeout_s)
                log(f"  {name}: {f['answered']}/{f['requests']} answered, {f['failed']} failed, e2e p50/p99 {f['e2e_p50_ms']}/"
                    f"{f['e2e_p99_ms']} ms, instance-seconds {f['instance_seconds']}, other jobs {f['other_jobs_cpu_cores']} cores")  # fmt: skip
    per_rep = {n: [figures(r, items, cfg.timeout_s) for r in rs] for n, rs in runs.items()}
    figs = {n: median_figures(fs) for n, fs in per_rep.items()}
    same: dict[str, Any] | None = None
    if "monolithic" in runs and len(runs) >= 2:
        same = {}
        for name in (n for n in runs if n != "monolithic"):
            compared = identical = 0
            for a_run, b_run in zip(runs[name], runs["monolithic"]):
                a = {r.index: r.tokens for r in a_run.records if r.tokens is not None}
                b = {r.index: r.tokens for r in b_run.records if r.tokens is not None}
                both = set(a) & set(b)
                compared += len(both)
                identical += sum(a[i] == b[i] for i in both)
            same[name] = {"compared": compared, "identical": identical}
    out = {
        "benchmark": "multimodal trace: staged (encode + lm stage hosts, autoscaled) vs monolithic (one whole model per task)",
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},  # fmt: skip
        "config": {**dataclasses.asdict(cfg), "repetitions": args.repeat, "policy": dataclasses.asdict(policy(cfg)),
                   "backbone": BACKBONE, "timing_fields": TIMING_FIELDS},  # fmt: skip
        "trace": {**{k: round(v, 3) for k, v in tsum.items()}, "bursts_s": [[round(a, 1), round(b, 1)] for a, b in bursts(cfg)]},
        "figures": figs,  # medians over the repetitions
        "figures_per_repetition": per_rep if args.repeat > 1 else None,
        "spread": {n: spread(fs) for n, fs in per_rep.items()},  # [min, max] over the repetitions
        "before": str(args.before) if args.before is not None else None,
        "greedy_tokens_staged_vs_monolithic": same,
        "windows": {n: [windows(r, cfg.duration_s) for r in rs] for n, rs in runs.items()},
        "series": {n: [series(r) for r in rs] for n, rs in runs.items()},
        "autoscaler_decisions": {n: [[d for d in r.decisions if notable(d)] for r in rs] for n, rs in runs.items()
                                 if any(r.decisions for r in rs)},  # fmt: skip
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_results(f"{args.out}.json", out)
    png = plot(runs, items, cfg, RESULTS / f"{args.out}.png")
    log(f"== written {png}")
    if "monolithic" in figs and len(figs) >= 2:
        note = f"\n({args.repeat} repetitions: counts summed, max instances the most, other figures medians)" if args.repeat > 1 else ""
        log("\n" + table(figs) + note)
        if args.repeat > 1:
            for n, fs in per_rep.items():
                log(f"  spread (min..max) {n}: " + ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in spread(fs).items() if lo is not None))
        for n, c in (same or {}).items():
            log(f"greedy tokens identical for {c['identical']}/{c['compared']} requests answered by {n} and monolithic")
    for name, fs in per_rep.items():
        for k, f in enumerate(fs):
            for e in f["scale_events"]:
                rep = f" (repetition {k + 1})" if args.repeat > 1 else ""
                log(f"  {name} scale{rep}: {e['t_s']:.1f}s {e['stage']} {e['from']} -> {e['to']} (ready at {e['done_s']:.1f}s)")
    failed = sum(f["failed"] for fs in per_rep.values() for f in fs)
    if failed:
        log(f"!! {failed} request(s) failed: {[f['errors'] for fs in per_rep.values() for f in fs if f['errors']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
