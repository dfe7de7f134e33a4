"""Where a task's vFM lives in the cluster, and which replica answers a request.

A pure decision step, like the scheduler: it reads no clock, imports neither
Ray nor Triton, and is fed snapshots (:class:`ReplicaState`) and task facts
(:class:`TaskInfo`). The placement actor in :mod:`fmplex.cluster.deployment`
owns the one mutable table and asks this module what to do with it, so the
same policy runs in the cluster, in the unit tests and in a simulation.

Why not Ray Serve's multiplexing alone: it bounds a replica by a model
count, while a replica here is bounded by its host's extension memory budget
(bytes) and by its slot pool; its table of who holds what is eventually
consistent, so concurrent first requests for a new task can load it on every
replica; and a hot model stays on one replica. This policy places a task
exactly once on first use (one decision point, deterministic order), keeps it
where it is, and gives a hot task a second and third replica only while its
load calls for it.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Iterable, Mapping, Sequence


class PlacementError(RuntimeError):
    """No replica of the task's backbone can take it (none alive, or all full of pinned tasks)."""


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What placement needs to know about one task."""

    name: str
    backbone: str
    bytes: int  # resident extension size (the artifact's weights)
    pinned: bool = False  # never evicted to make room for another task
    load: float = 0.0  # measured load: request rate x cost per request, as a share of one replica's time (0: unknown)


@dataclasses.dataclass(frozen=True)
class ReplicaState:
    """A snapshot of one replica (one tritonserver holding one backbone host).

    ``tasks`` maps each task the replica holds (READY, or being loaded) to its
    bytes; ``load`` is its requests in flight as the router sees them;
    ``last_used`` orders its tasks for eviction (a router tick counter, larger is
    more recent; absent means never used).
    """

    replica: str
    backbone: str
    budget_bytes: int
    slots: int
    tasks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    load: float = 0.0
    healthy: bool = True
    last_used: Mapping[str, int] = dataclasses.field(default_factory=dict)
    pinned: frozenset[str] = frozenset()  # held tasks that are never evicted
    task_load: Mapping[str, float] = dataclasses.field(default_factory=dict)  # measured load each held task brings here

    @property
    def planned_load(self) -> float:
        """The measured load of the tasks held here (a share of this replica's time)."""
        return sum(self.task_load.values())

    @property
    def used_bytes(self) -> int:
        return sum(self.tasks.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.tasks)

    def fits(self, task: TaskInfo) -> bool:
        return task.name in self.tasks or (self.free_slots >= 1 and self.free_bytes >= task.bytes)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Put ``task`` on ``replica``, after unloading ``evict`` there (least recently used first)."""

    task: str
    replica: str
    evict: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Release:
    """Unload ``task`` from ``replica`` (a hot task's extra replica, no longer needed)."""

    task: str
    replica: str


@dataclasses.dataclass(frozen=True)
class PlacementPolicy:
    """Sharing-aware placement and routing.

    ``hot_load``: a task whose requests in flight per replica holding it exceed
    this gets one more replica (up to ``max_replicas_per_task``).
    ``cool_load``: below this per replica (counted as if it had one fewer) the
    newest extra replica is released. ``cool_load < hot_load`` is the
    hysteresis that keeps a task from flapping between one and two replicas.
    ``copy_load``: where a task's measured load is known, the most of one
    replica's time one copy of it should take; a task above it is placed on
    as many replicas as that needs (see :meth:`copies_for`).
    """

    hot_load: float = 8.0
    cool_load: float = 2.0
    max_replicas_per_task: int = 3
    copy_load: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.cool_load < self.hot_load:
            raise ValueError(f"need 0 <= cool_load < hot_load, got {self.cool_load} and {self.hot_load}")
        if self.max_replicas_per_task < 1:
            raise ValueError("max_replicas_per_task must be at least 1")
        if not 0 < self.copy_load <= 1:
            raise ValueError(f"need 0 < copy_load <= 1, got {self.copy_load}")

    # --- routing ------------------------------------------------------------
    def route(self, task: TaskInfo, replicas: Sequence[ReplicaState]) -> str | None:
        """The replica to send one request to, among the healthy ones holding the
        task: the least loaded, ties broken by replica id. None: nobody holds it
        (then :meth:`place` decides where it goes)."""
        holders = [r for r in replicas if r.healthy and r.backbone == task.backbone and task.name in r.tasks]
        if not holders:
            return None
        return min(holders, key=lambda r: (r.load, r.replica)).replica

    # --- first placement and eviction ----------------------------------------
    def place(self, task: TaskInfo, replicas: Sequence[ReplicaState]) -> Placement:
        """Where a task nobody healthy holds goes, deterministically.

        Only healthy replicas of the task's backbone are candidates. Those with
        room (a free slot and enough free budget bytes) come first, ordered by
        least measured load of the tasks they hold (all equal where no load is
        known), then fewest tasks, then fewest bytes, then least load in
        flight, then replica id: so load and tasks spread evenly, and two
        routers asking about the same snapshot get the same answer. If no replica has room, the one that frees room by
        evicting the fewest least-recently-used unpinned tasks (then least
        load, then id) is chosen.
        """
        existing = self.route(task, replicas)
        if existing is not None:
            return Placement(task.name, existing)
        candidates = [r for r in replicas if r.healthy and r.backbone == task.backbone]
        if not candidates:
            raise PlacementError(f"no healthy replica of backbone '{task.backbone}' to place task '{task.name}' on")
        roomy = [r for r in candidates if r.fits(task)]
        if roomy:
            best = min(roomy, key=lambda r: (r.planned_load, len(r.tasks), r.used_bytes, r.load, r.replica))
            return Placement(task.name, best.replica)
        options = []
        for r in candidates:
            victims = self._victims(task, r)
            if victims is not None:
                options.append((len(victims), r.load, r.replica, victims))
        if not options:
            raise PlacementError(
                f"task '{task.name}' ({task.bytes} bytes) fits on no replica of '{task.backbone}': "
                "their budgets and slots are taken by pinned tasks, or it is larger than a whole budget"
            )
        _, _, replica, victims = min(options)
        return Placement(task.name, replica, victims)

    def copies_for(self, load: float) -> int:
        """How many replicas a task with measured ``load`` starts on: enough that no copy
        takes more than ``copy_load`` of a replica, at most ``max_replicas_per_task``."""
        return max(1, min(self.max_replicas_per_task, math.ceil(load / self.copy_load - 1e-9)))

    def plan(self, tasks: Sequence[TaskInfo], replicas: Sequence[ReplicaState]) -> list[Placement]:
        """Place many tasks at once by measured load (a cluster's start, or a simulation).

        Heaviest tasks first (then by name, so the answer is deterministic).
        Each gets :meth:`copies_for` its load, on distinct healthy replicas of
        its backbone that have room, each copy taking an equal share of its
        load; every copy goes where the planned load is least (then fewest
        tasks, then id). So hot tasks get replicas, their load is spread, and
        the light tasks fill the replicas around them, many per replica, until
        memory or slots run out. Never evicts. Raises :class:`PlacementError`
        when a task finds no replica with room.
        """
        free_bytes = {r.replica: r.free_bytes for r in replicas}
        free_slots = {r.replica: r.free_slots for r in replicas}
        held = {r.replica: set(r.tasks) for r in replicas}
        heaps: dict[str, list[tuple[float, int, str]]] = {}  # per backbone: (planned load, tasks, replica id)
        for r in replicas:
            if r.healthy:
                heaps.setdefault(r.backbone, []).append((r.planned_load, len(r.tasks), r.replica))
        for h in heaps.values():
            heapq.heapify(h)
        out: list[Placement] = []
        for task in sorted(tasks, key=lambda t: (-t.load, t.name)):
            heap, want = heaps.get(task.backbone, []), self.copies_for(task.load)
            chosen, passed = [], []
            while heap and len(chosen) < want:
                entry = heapq.heappop(heap)
                rid = entry[2]
                fits = free_slots[rid] >= 1 and free_bytes[rid] >= task.bytes and task.name not in held[rid]
                (chosen if fits else passed).append(entry)
            if not chosen:
                raise PlacementError(f"task '{task.name}' ({task.bytes} bytes) fits on no replica of '{task.backbone}'")
            share = task.load / len(chosen)
            for planned, count, rid in chosen:
                free_slots[rid] -= 1
                free_bytes[rid] -= task.bytes
                held[rid].add(task.name)
                heapq.heappush(heap, (planned + share, count + 1, rid))
                out.append(Placement(task.name, rid))
            for entry in passed:
                heapq.heappush(heap, entry)
        return out

    @staticmethod
    def _victims(task: TaskInfo, replica: ReplicaState) -> tuple[str, ...] | None:
        """Least recently used unpinned tasks to unload so that ``task`` fits (None: impossible)."""
        order = sorted(
            (t for t in replica.tasks if t not in replica.pinned), key=lambda t: (replica.last_used.get(t, -1), t)
        )
        freed_bytes, freed_slots, out = 0, 0, []
        for name in order:
            if replica.free_bytes + freed_bytes >= task.bytes and replica.free_slots + freed_slots >= 1:
                break
            out.append(name)
            freed_bytes += replica.tasks[name]
            freed_slots += 1
        if replica.free_bytes + freed_bytes >= task.bytes and replica.free_slots + freed_slots >= 1:
            return tuple(out)
        return None

    # --- hot tasks ------------------------------------------------------------
    def wanted_replicas(self, task_load: float, current: int) -> int:
        """How many replicas a task with ``task_load`` requests in flight should have,
        given it has ``current`` now (hysteresis between hot_load and cool_load)."""
        current = max(1, current)
        if task_load > self.hot_load * current and current < self.max_replicas_per_task:
            return current + 1
        if current > 1 and task_load < self.cool_load * (current - 1):
            return current - 1
        return current

    def rebalance(
        self,
        tasks: Mapping[str, TaskInfo],
        task_load: Mapping[str, float],
        replicas: Sequence[ReplicaState],
    ) -> list[Placement | Release]:
        """One step of hot-task scaling: at most one replica more or fewer per task.

        A hot task gains, among the replicas not holding it yet, the one with
        the least measured load of the tasks it holds (then least load in
        flight, fewest tasks, fewest bytes, id), and never evicts for it (an extra copy is not worth
        another task's only one). A cooled task loses one extra copy: the holder
        with the highest replica id goes (a stable, predictable choice). Tasks
        are visited in name order, so the result is deterministic. A pinned
        task is never reduced below what it has, and no task below the copies
        its measured load calls for (:meth:`copies_for`).
        """
        actions: list[Placement | Release] = []
        for name in sorted(tasks):
            task = tasks[name]
            holders = sorted(r.replica for r in replicas if r.healthy and name in r.tasks)
            if not holders:
                continue
            want = self.wanted_replicas(task_load.get(name, 0.0), len(holders))
            if want > len(holders):
                others = [r for r in replicas if r.healthy and r.backbone == task.backbone and name not in r.tasks and r.fits(task)]
                if others:
                    best = min(others, key=lambda r: (r.planned_load, r.load, len(r.tasks), r.used_bytes, r.replica))
                    actions.append(Placement(name, best.replica))
            elif want < len(holders) and not task.pinned and len(holders) > self.copies_for(task.load):
                actions.append(Release(name, holders[-1]))
        return actions


def spread(counts: Iterable[int]) -> int:
    """Max minus min of per-replica task counts (0 or 1 means as even as it gets)."""
    values = list(counts)
    return max(values) - min(values) if values else 0
