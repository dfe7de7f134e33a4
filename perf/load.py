"""Load for the baseline benchmark: arrival processes, a multi-task driver, statistics.

The arrival processes and statistics are pure (seeded, no clock, no client)
so they are unit tested; :class:`Driver` sends the requests with tritonclient's
gRPC async API, which lets one Python process keep a few hundred requests per
second in flight on two cores without a thread per request.

Workloads (all over N tasks with weights):
- closed loop: ``concurrency`` requests outstanding per task, each completion
  sends the next (saturation throughput, fairness);
- open loop Poisson: exponential gaps at a fixed total rate, task drawn by
  weight (latency vs offered load);
- bursty: a two-state Markov-modulated Poisson process (bursts of
  ``burst_factor`` x the base rate), the same mean rate as Poisson;
- trace replay: rows ``timestamp_s,task,size`` from a CSV file.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of the run
    task: str
    size: int = 1  # rows (sentences) in the request


# --- arrival processes (pure) -----------------------------------------------------


def _pick(tasks: Sequence[str], weights: Sequence[float], rng: random.Random) -> str:
    return rng.choices(list(tasks), weights=list(weights))[0]


def poisson(rate: float, duration: float, tasks: Sequence[str], weights: Sequence[float] | None = None, seed: int = 0) -> list[Arrival]:
    """Open-loop Poisson arrivals at ``rate`` requests/s in total; task by weight."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be > 0")
    rng = random.Random(seed)
    weights = weights or [1.0] * len(tasks)
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(Arrival(t, _pick(tasks, weights, rng)))
        t += rng.expovariate(rate)
    return out


def bursty(
    rate: float,
    duration: float,
    tasks: Sequence[str],
    weights: Sequence[float] | None = None,
    burst_factor: float = 4.0,
    burst_share: float = 0.2,
    mean_burst_s: float = 0.5,
    seed: int = 0,
) -> list[Arrival]:
    """A Markov-modulated Poisson process with mean rate ``rate``.

    The process spends ``burst_share`` of the time in bursts at
    ``burst_factor`` x the quiet rate; quiet and burst periods are
    exponential (mean ``mean_burst_s`` for a burst). Same mean load as
    :func:`poisson`, much worse tails for a server without headroom.
    """
    if not 0 < burst_share < 1 or burst_factor < 1:
        raise ValueError("need 0 < burst_share < 1 and burst_factor >= 1")
    rng = random.Random(seed)
    weights = weights or [1.0] * len(tasks)
    quiet_rate = rate / (1 - burst_share + burst_share * burst_factor)
    mean_quiet_s = mean_burst_s * (1 - burst_share) / burst_share
    out: list[Arrival] = []
    t, burst = 0.0, False
    while t < duration:
        period_end = min(duration, t + rng.expovariate(1 / (mean_burst_s if burst else mean_quiet_s)))
        r = quiet_rate * (burst_factor if burst else 1.0)
        t += rng.expovariate(r)
        while t < period_end:
            out.append(Arrival(t, _pick(tasks, weights, rng)))
            t += rng.expovariate(r)
        t, burst = period_end, not burst
    return out


