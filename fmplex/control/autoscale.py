"""Per-stage autoscaling: a pure policy, a metrics collector, and the loop.

Each stage host (``fm.minilm``, a multimodal model's encoder or LM stage ...)
scales on its own, within its bounds, fast up and slow down:

* **Policy** (pure, unit-tested on recorded and simulated series): from a
  stage's samples -- arrivals/s, service seconds per request, queue depth,
  busy seconds, current instances -- it estimates the load in instances'
  worth of work. *Up*: when the last ``up_samples`` samples are hot and
  either a queue has built up or the smoothed load stays over the up
  threshold -- or at once on one sample with a deep queue -- it jumps
  straight to what the load needs at the target utilisation plus draining
  the queue (several steps at once, at most ``max_step_up``). Queue depth
  counts as seconds of queued work per instance, so one threshold suits a
  millisecond encoder and a seconds-long decode stage alike. *Down*: one
  instance at a time, only when every sample of the last ``down_window_s``
  says one fewer instance would still run below ``down_utilization`` with an
  empty queue, and at least ``down_cooldown_s`` after the last change. The
  gap between the up threshold and the utilisation after a step down is the
  hysteresis that keeps a noisy flat load from flapping.
* **Collector**: turns two scrapes of Triton's Prometheus metrics into a
  sample per stage: Triton's own per-model counters
  (``nv_inference_request_success``, ``nv_inference_queue_duration_us``,
  ``nv_inference_compute_infer_duration_us``, ``nv_inference_pending_request_count``)
  and, where the host publishes them, fmplex's (``fmplex_task_received_total``,
  ``fmplex_task_queue_depth``, ``fmplex_batch_seconds_total``,
  ``fmplex_task_served_requests_total``, or ``fmplex_task_responses_total``
  with outcome ``ok``; a multimodal encode stage's
  ``fmplex_mm_encode_seconds_total``). An fmplex host answers from its own
  queue after ``execute()`` has returned, so Triton's queue and compute times
  of the host do not see its real wait and service time: the fmplex metrics
  win where present.
* **Loop** (``fmplex autoscale``): polls every few seconds, decides, and calls
  :func:`fmplex.control.scale.scale` for each stage whose count should change.
"""

from __future__ import annotations

import dataclasses
import math
import time
import urllib.request
from collections import deque
from typing import Callable, Iterable, Mapping, Sequence

from fmplex.prometheus import Series
from fmplex.prometheus import parse_prometheus as _parse

# --- samples and the policy (pure) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """One stage over one polling interval."""

    t: float  # end of the interval (seconds, any monotonic origin)
    instances: int  # instances serving during the interval
    arrivals_per_s: float
    service_s: float | None  # mean busy seconds per request (None: nothing served, unknown)
    queue_depth: float = 0.0  # requests waiting at the end of the interval
    busy_s_per_s: float | None = None  # busy seconds per second, all instances together
    workers: float = 1.0  # batches one instance runs at once (an fmplex host: one worker per core)


@dataclasses.dataclass(frozen=True)
class Bounds:
    min: int = 1
    max: int = 4

    def __post_init__(self) -> None:
        if self.min < 1 or self.max < self.min:
            raise ValueError(f"bounds need 1 <= min <= max, got {self.min}:{self.max}")

    def clamp(self, n: int) -> int:
        return max(self.min, min(self.max, n))


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    target_utilization: float = 0.6  # what a scale-up aims for
    up_utilization: float = 0.85  # above this (for up_samples samples): scale up
    down_utilization: float = 0.5  # one fewer instance must stay below this to scale down
    up_backlog_s: float = 0.5  # queued work (seconds per instance) that counts as overload
    burst_backlog_s: float = 2.0  # one sample with this much queued work is enough to scale up
    queue_per_instance: float = 8.0  # ... in requests, while the service time is still unknown
    burst_queue_per_instance: float = 32.0
    drain_s: float = 5.0  # a scale-up sizes instances to drain the queue within this
    up_samples: int = 2  # consecutive hot samples before scaling up
    up_cooldown_s: float = 5.0  # after a change, before another scale-up (let the new instances start)
    down_window_s: float = 60.0  # sustained low load before scaling down
    down_cooldown_s: float = 60.0  # after any change, before a scale-down
    max_step_up: int = 4  # at most this many instances added at once
    service_ewma: float = 0.3  # weight of the newest service-time estimate
    load_tau_s: float = 20.0  # time constant of the smoothed load (sustained heat, not a spike)

    def __post_init__(self) -> None:
        if not 0 < self.down_utilization < self.target_utilization <= self.up_utilization:
            raise ValueError("need 0 < down_utilization < target_utilization <= up_utilization")
        if not 0 < self.service_ewma <= 1 or self.load_tau_s < 0:
            raise ValueError("need 0 < service_ewma <= 1 and load_tau_s >= 0")
        if self.up_samples < 1 or self.max_step_up < 1:
            raise ValueError("up_samples and max_step_up must be at least 1")


