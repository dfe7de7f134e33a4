"""A discrete-event simulation of the cluster: how many tasks R GPUs host within a p99 SLO.

It uses the placement and routing policy of the real cluster
(:class:`fmplex.cluster.placement.PlacementPolicy`) and compares two ways of
serving the same tasks:

- ``shared``: one backbone copy per replica (one replica per GPU); tasks
  are placed by bytes and slots, requests of all tasks on a replica are batched
  together, and hot tasks get extra replicas.
- ``per_task``: one model copy per task. A GPU holds as many copies as its
  memory allows and runs one batch at a time from any of them (work-conserving
  co-location, the kinder of the two classic baselines; a static split of the
  GPU would do worse); a batch holds requests of one task only.

Costs are inputs (:class:`Costs`). By default they are this repository's
single-thread CPU measurements of MiniLM; pass a GPU's figures to get a GPU's
answer. Task rates follow a Zipf mix, as in the trace generator. The simulation
is pure and deterministic for a seed: it reads no clock and imports neither Ray
nor Triton.

``perf/bench_cluster.py`` replays a real three-node run in it (``trace`` and
``placement``) to calibrate it; until its p99 matches a run on a quiet
machine, its larger figures are estimates (docs/scaling-out.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import random
from collections import deque
from typing import Literal

from .placement import Placement, PlacementError, PlacementPolicy, Release, ReplicaState, TaskInfo

Mode = Literal["shared", "per_task"]


@dataclasses.dataclass(frozen=True)
class Costs:
    """What one GPU (one replica) can do, and what things weigh.

    ``throughput`` maps batch sizes to sequences/s of one backbone copy
    (linear in between, flat beyond the last). ``overhead_s`` is what the
    path to the replica adds to each request's latency without taking the
    replica's time (on a real cluster: Serve's proxy and the ingress), and
    ``endpoint_s`` the endpoint's own work per request: with it, requests
    queue at one endpoint before they reach a replica (a real cluster's one
    proxy and one ingress, where they are the bottleneck). The defaults are MiniLM, one
    CPU thread, 11-token sentences, as measured in this repository; memory is
    the backbone's fp32 weights and a classifier head's artifact.
    """

    throughput: tuple[tuple[int, float], ...] = ((1, 100.0), (16, 320.0))
    device_bytes: int = 16 * 2**30
    backbone_bytes: int = 90 * 2**20
    task_bytes: int = 4 * 2**10
    max_batch: int = 16
    slots: int = 256
    overhead_s: float = 0.0  # latency every request pays outside the replica (proxy, ingress, network); uses no replica time
    endpoint_s: float = 0.0  # time the endpoint (one FIFO server in front of all replicas) spends per request; 0: not modelled

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


@dataclasses.dataclass
class _Server:
    sid: int
    share: float
    tasks: set[str]
    queue: deque[tuple[float, str]] = dataclasses.field(default_factory=deque)
    busy_until: float = 0.0
    busy: bool = False
    served: int = 0


def simulate(
    mode: Mode,
    gpus: int,
    work: Workload,
    costs: Costs = Costs(),
    policy: PlacementPolicy = PlacementPolicy(),
    placement: list[int] | None = None,
    trace: list[tuple[float, int]] | None = None,
) -> Result:
    """One run. ``placement`` (shared mode) puts task i on replica ``placement[i]``
    instead of asking the policy, and ``trace`` ((time s, task i) arrivals)
    replaces the Poisson arrivals: together they replay a real run, request by request."""
    names = [f"t{i:05d}" for i in range(work.tasks)]
    servers: list[_Server] = []
    holders: dict[str, list[int]] = {n: [] for n in names}
    if mode == "shared":
        budget = costs.device_bytes - costs.backbone_bytes
        states = {f"r{g:04d}": ReplicaState(f"r{g:04d}", "fm", budget, costs.slots) for g in range(gpus)}
        servers = [_Server(g, 1.0, set()) for g in range(gpus)]
        for i, n in enumerate(names):
            if placement is not None:
                servers[placement[i]].tasks.add(n)
                holders[n].append(placement[i])
                st = states[f"r{placement[i]:04d}"]
                states[st.replica] = dataclasses.replace(st, tasks={**st.tasks, n: costs.task_bytes})
                continue
            try:
                p = policy.place(TaskInfo(n, "fm", costs.task_bytes), list(states.values()))
            except PlacementError:
                return Result(mode, gpus, work.tasks, False, math.inf, math.inf, 0, [])
            if p.evict:  # a task that only fits by evicting another: the cluster is full
                return Result(mode, gpus, work.tasks, False, math.inf, math.inf, 0, [])
            st = states[p.replica]
            states[p.replica] = dataclasses.replace(st, tasks={**st.tasks, n: costs.task_bytes})
            sid = int(p.replica[1:])
            servers[sid].tasks.add(n)
            holders[n].append(sid)
    else:
        per_gpu = costs.device_bytes // (costs.backbone_bytes + costs.task_bytes)
        if per_gpu < 1 or per_gpu * gpus < work.tasks:
            return Result(mode, gpus, work.tasks, False, math.inf, math.inf, 0, [])
        servers = [_Server(g, 1.0, set()) for g in range(gpus)]
        for i, n in enumerate(names):
            servers[i % gpus].tasks.add(n)
            holders[n].append(i % gpus)

    rng = random.Random(work.seed)
    events: list[tuple[float, int, int, str, int]] = []  # time, order, kind (0 done, 1 arrival, 2 tick, 3 endpoint passed), task, server
    order = 0
    if trace is None:
        for n, rate in zip(names, work.rates()):
            heapq.heappush(events, (rng.expovariate(rate), order, 1, n, -1))
            order += 1
    else:
        for at, i in trace:
            heapq.heappush(events, (at, order, 1, names[i], -1))
            order += 1
    if mode == "shared":
        heapq.heappush(events, (1.0, order, 2, "", -1))
        order += 1
    latencies: list[float] = []
    batches: dict[int, list[tuple[float, str]]] = {}
    rate_of = dict(zip(names, work.rates()))

    def start(s: _Server, now: float) -> None:
        nonlocal order
        if s.busy or not s.queue:
            return
        if mode == "shared":  # inter-task batching
            batch = [s.queue.popleft() for _ in range(min(costs.max_batch, len(s.queue)))]
        else:  # the oldest request's task, and only that task's requests
            task0 = s.queue[0][1]
            batch, rest = [], deque()
            for item in s.queue:
                (batch if item[1] == task0 and len(batch) < costs.max_batch else rest).append(item)
            s.queue = rest
        s.busy = True
        batches[s.sid] = batch
        heapq.heappush(events, (now + costs.batch_seconds(len(batch), s.share), order, 0, "", s.sid))
        order += 1

    def route(task: str, now: float, arrived: float) -> None:
        """Hand a request to the holder of its task with the least work waiting."""
        target = min(holders[task], key=lambda i: (len(servers[i].queue) + servers[i].busy, i))
        servers[target].queue.append((arrived, task))
        start(servers[target], now)

    endpoint_free = 0.0  # when the endpoint (one FIFO server, if modelled) is next free
    arrived_at: dict[int, float] = {}  # endpoint passages in flight: event order -> arrival time
    while events:
        now, eid, kind, task, sid = heapq.heappop(events)
        if now > work.duration_s:
            break
        if kind == 1:  # arrival: through the endpoint, then to a replica
            if costs.endpoint_s > 0:
                endpoint_free = max(endpoint_free, now) + costs.endpoint_s
                arrived_at[order] = now
                heapq.heappush(events, (endpoint_free, order, 3, task, -1))
                order += 1
            else:
                route(task, now, now)
            if trace is None:
                heapq.heappush(events, (now + rng.expovariate(rate_of[task]), order, 1, task, -1))
                order += 1
        elif kind == 3:  # passed the endpoint
            route(task, now, arrived_at.pop(eid))
        elif kind == 0:
            s = servers[sid]
            s.busy = False
            for arrived, _t in batches.pop(sid):
                s.served += 1
                if arrived >= work.warmup_s:
                    latencies.append(now - arrived + costs.overhead_s)
            start(s, now)
        else:  # placement tick: hot tasks gain replicas, cooled ones lose them
            inflight: dict[str, float] = {}
            for s in servers:
                for _a, t in s.queue:
                    inflight[t] = inflight.get(t, 0.0) + 1
            states_now = [
                ReplicaState(f"r{s.sid:04d}", "fm", costs.device_bytes - costs.backbone_bytes, costs.slots,
                             {t: costs.task_bytes for t in s.tasks}, float(len(s.queue)))
                for s in servers
            ]
            infos = {t: TaskInfo(t, "fm", costs.task_bytes) for t in inflight}
            for t in list(names):
                if len(holders[t]) > 1:
                    infos[t] = TaskInfo(t, "fm", costs.task_bytes)
            for act in policy.rebalance(infos, inflight, states_now):
                sid_act = int(act.replica[1:])
                if isinstance(act, Placement):
                    servers[sid_act].tasks.add(act.task)
                    holders[act.task].append(sid_act)
                elif isinstance(act, Release) and len(holders[act.task]) > 1:
                    servers[sid_act].tasks.discard(act.task)
                    holders[act.task].remove(sid_act)
            heapq.heappush(events, (now + 1.0, order, 2, "", -1))
            order += 1

    latencies.sort()
    measured = max(work.duration_s - work.warmup_s, 1e-9)
    pending = sum(len(s.queue) for s in servers)
    if not latencies:
        return Result(mode, gpus, work.tasks, True, math.inf, math.inf, 0, [s.served / work.duration_s for s in servers])
    # requests still queued at the end count as slower than everything served (no survivor bias)
    total = len(latencies) + pending
    idx = min(int(0.99 * total), total - 1)
    p99 = latencies[idx] if idx < len(latencies) else math.inf
    return Result(
        mode, gpus, work.tasks, True, p99 * 1000, latencies[len(latencies) // 2] * 1000, len(latencies),
        [round(s.served / measured, 2) for s in servers],
    )


def max_tasks(mode: Mode, gpus: int, slo_ms: float, base: Workload, costs: Costs = Costs(), policy: PlacementPolicy = PlacementPolicy()) -> int:
    """The most tasks (of ``base``'s rate and mix) that ``gpus`` host with p99 <= ``slo_ms``."""

    def ok(n: int) -> bool:
        if n == 0:
            return True
        r = simulate(mode, gpus, dataclasses.replace(base, tasks=n), costs, policy)
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
    ap.add_argument("--device-gb", type=float, default=16.0)
    ap.add_argument("--max-replicas-per-task", type=int, default=3, help="the cap on a hot task's replicas")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    costs = Costs(device_bytes=int(args.device_gb * 2**30), backbone_bytes=int(args.backbone_mb * 2**20))
    base = Workload(tasks=1, rate_per_task=args.rate, duration_s=args.duration)
    policy = PlacementPolicy(max_replicas_per_task=args.max_replicas_per_task)
    rows = []
    for g in args.gpus:
        shared = max_tasks("shared", g, args.slo_ms, base, costs, policy)
        per_task = max_tasks("per_task", g, args.slo_ms, base, costs, policy)
        rows.append({"gpus": g, "shared": shared, "per_task": per_task, "ratio": round(shared / per_task, 2) if per_task else None})
        print(f"R={g:4d}: shared {shared:6d} tasks, one copy per task {per_task:6d} tasks, ratio {rows[-1]['ratio']}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"slo_ms": args.slo_ms, "costs": dataclasses.asdict(costs), "rate_per_task": args.rate, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