def write_trace(path: Path, arrivals: Iterable[Arrival]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp_s", "task", "size"])
        for a in arrivals:
            w.writerow([f"{a.at:.6f}", a.task, a.size])
    return path


def read_trace(path: Path, tasks: Sequence[str] | None = None) -> list[Arrival]:
    """A trace file (``timestamp_s,task,size``), sorted, times from the first row.

    Task names not in ``tasks`` are refused with the line number, so a replay
    never silently drops requests.
    """
    out = []
    with open(path, newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            try:
                a = Arrival(float(row["timestamp_s"]), row["task"].strip(), int(row.get("size") or 1))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: need timestamp_s,task,size ({exc})") from None
            if a.size < 1 or not math.isfinite(a.at):
                raise ValueError(f"{path}:{n}: size must be >= 1 and the timestamp finite")
            if tasks is not None and a.task not in tasks:
                raise ValueError(f"{path}:{n}: unknown task '{a.task}' (deployed: {', '.join(tasks)})")
            out.append(a)
    out.sort(key=lambda a: a.at)
    t0 = out[0].at if out else 0.0
    return [dataclasses.replace(a, at=a.at - t0) for a in out]


# --- statistics (pure) -------------------------------------------------------------


@dataclasses.dataclass
class Record:
    task: str
    sent: float  # seconds from the start of the run
    latency_s: float | None  # None = failed
    size: int = 1
    error: str = ""


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """Percentiles in ms of latencies in s (``inf`` allowed: the lower rank wins
    where numpy's interpolation would compute inf - inf)."""
    if not values:
        return {f"p{q:g}_ms": float("nan") for q in qs}
    arr = np.sort(np.asarray(values, dtype=float)) * 1e3
    out = {}
    for q in qs:
        pos = (len(arr) - 1) * q / 100.0
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        a, b = arr[lo], arr[hi]
        out[f"p{q:g}_ms"] = float(a if hi == lo or a == b else (b if math.isinf(b) else a + (b - a) * (pos - lo)))
    return out


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0 or not np.any(v):
        return float("nan")
    return float(v.sum() ** 2 / (len(v) * (v**2).sum()))


def summarize(records: Sequence[Record], window: tuple[float, float], *, timeout_s: float = math.inf, slo_s: float = math.inf) -> dict[str, object]:
    """What one workload measured, every sent request counted.

    - ``offered_rps``: requests sent in ``window`` per second of the window;
    - ``throughput_rps``: answered requests per second of the time it took to
      answer them (an overloaded server's last answers come after the window,
      so this is its capacity, not the offer);
    - ``goodput_rps``: the same, counting only answers within ``slo_s``;
    - ``shed_share``: share of the sent requests that got no answer (shed at
      a queue limit, refused, timed out);
    - ``p50_ms/p90_ms/p99_ms``: over every sent request, a shed or failed one
      counting as ``timeout_s`` (the client's deadline; ``inf`` when none), so
      a deployment cannot improve its tail by dropping requests;
      ``answered_p*_ms``: over the answered ones only, for reference.
    """
    lo, hi = window
    inside = [r for r in records if lo <= r.sent < hi]
    ok = [r for r in inside if r.latency_s is not None]
    last = max((r.sent + (r.latency_s or 0.0) for r in ok), default=hi)
    span = max(hi - lo, last - lo, 1e-9)

    def one(rs: list[Record], all_rs: list[Record]) -> dict[str, object]:
        lat = [r.latency_s for r in rs if r.latency_s is not None]
        failed = len(all_rs) - len(rs)
        return {
            "sent": len(all_rs),
            "answered": len(rs),
            "failed": failed,
            "shed_share": failed / len(all_rs) if all_rs else 0.0,
            "offered_rps": len(all_rs) / max(hi - lo, 1e-9),
            "throughput_rps": len(rs) / span,
            "goodput_rps": sum(x <= slo_s for x in lat) / span,
            "rows_per_s": sum(r.size for r in rs) / span,
            **percentiles(lat + [timeout_s] * failed),
            **{f"answered_{k}": v for k, v in percentiles(lat).items()},
        }

    tasks = sorted({r.task for r in records})
    return {
        **one(ok, inside),
        "timeout_ms": timeout_s * 1e3,
        "slo_ms": slo_s * 1e3,
        "per_task": {t: one([r for r in ok if r.task == t], [r for r in inside if r.task == t]) for t in tasks},
        "errors": sorted({r.error for r in inside if r.error})[:5],
    }


def spread(values: Sequence[float]) -> dict[str, object]:
    """Median, min and max of a figure's repetitions (NaNs left out, kept in ``values``)."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if not math.isnan(v)]
    if not finite:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "values": vals}
    return {"median": float(np.median(finite)), "min": min(finite), "max": max(finite), "values": vals}


def rotations(items: Sequence[str], repetitions: int) -> list[list[str]]:
    """The order of ``items`` in each repetition: rotated by one each time, so
    every item runs in every position (first, after a cold machine; last,
    after the others heated it) as often as the repetitions allow."""
    items = list(items)
    n = max(len(items), 1)
    return [items[r % n :] + items[: r % n] for r in range(repetitions)]


def pick_best(results: dict[str, dict[str, float]], key: str = "p99_ms") -> str:
    """The setting with the lowest ``key`` (ties: the higher ``goodput_rps``); a NaN never wins."""
    if not results:
        raise ValueError("no settings to pick from")

    def rank(name: str) -> tuple[float, float]:
        v = results[name].get(key, float("nan"))
        return (math.inf if v is None or math.isnan(v) else v, -(results[name].get("goodput_rps") or 0.0))

    return min(results, key=rank)


# --- the driver (real clients) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a deployment's tasks answer: gRPC url, model per task, and
    whether its models batch (Triton's batcher wants a leading batch dim)."""

    name: str
    grpc_url: str
    models: dict[str, str]  # task -> Triton model name
    batch_dim: bool = False
    output: str = "LOGITS"


class Driver:
    """Sends requests to one deployment with tritonclient gRPC (async API)."""

    def __init__(self, target: Target, sentences: Sequence[str], timeout_s: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient  # noqa: PLC0415 - only the driver needs a client

        self._grpc = grpcclient
        self.target = target
        self.sentences = list(sentences)
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(target.grpc_url)
        self._lock = threading.Lock()
        self._inputs: dict[int, list] = {}

    def close(self) -> None:
        self.client.close()

    def _request(self, size: int, k: int) -> list:
        rows = [self.sentences[(k + i) % len(self.sentences)] for i in range(size)]
        data = np.array([s.encode() for s in rows], dtype=np.object_)
        if self.target.batch_dim:
            data = data.reshape(1, -1)
        inp = self._grpc.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        return [inp]

    def _send(self, task: str, size: int, k: int, t0: float, records: list[Record], done: Callable[[], None] | None) -> None:
        sent = time.perf_counter()
        outputs = [self._grpc.InferRequestedOutput(self.target.output)]

        def callback(result: object, error: object) -> None:
            now = time.perf_counter()
            rec = Record(task, sent - t0, None if error is not None else now - sent, size, "" if error is None else str(error)[:200])
            with self._lock:
                records.append(rec)
            if done is not None:
                done()

        try:
            self.client.async_infer(
                self.target.models[task], self._request(size, k), callback=callback, outputs=outputs,
                client_timeout=self.timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - a refused send is a failed request, not a crash
            with self._lock:
                records.append(Record(task, sent - t0, None, size, f"send: {exc}"[:200]))
            if done is not None:
                done()

    def open_loop(self, arrivals: Sequence[Arrival], drain_s: float = 30.0) -> list[Record]:
        """Send each arrival at its time whatever is outstanding; wait for all."""
        records: list[Record] = []
        left = threading.Semaphore(0)
        t0 = time.perf_counter()
        for k, a in enumerate(arrivals):
            delay = a.at - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            self._send(a.task, a.size, k, t0, records, left.release)
        deadline = time.perf_counter() + drain_s + self.timeout_s
        for _ in arrivals:
            if not left.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                break
        with self._lock:
            return list(records)

    def closed_loop(self, concurrency: dict[str, int], duration: float, size: int = 1) -> list[Record]:
        """``concurrency[task]`` requests outstanding per task for ``duration`` s."""
        records: list[Record] = []
        t0 = time.perf_counter()
        stop_at = t0 + duration
        outstanding = threading.Semaphore(0)
        counter = iter(range(10**12))

        def loop(task: str) -> Callable[[], None]:
            def again() -> None:
                if time.perf_counter() < stop_at:
                    self._send(task, size, next(counter), t0, records, again)
                else:
                    outstanding.release()

            return again

        total = 0
        for task, c in concurrency.items():
            for _ in range(c):
                loop(task)()
                total += 1
        for _ in range(total):
            outstanding.acquire(timeout=duration + self.timeout_s + 5)
        with self._lock:
            return list(records)