@dataclasses.dataclass(frozen=True)
class Decision:
    stage: str
    current: int
    desired: int
    reason: str
    utilization: float | None = None  # load per instance over the last sample
    needed: float | None = None  # instances a scale-up sized for (None: no scale-up considered)

    @property
    def change(self) -> int:
        return self.desired - self.current


class StagePolicy:
    """The decisions for one stage; feed it samples in time order.

    Load is measured in busy seconds per second (workers' worth of work):
    arrivals x service time, or the measured busy time when that is higher (a
    saturated stage serves less than arrives); utilisation is load over
    instances x workers per instance. Load is independent of the instance
    count, so samples from before a change still say what the load
    was. A scale-up needs the last ``up_samples`` samples at the current count
    hot *and* either the smoothed load (time constant ``load_tau_s``) over the
    threshold or a queue: an overload builds a queue within one interval and
    is answered at once (a deep queue even on one sample), while a stage
    running hot without a queue -- no harm to latency yet -- must stay hot for
    about ``load_tau_s``, which keeps noise from triggering it. The new count
    serves the load at the target utilisation and drains the queue within
    ``drain_s``.
    """

    def __init__(self, stage: str, bounds: Bounds, config: PolicyConfig = PolicyConfig()) -> None:
        self.stage, self.bounds, self.config = stage, bounds, config
        self.samples: deque[Sample] = deque()
        self.service_s: float | None = None  # smoothed
        self.load: float | None = None  # smoothed load, instances' worth of work
        self.last_change_t: float | None = None

    def load_of(self, s: Sample) -> float:
        return max(s.arrivals_per_s * (self.service_s or 0.0), s.busy_s_per_s or 0.0)

    def utilization(self, s: Sample) -> float:
        """Load per instance over one sample."""
        return self.load_of(s) / (max(1, s.instances) * s.workers)

    def needed(self, s: Sample, load: float | None = None) -> float:
        """Instances that serve ``load`` (default: the sample's) at the target
        utilisation and drain the sample's queue within ``drain_s``."""
        c = self.config
        drain = s.queue_depth * (self.service_s or 0.0) / c.drain_s
        return ((self.load_of(s) if load is None else load) + drain) / (c.target_utilization * s.workers)

    def _deep(self, s: Sample, seconds: float, requests: float) -> bool:
        """Is the queue deeper than ``seconds`` of work per instance (``requests``
        per instance while no service time is known)?"""
        n = max(1, s.instances)
        if self.service_s:
            return s.queue_depth * self.service_s / (n * s.workers) > seconds
        return s.queue_depth > requests * n

    def _hot(self, s: Sample) -> bool:
        c = self.config
        return self.utilization(s) > c.up_utilization or self._deep(s, c.up_backlog_s, c.queue_per_instance)

    def _cool(self, s: Sample, n: int) -> bool:
        """Would ``n - 1`` instances have served this sample comfortably?"""
        if n <= 1 or s.queue_depth > 0.5:
            return False
        return self.load_of(s) / ((n - 1) * s.workers) < self.config.down_utilization

    def observe(self, sample: Sample) -> Decision:
        c = self.config
        if sample.service_s is not None and sample.service_s > 0:
            self.service_s = sample.service_s if self.service_s is None else (
                c.service_ewma * sample.service_s + (1 - c.service_ewma) * self.service_s
            )
        load = self.load_of(sample)
        if self.load is None or not self.samples:
            self.load = load
        else:
            dt = max(0.0, sample.t - self.samples[-1].t)
            w = 1.0 - math.exp(-dt / c.load_tau_s) if c.load_tau_s > 0 else 1.0
            self.load = w * load + (1 - w) * self.load
        self.samples.append(sample)
        while self.samples and self.samples[0].t < sample.t - (c.down_window_s + 60.0):
            self.samples.popleft()
        n = sample.instances
        util = self.utilization(sample)

        def decide(desired: int, reason: str, need: float | None = None) -> Decision:
            if desired != n:
                self.last_change_t = sample.t
            return Decision(self.stage, n, desired, reason, util, need)

        if n < self.bounds.min or n > self.bounds.max:
            return decide(self.bounds.clamp(n), f"outside bounds {self.bounds.min}..{self.bounds.max}")
        since = math.inf if self.last_change_t is None else sample.t - self.last_change_t

        # Only samples taken at the current count (after the last change) vote
        # for a scale-up: the interval that triggered one, or the one in which
        # new instances drained the backlog, must not trigger a second.
        settled = [s for s in self.samples if s.instances == n and (self.last_change_t is None or s.t > self.last_change_t)]
        recent = settled[-c.up_samples :]
        burst = self._deep(sample, c.burst_backlog_s, c.burst_queue_per_instance)
        hot = len(recent) == c.up_samples and all(self._hot(s) for s in recent) and (
            self.load / (n * sample.workers) > c.up_utilization or self._deep(sample, c.up_backlog_s, c.queue_per_instance)
        )
        if (burst or hot) and n < self.bounds.max:
            # Size on the smoothed load, or on what every sample of the hot window
            # carried when that is more (a step up that the smoothing still lags);
            # the queue term carries a burst's urgency.
            floor = min(self.load_of(s) for s in recent) if len(recent) == c.up_samples else 0.0
            need = self.needed(sample, max(self.load, floor))
            if since < c.up_cooldown_s:
                return decide(n, f"hot, waiting {c.up_cooldown_s - since:.0f}s for the last change to settle", need)
            desired = self.bounds.clamp(min(max(n + 1, math.ceil(need - 1e-9)), n + c.max_step_up))
            what = "queue burst" if burst else f"utilisation {self.load / (n * sample.workers):.2f} > {c.up_utilization:.2f}"
            return decide(desired, f"{what}; needs {need:.1f}", need)

        window = [s for s in self.samples if s.t > sample.t - c.down_window_s]
        covered = bool(window) and (sample.t - window[0].t) >= c.down_window_s - self._interval()
        if n > self.bounds.min and covered and all(self._cool(s, n) for s in window):
            if since < c.down_cooldown_s:
                return decide(n, f"low, cooling down {c.down_cooldown_s - since:.0f}s more")
            return decide(n - 1, f"low for {c.down_window_s:.0f}s: {n - 1} would run at < {c.down_utilization:.2f}")
        return decide(n, "steady")

    def _interval(self) -> float:
        """Typical spacing of samples (tolerance when checking the window is covered)."""
        if len(self.samples) < 2:
            return 0.0
        return (self.samples[-1].t - self.samples[0].t) / (len(self.samples) - 1)


