"""A discrete-event simulation of the cluster: how many tasks R GPUs host within a p99 SLO.

It uses the placement and routing policy of the real cluster
(:class:`fmplex.cluster.placement.PlacementPolicy`) and compares two ways of
serving the same tasks:

- ``shared``: one backbone copy per replica (one replica per GPU); tasks
  are placed by measured load (or by count), within bytes and slots;
  requests of all tasks on a replica are batched together, and hot tasks get
  extra replicas.
- ``per_task``: one model copy per task. A GPU holds as many copies as its
  memory allows and runs one batch at a time from any of them (work-conserving
  co-location, the kinder of the two classic baselines; a static split of the
  GPU would do worse); a batch holds requests of one task only. The same
  policy places the copies, and a hot task's extra replica is one more copy.

Costs are inputs (:class:`Costs`). By default they are this repository's
single-thread CPU measurements of MiniLM; pass a GPU's figures to get a GPU's
answer. Task rates follow a Zipf mix, as in the trace generator. The simulation
is pure and deterministic for a seed: it reads no clock and imports neither Ray
nor Triton.

``perf/bench_cluster.py`` replays a real three-node run in it (``trace`` and
``placement``) to calibrate it. That run shares one machine's few CPUs
between every process, so there the servers share ``Costs.cpus`` instead of
owning a processor each, and the client, proxy and ingress are modelled as
stages of the request's path. Until its p99 matches a run on a quiet machine,
the larger figures are estimates (docs/scaling-out.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import random
import sys
from collections import deque
from typing import Literal

from .cpus import Bursts, Dedicated, Job, Processors, Sharing
from .placement import Placement, PlacementError, PlacementPolicy, Release, ReplicaState, TaskInfo

Mode = Literal["shared", "per_task"]


@dataclasses.dataclass(frozen=True)
class Costs:
    """What one GPU (one replica) can do, what things weigh, and what else a request passes through.

    ``throughput`` maps batch sizes to sequences/s of one backbone copy
    (linear in between, flat beyond the last); with ``cpus`` set, read it as
    sequences per CPU-second. ``overhead_s`` is latency every request pays
    without taking anybody's time (network hops). ``path_in`` and
    ``path_out`` are the single-threaded stages a request passes on its way
    to a replica and back (a real cluster's client, proxy and ingress), as
    (name, seconds of work per request); a name in both is the same server,
    so both directions queue there. ``cpus`` says whether servers own their
    processor: None (the cluster figure: a GPU per replica, stages not
    modelled unless given) or a number of CPUs that all servers' work shares
    (processor sharing, at most one CPU per server: the single machine of
    the calibration run), of which work off every request's path takes
    ``background_cpus``, and other work on a shared machine what
    ``background_trace`` says it took: (from second, CPUs) steps. How they
    share them is a model of :mod:`fmplex.cluster.cpus`: processor sharing
    (a busy server runs at min(1, CPUs left / busy servers)), or, with
    ``bursts`` ((server, mean seconds per burst); "replica" for every
    replica, "background" for work off the path), short bursts in one run
    queue, each joining it ``wake_s`` after it is ready, sliced at
    ``quantum_s``.

    A replica runs ``workers`` batches at once (a host's worker threads),
    which together take at most ``replica_cpus`` CPUs (one Python process's
    interpreter lock) under processor sharing. ``service_spread`` (factors
    of mean 1) varies each batch's work by a draw from it: a measured spread
    of service times. ``interleave_stages`` lets a path stage serve requests
    side by side (an event loop) instead of one at a time.

    With ``handoff_s`` or ``gil_wait_s`` set, a request also passes two
    hand-offs of its replica, one request at a time each: in, before the
    replica's queue (the host's ``execute()`` thread), and out, after its
    batch (the host's response-sender thread); each is ``handoff_s`` of work.
    A hand-off that finds a worker of its replica running a batch first
    waits ``gil_wait_s`` for the interpreter lock (CPython's switch
    interval: a thread that wants it waits that long before it makes the
    holder let go).

    The defaults are MiniLM, one CPU thread, 11-token sentences, as measured
    in this repository; memory is the backbone's fp32 weights and a
    classifier head's artifact.
    """

    throughput: tuple[tuple[int, float], ...] = ((1, 100.0), (16, 320.0))
    device_bytes: int = 16 * 2**30
    backbone_bytes: int = 90 * 2**20
    task_bytes: int = 4 * 2**10
    max_batch: int = 16
    slots: int = 256
    overhead_s: float = 0.0
    path_in: tuple[tuple[str, float], ...] = ()
    path_out: tuple[tuple[str, float], ...] = ()
    cpus: float | None = None
    background_cpus: float = 0.0
    background_trace: tuple[tuple[float, float], ...] = ()
    bursts: tuple[tuple[str, float], ...] = ()
    service_spread: tuple[float, ...] = ()
    workers: int = 1
    replica_cpus: float = 1.0
    wake_s: float = 0.0
    interleave_stages: bool = False
    quantum_s: float = 0.003
    handoff_s: float = 0.0
    gil_wait_s: float = 0.0

    def seqs_per_s(self, batch: int) -> float:
        points = sorted(self.throughput)
        if batch <= points[0][0]:
            return points[0][1] * batch / points[0][0] if batch < points[0][0] else points[0][1]
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            if batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        return points[-1][1]

    def batch_seconds(self, batch: int, share: float = 1.0) -> float:
        """Time one copy with ``share`` of a GPU takes for a batch."""
        return batch / self.seqs_per_s(batch) / share

    def copies_per_gpu(self) -> int:
        """One-copy-per-task: how many model copies (backbone + one task) one device's memory holds."""
        return self.device_bytes // (self.backbone_bytes + self.task_bytes)

    def tasks_per_gpu(self) -> int:
        """Shared: how many tasks one replica holds (memory after the one backbone, and slots)."""
        return min(self.slots, (self.device_bytes - self.backbone_bytes) // max(1, self.task_bytes))


@dataclasses.dataclass(frozen=True)
class Workload:
    tasks: int
    rate_per_task: float = 2.0  # mean requests/s of a task; the Zipf mix skews it
    zipf_s: float = 1.0
    duration_s: float = 20.0
    warmup_s: float = 2.0
    seed: int = 0

    def rates(self) -> list[float]:
        weights = [1.0 / (i + 1) ** self.zipf_s for i in range(self.tasks)]
        total = sum(weights)
        return [self.tasks * self.rate_per_task * w / total for w in weights]


@dataclasses.dataclass
class Result:
    mode: str
    gpus: int
    tasks: int
    hosted: bool  # every task found room
    p99_ms: float
    p50_ms: float
    completed: int
    replica_load: list[float]  # requests served per second, per server
    # where the measured requests' time went (ms, p50 and p99 of each): before the replica (the path
    # in), at the replica (its queue and batch), after it (the path out, and ``overhead_s``)
    stages: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    rows_per_batch: list[float] = dataclasses.field(default_factory=list)  # per replica
    batch_ms: list[float] = dataclasses.field(default_factory=list)  # per replica: a batch's mean wall time
    # shared CPUs: seconds each server (replica index, or stage name) had work but no CPU to run it on
    cpu_wait_s: dict[str, float] = dataclasses.field(default_factory=dict)
    slowest_at: list[float] = dataclasses.field(default_factory=list)  # when the slowest 1% arrived (s)
    # seconds of work each server (replica index, or stage name) was given: what a replay of a real run's
    # own CPU costs scales against the CPU time its processes took
    work_s: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Server:
    """A replica (batches) or a path stage (one request at a time)."""

    sid: int
    share: float
    tasks: set[str]
    queue: deque[list] = dataclasses.field(default_factory=deque)
    running: int = 0  # jobs of this server on a processor now
    served: int = 0
    batches: int = 0
    batch_seconds: float = 0.0  # wall time of the batches it finished
    cpu_wait: float = 0.0
    work: float = 0.0  # seconds of work it was given


Placing = Literal["rate", "count"]


def _task_load(mode: Mode, rate: float, costs: Costs) -> float:
    """A task's measured load: its rate times what one request costs a replica, as a share of one
    replica's time. Shared replicas batch across tasks (the full-batch cost); a task's own copy
    batches only its own requests (the batch-1 cost)."""
    return rate / costs.seqs_per_s(costs.max_batch if mode == "shared" else 1)


def _initial_placement(
    mode: Mode, gpus: int, names: list[str], rates: list[float], costs: Costs, policy: PlacementPolicy, placing: Placing
) -> list[list[int]] | None:
    """Which servers hold each task at the start (None: some task finds no room).

    ``rate``: the policy's :meth:`~PlacementPolicy.plan` by measured load, in
    both modes (one copy per task places copies of backbone + task bytes; a
    hot task's extra copy is one more whole copy). ``count``: the first-use
    :meth:`~PlacementPolicy.place` in task order (shared), round robin (one
    copy per task).
    """
    if mode == "shared":
        budget, slots, nbytes = costs.device_bytes - costs.backbone_bytes, costs.slots, costs.task_bytes
    else:
        budget, slots, nbytes = costs.device_bytes, max(1, costs.copies_per_gpu()), costs.backbone_bytes + costs.task_bytes
    states = [ReplicaState(f"r{g:04d}", "fm", budget, slots) for g in range(gpus)]
    holders: list[list[int]] = [[] for _ in names]
    if placing == "count" and mode == "per_task":
        if costs.copies_per_gpu() * gpus < len(names):
            return None
        return [[i % gpus] for i in range(len(names))]
    try:
        if placing == "rate":
            infos = [TaskInfo(n, "fm", nbytes, load=_task_load(mode, r, costs)) for n, r in zip(names, rates)]
            decisions = policy.plan(infos, states)
        else:
            decisions, index = [], {s.replica: i for i, s in enumerate(states)}
            for n in names:
                p = policy.place(TaskInfo(n, "fm", nbytes), states)
                if p.evict:  # only fits by evicting another task: the cluster is full
                    return None
                st = states[index[p.replica]]
                states[index[p.replica]] = dataclasses.replace(st, tasks={**st.tasks, n: nbytes})
                decisions.append(p)
    except PlacementError:
        return None
    position = {n: i for i, n in enumerate(names)}
    for p in decisions:
        holders[position[p.task]].append(int(p.replica[1:]))
    return holders


def simulate(
    mode: Mode,
    gpus: int,
    work: Workload,
    costs: Costs = Costs(),
    policy: PlacementPolicy = PlacementPolicy(),
    placement: list[int] | None = None,
    trace: list[tuple[float, int]] | None = None,
    placing: Placing = "rate",
) -> Result:
    """One run. ``placement`` (shared mode) puts task i on replica ``placement[i]``
    instead of asking the policy, and ``trace`` ((time s, task i) arrivals)
    replaces the Poisson arrivals: together they replay a real run, request by
    request. ``placing`` picks how the policy places tasks (see
    :func:`_initial_placement`)."""
    names = [f"t{i:05d}" for i in range(work.tasks)]
    rates = work.rates()
    if placement is not None:
        where = [[g] for g in placement]
    else:
        found = _initial_placement(mode, gpus, names, rates, costs, policy, placing)
        if found is None:
            return Result(mode, gpus, work.tasks, False, math.inf, math.inf, 0, [])
        where = found
    servers = [_Server(g, 1.0, set()) for g in range(gpus)]
    holders: dict[str, list[int]] = {}
    for n, gs in zip(names, where):
        holders[n] = list(gs)
        for g in gs:
            servers[g].tasks.add(n)
    stage_ids: dict[str, int] = {}
    for name, _sec in costs.path_in + costs.path_out:
        if name not in stage_ids:
            stage_ids[name] = len(servers)
            servers.append(_Server(len(servers), 1.0, set()))
    stage_names = {sid: name for name, sid in stage_ids.items()}
    handoffs = costs.handoff_s > 0 or costs.gil_wait_s > 0
    # each replica's hand-offs in and out (its host's execute() and response-sender threads): steps -2 and -3
    hand_in: dict[int, int] = {}
    hand_out: dict[int, int] = {}
    if handoffs:
        for g in range(gpus):
            for table, side in ((hand_in, "in"), (hand_out, "out")):
                table[g] = len(servers)
                stage_names[len(servers)] = f"{g}/{side}"
                servers.append(_Server(len(servers), 1.0, set()))
    hand_out_ids = set(hand_out.values())
    handoff_ids = set(hand_in.values()) | hand_out_ids
    at_replica = [(-2, costs.handoff_s), (-1, 0.0), (-3, costs.handoff_s)] if handoffs else [(-1, 0.0)]
    steps: list[tuple[int, float]] = [(stage_ids[n], s) for n, s in costs.path_in] + at_replica + [(stage_ids[n], s) for n, s in costs.path_out]
    gil_waits: dict[int, tuple[_Server, list]] = {}  # token: a hand-off waiting for its replica's interpreter lock

    rng = random.Random(work.seed)
    spread_rng = random.Random(work.seed + 1)
    # events: (time, order, kind, a, b); kind 0: the processors' own (a: their token, b: version),
    # 1: arrival (a: task), 2: placement tick, 3: other work's CPUs change (a: step), 4: a hand-off got the
    # interpreter lock (a: token)
    events: list[tuple[float, int, int, str | int, int]] = []
    order = 0

    def push(at: float, kind: int, a: str | int, b: int) -> None:
        nonlocal order
        heapq.heappush(events, (at, order, kind, a, b))
        order += 1

    if trace is None:
        for n, rate in zip(names, rates):
            push(rng.expovariate(rate), 1, n, -1)
    else:
        for at, i in trace:
            push(at, 1, names[i], -1)
    if mode == "shared":
        push(1.0, 2, "", -1)
    if costs.cpus is not None:
        for k, (at, _cpus) in enumerate(costs.background_trace):
            push(at, 3, k, -1)
    latencies: list[float] = []
    arrived: list[float] = []  # when each measured request arrived, in the order of ``latencies``
    parts: list[tuple[float, float, float]] = []  # per measured request: before, at and after the replica
    in_flight = 0

    # --- processors: a job (a replica's batch, a request's pass through a stage) runs on one of the models
    # of :mod:`fmplex.cluster.cpus`: a processor per server, processor sharing, or bursts in one run queue
    burst_of = dict(costs.bursts)
    push_cpu = lambda at, token, version: push(at, 0, token, version)  # noqa: E731
    cpu: Processors
    if costs.cpus is None and costs.workers == 1:
        cpu = Dedicated(push_cpu)
    elif costs.bursts and costs.cpus is not None:
        cpu = Bursts(push_cpu, costs.cpus, costs.background_cpus, burst_of.get("background", 1e-4), costs.quantum_s, work.seed, costs.wake_s)
    else:
        cpu = Sharing(push_cpu, costs.cpus, costs.background_cpus)
    next_job = [0]

    def begin(s: _Server, items: list, seconds: float, now: float, counted: bool = False) -> None:
        if not counted:
            s.running += 1
        s.work += seconds
        next_job[0] += 1
        replica = s.sid < gpus
        burst = burst_of.get("replica" if replica or s.sid in handoff_ids else stage_names[s.sid], 0.0)
        cpu.begin(next_job[0], Job(s, items, seconds, burst, cap=costs.replica_cpus if replica else 1.0, began=now), now)

    def start(s: _Server, now: float) -> None:
        if s.sid >= gpus:  # a path stage: one request at a time, in order (or each at once, interleaved)
            serial = s.sid in handoff_ids or not costs.interleave_stages  # a hand-off is one thread
            while s.queue and not (serial and s.running):
                req = s.queue.popleft()
                if s.sid in handoff_ids and costs.gil_wait_s > 0 and servers[req[5]].running:
                    s.running += 1  # its thread waits for the interpreter lock that a batch holds
                    next_job[0] += 1
                    gil_waits[next_job[0]] = (s, req)
                    push(now + costs.gil_wait_s, 4, next_job[0], -1)
                else:
                    begin(s, [req], steps[req[2]][1], now)
            return
        while s.running < costs.workers and s.queue:  # each free worker takes a batch of what waits
            take_batch(s, now)

    def take_batch(s: _Server, now: float) -> None:
        if mode == "shared":  # inter-task batching
            batch = [s.queue.popleft() for _ in range(min(costs.max_batch, len(s.queue)))]
        else:  # the oldest request's task, and only that task's requests
            task0 = s.queue[0][1]
            batch, rest = [], deque()
            for item in s.queue:
                (batch if item[1] == task0 and len(batch) < costs.max_batch else rest).append(item)
            s.queue = rest
        work_s = costs.batch_seconds(len(batch), s.share)
        if costs.service_spread:  # a batch's work varies as measured: times a draw from the spread
            work_s *= costs.service_spread[int(spread_rng.random() * len(costs.service_spread))]
        begin(s, batch, work_s, now)

    def forward(req: list, now: float) -> None:
        """Send a request (arrived, task, step, reached the replica, left it, its replica) on to its next step, or finish it."""
        nonlocal in_flight
        req[2] += 1
        if req[2] == len(steps):
            in_flight -= 1
            if req[0] >= work.warmup_s:
                latencies.append(now - req[0] + costs.overhead_s)
                arrived.append(req[0])
                parts.append((req[3] - req[0], req[4] - req[3], now - req[4] + costs.overhead_s))
            return
        sid = steps[req[2]][0]
        if sid == -3:  # the replica's hand-off out
            sid = hand_out[req[5]]
        elif sid == -1 and handoffs:  # its queue, after the hand-off in
            sid = req[5]
        elif sid < 0:  # the replica: the holder of its task with the least work waiting
            sid = min(holders[req[1]], key=lambda i: (len(servers[i].queue) + servers[i].running, i))
            req[3], req[5] = now, sid  # (the replica's ``done``, or its hand-off out, sets req[4])
            if handoffs:
                sid = hand_in[sid]
        servers[sid].queue.append(req)
        start(servers[sid], now)

    def done(job: Job, now: float) -> None:
        s, items = job.server, job.items
        s.running -= 1
        s.cpu_wait += job.waited
        if s.sid < gpus:
            s.served += len(items)
            s.batches += 1
            s.batch_seconds += now - job.began
            if not handoffs:
                for req in items:
                    req[4] = now
        elif s.sid in hand_out_ids:
            for req in items:
                req[4] = now
        for req in items:
            forward(req, now)
        start(s, now)

    rate_of = dict(zip(names, rates))
    while events:
        now, _eid, kind, a, b = heapq.heappop(events)
        if now > work.duration_s:
            break
        if kind == 0:  # the processors' own event: a slice or a job ends, other work's burst arrives
            for _jid, job in cpu.event(int(a), b, now):
                done(job, now)
        elif kind == 3:
            cpu.background(costs.background_trace[int(a)][1], now)
        elif kind == 4:  # a hand-off has the interpreter lock: its work begins
            s_w, req_w = gil_waits.pop(int(a))
            begin(s_w, [req_w], steps[req_w[2]][1], now, counted=True)
        elif kind == 1:  # arrival
            in_flight += 1
            forward([now, str(a), -1, now, now, -1], now)
            if trace is None:
                push(now + rng.expovariate(rate_of[str(a)]), 1, a, -1)
        else:  # placement tick: hot tasks gain replicas, cooled ones lose them
            replicas = servers[:gpus]
            inflight: dict[str, float] = {}
            for s in replicas:
                for _a, t, *_rest in s.queue:
                    inflight[t] = inflight.get(t, 0.0) + 1
            states_now = [
                ReplicaState(f"r{s.sid:04d}", "fm", costs.device_bytes - costs.backbone_bytes, costs.slots,
                             {t: costs.task_bytes for t in s.tasks}, float(len(s.queue)))
                for s in replicas
            ]
            known = placing == "rate"  # the measured load is what the policy places by
            infos = {t: TaskInfo(t, "fm", costs.task_bytes, load=_task_load(mode, rate_of[t], costs) if known else 0.0)
                     for t in names if t in inflight or len(holders[t]) > 1}
            for act in policy.rebalance(infos, inflight, states_now):
                sid_act = int(act.replica[1:])
                if isinstance(act, Placement):
                    servers[sid_act].tasks.add(act.task)
                    holders[act.task].append(sid_act)
                elif isinstance(act, Release) and len(holders[act.task]) > 1:
                    servers[sid_act].tasks.discard(act.task)
                    holders[act.task].remove(sid_act)
            push(now + 1.0, 2, "", -1)

    slowest_at = sorted(round(arrived[i], 2) for i in sorted(range(len(latencies)), key=latencies.__getitem__)[-max(1, len(latencies) // 100):])
    latencies.sort()
    measured = max(work.duration_s - work.warmup_s, 1e-9)
    if not latencies:
        return Result(mode, gpus, work.tasks, True, math.inf, math.inf, 0, [s.served / work.duration_s for s in servers[:gpus]])
    # requests still in flight at the end count as slower than everything served (no survivor bias)
    total = len(latencies) + in_flight
    idx = min(int(0.99 * total), total - 1)
    p99 = latencies[idx] if idx < len(latencies) else math.inf
    names_of = {**{g: str(g) for g in range(gpus)}, **stage_names}  # (hand-offs: "<replica>/in", "<replica>/out")
    waits = {names_of[s.sid]: round(s.cpu_wait, 4) for s in servers} if costs.cpus is not None else {}
    stages = {}
    for k, name in enumerate(("before_replica", "at_replica", "after_replica")):
        xs = sorted(x[k] for x in parts)
        stages[name] = {"p50": round(xs[len(xs) // 2] * 1000, 2), "p99": round(xs[min(int(0.99 * len(xs)), len(xs) - 1)] * 1000, 2)}
    return Result(
        mode, gpus, work.tasks, True, p99 * 1000, latencies[len(latencies) // 2] * 1000, len(latencies),
        [round(s.served / measured, 2) for s in servers[:gpus]], stages,
        [round(s.served / s.batches, 2) if s.batches else 0.0 for s in servers[:gpus]],
        [round(1000 * s.batch_seconds / s.batches, 2) if s.batches else 0.0 for s in servers[:gpus]], waits, slowest_at,
        {names_of[s.sid]: round(s.work, 4) for s in servers},
    )


def max_tasks(
    mode: Mode, gpus: int, slo_ms: float, base: Workload, costs: Costs = Costs(), policy: PlacementPolicy = PlacementPolicy(), placing: Placing = "rate"
) -> int:
    """The most tasks (of ``base``'s rate and mix) that ``gpus`` host with p99 <= ``slo_ms``."""

    def ok(n: int) -> bool:
        if n == 0:
            return True
        r = simulate(mode, gpus, dataclasses.replace(base, tasks=n), costs, policy, placing=placing)
        return r.hosted and r.p99_ms <= slo_ms

    lo, hi = 0, max(1, gpus)
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 50):  # 2% resolution
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--slo-ms", type=float, default=200.0)
    ap.add_argument("--rate", type=float, default=2.0, help="mean requests/s per task")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--backbone-mb", type=float, default=90.0)
    ap.add_argument("--task-kb", type=float, default=4.0, help="resident bytes of one task's extension")
    ap.add_argument("--device-gb", type=float, default=16.0)
    ap.add_argument("--max-replicas-per-task", type=int, default=3, help="the cap on a hot task's replicas")
    ap.add_argument("--placing", choices=("rate", "count"), default="rate",
                    help="rate: place by measured load (request rate x cost); count: by task count and bytes, on first use")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    costs = Costs(device_bytes=int(args.device_gb * 2**30), backbone_bytes=int(args.backbone_mb * 2**20), task_bytes=int(args.task_kb * 2**10))
    base = Workload(tasks=1, rate_per_task=args.rate, duration_s=args.duration)
    policy = PlacementPolicy(max_replicas_per_task=args.max_replicas_per_task)
    print(f"by bytes: one copy per task fits {costs.copies_per_gpu()} copies per GPU; shared fits {costs.tasks_per_gpu()} tasks per replica", flush=True)
    rows = []
    for g in args.gpus:
        shared = max_tasks("shared", g, args.slo_ms, base, costs, policy, args.placing)
        per_task = max_tasks("per_task", g, args.slo_ms, base, costs, policy, args.placing)
        rows.append({"gpus": g, "shared": shared, "per_task": per_task, "ratio": round(shared / per_task, 2) if per_task else None})
        print(f"R={g:4d}: shared {shared:6d} tasks, one copy per task {per_task:6d} tasks, ratio {rows[-1]['ratio']}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            shown = list(sys.argv[1:] if argv is None else argv)
            if "--out" in shown:
                del shown[shown.index("--out"):shown.index("--out") + 2]
            json.dump({"argv": shown, "slo_ms": args.slo_ms, "costs": dataclasses.asdict(costs), "rate_per_task": args.rate,
                       "placing": args.placing, "max_replicas_per_task": args.max_replicas_per_task,
                       "copies_per_gpu_by_bytes": costs.copies_per_gpu(), "tasks_per_replica_by_bytes": costs.tasks_per_gpu(), "rows": rows}, fh, indent=2)

if __name__ == "__main__":
    main()