def replay(
    stage: str, series: Iterable[Sample], bounds: Bounds, config: PolicyConfig = PolicyConfig(), follow: bool = True
) -> list[Decision]:
    """Run the policy over a recorded series. ``follow``: each sample's instance
    count is replaced by the previous decision (as if the decisions were applied
    and took effect by the next sample); otherwise the recorded counts stand."""
    policy = StagePolicy(stage, bounds, config)
    out: list[Decision] = []
    current: int | None = None
    for s in series:
        if follow and current is not None and s.instances != current:
            s = dataclasses.replace(s, instances=current)
        d = policy.observe(s)
        out.append(d)
        current = d.desired
    return out


# --- the collector: Prometheus text -> samples ------------------------------------

PREFIXES = ("nv_inference_", "fmplex_")


def parse_prometheus(text: str, prefixes: tuple[str, ...] = PREFIXES) -> Series:
    """Triton's and the hosts' metric families of a Prometheus text."""
    return _parse(text, prefixes)


TRITON_METRICS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_pending_request_count",
)


def scrape(metrics_url: str, timeout: float = 5.0) -> Series:
    with urllib.request.urlopen(metrics_url, timeout=timeout) as resp:
        return parse_prometheus(resp.read().decode("utf-8", "replace"))


def _sum(series: Series, name: str, **labels: str) -> float | None:
    vals = [v for (n, ls), v in series.items() if n == name and all((k, x) in ls for k, x in labels.items())]
    return sum(vals) if vals else None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    t: float
    series: Series


def stage_sample(stage: str, prev: Snapshot, cur: Snapshot, instances: int, workers: float = 1.0) -> Sample | None:
    """The sample of ``stage`` between two scrapes (None: the stage is not in the metrics).
    ``workers``: batches one instance runs at once (busy time per instance can reach it)."""
    dt = cur.t - prev.t
    if dt <= 0:
        return None

    def delta(name: str, **labels: str) -> float | None:
        a, b = _sum(prev.series, name, **labels), _sum(cur.series, name, **labels)
        if b is None:
            return None
        d = b - (a or 0.0)
        return d if d >= 0 else b  # a counter that went backwards was reset (host reloaded)

    def first(*candidates: tuple[str, ...], **labels: str) -> float | None:
        """The first candidate present; a candidate of several names sums them."""
        for names in candidates:
            parts = [delta(n, **labels) for n in names]
            if any(p is not None for p in parts):
                return sum(p or 0.0 for p in parts)
        return None

    # fmplex host metrics (labelled host=<stage>): the text host, or a
    # multimodal stage host (encoder forwards; LM prefill + decode).
    received = delta("fmplex_task_received_total", host=stage)
    busy = first(
        ("fmplex_batch_seconds_total",),
        ("fmplex_mm_encode_seconds_total",),
        ("fmplex_mm_prefill_seconds_total", "fmplex_mm_decode_seconds_total"),
        host=stage,
    )
    served = delta("fmplex_task_served_requests_total", host=stage)
    if served is None:
        served = delta("fmplex_task_responses_total", host=stage, outcome="ok")
    queue = _sum(cur.series, "fmplex_task_queue_depth", host=stage)
    # Triton's own, labelled model=<stage>
    success = delta("nv_inference_request_success", model=stage)
    compute_us = delta("nv_inference_compute_infer_duration_us", model=stage)
    queue_us = delta("nv_inference_queue_duration_us", model=stage)
    pending = _sum(cur.series, "nv_inference_pending_request_count", model=stage)
    if received is None and success is None:
        return None
    arrivals = (received if received is not None else success or 0.0) / dt
    if served is None:
        served = success
    service: float | None = None
    if busy is not None and served:
        service = busy / served
    elif compute_us is not None and success:
        service = compute_us / success / 1e6
    depth = (queue or 0.0) + (pending or 0.0)
    if queue is None and queue_us is not None and success:
        # No host queue gauge: Little's law on Triton's own queue time.
        depth = max(depth, arrivals * queue_us / success / 1e6)
    return Sample(
        t=cur.t,
        instances=instances,
        arrivals_per_s=arrivals,
        service_s=service,
        queue_depth=depth,
        busy_s_per_s=None if busy is None else busy / dt,
        workers=workers,
    )


# --- the loop --------------------------------------------------------------------


@dataclasses.dataclass
class Autoscaler:
    """Polls metrics, decides per stage, applies the changes.

    ``instances_of(stage)``, ``workers_of(stage)`` (batches an instance runs at
    once) and ``apply(stage, n)`` are injected (the CLI wires them to the gRPC
    API and :func:`scale.scale`); ``scrape_fn`` returns the current metrics.
    ``dry_run``: decide and report, change nothing.
    """

    stages: Mapping[str, Bounds]
    scrape_fn: Callable[[], Series]
    instances_of: Callable[[str], int]
    apply: Callable[[str, int], object]
    config: PolicyConfig = PolicyConfig()
    workers_of: Callable[[str], float] = lambda _stage: 1.0
    dry_run: bool = False
    echo: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.policies = {name: StagePolicy(name, b, self.config) for name, b in self.stages.items()}
        self._prev: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        return Snapshot(self.clock(), self.scrape_fn())

    def step(self) -> list[Decision]:
        """One poll: the decisions since the previous poll (none on the first)."""
        cur = self.snapshot()
        prev, self._prev = self._prev, cur
        if prev is None:
            return []
        decisions = []
        for name, policy in self.policies.items():
            try:
                n = self.instances_of(name)
            except Exception as exc:  # noqa: BLE001 - one stage's trouble must not stop the others
                self.echo(f"{name}: cannot read its instance count: {exc}")
                continue
            sample = stage_sample(name, prev, cur, n, self.workers_of(name))
            if sample is None:
                self.echo(f"{name}: no metrics for this stage")
                continue
            last_change = policy.last_change_t
            d = policy.observe(sample)
            decisions.append(d)
            self.echo(format_decision(d, sample, policy))
            if not d.change:
                continue
            if self.dry_run:  # nothing changes: no cooldown either
                policy.last_change_t = last_change
                continue
            try:
                result = self.apply(name, d.desired)
                summary = getattr(result, "summary", None)
                self.echo(f"  {summary() if callable(summary) else result if result is not None else f'{name} -> {d.desired}'}")
            except Exception as exc:  # noqa: BLE001 - report; the next poll decides again
                policy.last_change_t = last_change
                self.echo(f"  scaling {name} to {d.desired} failed: {exc}")
        return decisions

    def run(self, interval: float, once: bool = False, sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll every ``interval`` seconds (``once``: one decision, then return).
        Ctrl-C (KeyboardInterrupt) propagates to the caller, which stops cleanly."""
        self.step()
        while True:
            sleep(interval)
            self.step()
            if once:
                return


def format_decision(d: Decision, s: Sample, policy: StagePolicy) -> str:
    svc = f"{1e3 * policy.service_s:.1f}ms" if policy.service_s else "-"
    util = f"{d.utilization:.2f}" if d.utilization is not None else "-"
    arrow = f"-> {d.desired}" if d.change else "keep"
    return (
        f"{time.strftime('%H:%M:%S')} {d.stage}: n={d.current} rate={s.arrivals_per_s:.1f}/s svc={svc} "
        f"util={util} queue={s.queue_depth:.0f} {arrow} ({d.reason})"
    )


def parse_stage(spec: str, default_bounds: Bounds = Bounds()) -> tuple[str, Bounds]:
    """``NAME`` or ``NAME:MIN:MAX`` (a command-line ``--stage``)."""
    parts = spec.split(":")
    if len(parts) == 1 and parts[0]:
        return parts[0], default_bounds
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"a stage is NAME or NAME:MIN:MAX, got '{spec}'")
    try:
        return parts[0], Bounds(int(parts[1]), int(parts[2]))
    except ValueError as exc:
        raise ValueError(f"stage '{spec}': {exc}") from None


def parse_stages(specs: Sequence[str], default_bounds: Bounds = Bounds()) -> dict[str, Bounds]:
    out: dict[str, Bounds] = {}
    for spec in specs:
        name, b = parse_stage(spec, default_bounds)
        if name in out:
            raise ValueError(f"stage '{name}' given twice")
        out[name] = b
    return out
