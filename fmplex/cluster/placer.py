"""The cluster's one placement table (a Ray Serve deployment class with one replica).

Every placement decision goes through here, so concurrent first requests for
a new task load it once; the decisions themselves come from the pure
:class:`fmplex.cluster.placement.PlacementPolicy`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from fmplex import registry
from fmplex.families import family_for

from .config import TICK_S
from .loads import task_totals
from .placement import Placement, PlacementError, PlacementPolicy, Release, ReplicaState, TaskInfo
from .replica import ReplicaRecord, artifact_bytes, is_live, triton_for

log = logging.getLogger("ray.serve")

RELEASE_GRACE_S = 2.0  # an extra copy leaves the table this long before it is unloaded


def _task_models(reg: registry.Registry, name: str) -> list[str]:
    """A task's Triton models in load order: ``NAME`` first, then e.g. its ``NAME.stream`` twin."""
    entry = reg.tasks.get(name)
    return family_for(entry.backbone).task_models(name) if entry is not None else [name]


class Placer:
    """The cluster's one placement table; every change to it goes through here."""

    def __init__(self, repository: str, *replica_deployments: Any, hot_load: float = 8.0, cool_load: float = 2.0, max_replicas_per_task: int = 3) -> None:
        self.repo = Path(repository)
        self.view = registry.RegistryView(self.repo)
        self.policy = PlacementPolicy(hot_load, cool_load, max_replicas_per_task)
        self.replicas: dict[str, ReplicaRecord] = {}
        self.held: dict[str, dict[str, int]] = {}  # replica -> task -> bytes (READY there)
        self.last_used: dict[str, int] = {}
        self.task_load: dict[str, float] = {}
        self.replica_load: dict[str, float] = {}
        self.shares: dict[str, dict[str, float]] = {}  # replica -> task -> measured share of its time
        self.version = 0
        self.events: list[dict[str, Any]] = []  # placements, evictions, releases, lost replicas (for status)
        self._lock = asyncio.Lock()
        self._misses: dict[str, int] = {}
        self.releasing: set[tuple[str, str]] = set()  # (replica, task) out of the table, not yet unloaded
        self._loop_task: asyncio.Task[None] | None = None

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    # --- replicas -------------------------------------------------------------------
    async def register(self, record: dict[str, Any]) -> None:
        self._ensure_loop()
        rec = ReplicaRecord(**record)
        if rec.replica in self.replicas:
            return
        async with self._lock:
            if rec.replica in self.replicas:
                return
            held = await asyncio.to_thread(self._loaded_tasks, rec)  # what it already serves (placer restarted)
            self.replicas[rec.replica] = rec
            self.held[rec.replica] = held
            self._event("replica up", replica=rec.replica, backbone=rec.backbone, tasks=sorted(held))
            self.version += 1

    def _loaded_tasks(self, rec: ReplicaRecord) -> dict[str, int]:
        reg = self.view.current()
        try:
            with triton_for(rec, timeout=10) as triton:
                index = triton.index()
        except Exception:  # noqa: BLE001 - an unreachable replica holds nothing we can use
            return {}
        return {
            name: artifact_bytes(self.repo, reg.tasks[name])
            for name, info in index.items()
            if info["state"] == "READY" and name in reg.tasks
        }

    def _drop(self, replica: str, why: str) -> None:
        rec = self.replicas.pop(replica, None)
        if rec is None:
            return
        lost = sorted(self.held.pop(replica, {}))
        self.replica_load.pop(replica, None)
        self.shares.pop(replica, None)
        self._event("replica lost", replica=replica, backbone=rec.backbone, tasks=lost, why=why)
        self.version += 1

    async def suspect(self, replica: str) -> None:
        """The ingress could not reach ``replica``: check at once, drop it if its tritonserver is gone."""
        rec = self.replicas.get(replica)
        if rec is not None and not await asyncio.to_thread(is_live, rec):
            async with self._lock:
                self._drop(replica, "not answering")

    # --- tasks ------------------------------------------------------------------------
    def _task_info(self, name: str) -> TaskInfo:
        reg = self.view.current()
        entry = reg.tasks.get(name)
        if entry is None or not entry.deployed:
            raise KeyError(name)
        return TaskInfo(name, entry.backbone, artifact_bytes(self.repo, entry), entry.pinned, self._measured(name))

    def _measured(self, name: str) -> float:
        """A task's measured load over every replica holding it (0 until the ingress has seen it)."""
        return task_totals(self.shares).get(name, 0.0)

    def _states(self) -> list[ReplicaState]:
        reg = self.view.current()
        out = []
        for rid, rec in sorted(self.replicas.items()):
            held = self.held.get(rid, {})
            out.append(
                ReplicaState(
                    rid,
                    rec.backbone,
                    rec.budget_bytes,
                    rec.slots,
                    dict(held),
                    self.replica_load.get(rid, 0.0),
                    True,
                    {t: self.last_used.get(t, -1) for t in held},
                    frozenset(t for t in held if t in reg.tasks and reg.tasks[t].pinned),
                    {t: v for t, v in self.shares.get(rid, {}).items() if t in held},
                )
            )
        return out

    async def ensure(self, name: str) -> dict[str, Any]:
        """Make sure a deployed task is held by some replica; the new table. KeyError: not deployed."""
        self._ensure_loop()
        info = self._task_info(name)
        for _attempt in range(3):
            async with self._lock:
                if self.policy.route(info, self._states()) is not None:
                    return self.table()
                decision = self.policy.place(info, self._states())
                ok = await self._load(info, decision)
            if ok:
                return self.table()
        raise PlacementError(f"could not load task '{name}' on any replica of '{info.backbone}'")

    async def _load(self, info: TaskInfo, decision: Placement) -> bool:
        rec = self.replicas[decision.replica]
        try:
            for victim in decision.evict:
                self.held[rec.replica].pop(victim, None)
                self.version += 1
                await asyncio.to_thread(self._unload_now, rec, victim)
                self._event("evicted", replica=rec.replica, task=victim, for_task=info.name)
            secs = await asyncio.to_thread(self._load_now, rec, info.name)
        except Exception as exc:  # noqa: BLE001 - a dead replica is dropped; a broken task is reported
            if not await asyncio.to_thread(is_live, rec):
                self._drop(rec.replica, f"load of {info.name} failed: {exc}")
                return False
            raise PlacementError(f"loading task '{info.name}' on replica {rec.replica} failed: {exc}") from None
        self.held[rec.replica][info.name] = info.bytes
        self._event("placed", replica=rec.replica, task=info.name, ms=round(secs * 1000, 1))
        self.version += 1
        return True

    def _load_now(self, rec: ReplicaRecord, name: str) -> float:
        """Load every Triton model of a task on ``rec`` (a generative task's ``NAME.stream``
        twin goes with ``NAME``, as ``fmplex deploy`` loads them); seconds for ``NAME``."""
        models = _task_models(self.view.current(), name)
        with triton_for(rec) as triton:
            secs = triton.load(models[0])
            for extra in models[1:]:
                triton.load(extra)
        return secs

    def _unload_now(self, rec: ReplicaRecord, name: str) -> None:
        for model in reversed(_task_models(self.view.current(), name)):
            try:
                with triton_for(rec) as triton:
                    triton.unload(model)
            except Exception as exc:  # noqa: BLE001 - the replica may be gone; nothing holds the task there any more
                log.warning("unloading %s from %s failed: %s", model, rec.replica, exc)

    # --- load reports, hot tasks, liveness -----------------------------------------------
    async def report(
        self,
        task_load: dict[str, float],
        replica_load: dict[str, float],
        used: list[str],
        shares: dict[str, dict[str, float]] | None = None,
    ) -> int:
        """The ingress's view: requests in flight per task and per replica over the last tick (the
        hot/cool trigger), and the measured share of each replica's time each task takes
        (:mod:`fmplex.cluster.loads`: where new tasks and extra copies go); returns the table version."""
        self._ensure_loop()
        self.task_load = task_load
        self.replica_load = {r: v for r, v in replica_load.items() if r in self.replicas}
        if shares is not None:
            self.shares = {r: dict(v) for r, v in shares.items() if r in self.replicas}
        tick = int(time.monotonic() * 10)
        for t in used:
            self.last_used[t] = tick
        return self.version

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick()
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad tick
                log.warning("placer tick failed: %s", exc)

    async def _tick(self) -> None:
        recs = list(self.replicas.values())
        alive = await asyncio.gather(*(asyncio.to_thread(is_live, r) for r in recs))
        for rec, ok in zip(recs, alive):
            if ok:
                self._misses.pop(rec.replica, None)
                continue
            self._misses[rec.replica] = self._misses.get(rec.replica, 0) + 1
            if self._misses[rec.replica] >= 2:
                async with self._lock:
                    self._drop(rec.replica, "tritonserver not answering")
        reg = self.view.current()
        tasks = {}
        for name in {t for held in self.held.values() for t in held}:
            entry = reg.tasks.get(name)
            if entry is None or not entry.deployed:  # undeployed meanwhile: unload it everywhere
                for rid, held in self.held.items():
                    if name in held:
                        held.pop(name)
                        self.version += 1
                        asyncio.get_running_loop().create_task(self._release_later(rid, name, 0.0))
                continue
            tasks[name] = TaskInfo(name, entry.backbone, artifact_bytes(self.repo, entry), entry.pinned, self._measured(name))
        async with self._lock:
            actions = self.policy.rebalance(tasks, self.task_load, self._states())
            for act in actions:
                if isinstance(act, Placement):
                    await self._load(tasks[act.task], act)
                    self._event("hot: extra replica", replica=act.replica, task=act.task, load=self.task_load.get(act.task), measured_load=tasks[act.task].load)
                elif isinstance(act, Release):
                    self.held[act.replica].pop(act.task, None)
                    self.version += 1
                    self._event("cooled: replica released", replica=act.replica, task=act.task)
                    asyncio.get_running_loop().create_task(self._release_later(act.replica, act.task, RELEASE_GRACE_S))

    async def _release_later(self, replica: str, task: str, delay: float) -> None:
        self.releasing.add((replica, task))
        try:
            await asyncio.sleep(delay)  # routers refresh their table first; Triton drains what is in flight
            rec = self.replicas.get(replica)
            if rec is not None and task not in self.held.get(replica, {}):
                await asyncio.to_thread(self._unload_now, rec, task)
        finally:
            self.releasing.discard((replica, task))

    # --- views --------------------------------------------------------------------------
    def _event(self, what: str, **fields: Any) -> None:
        self.events.append({"t": round(time.time(), 3), "event": what, **fields})
        del self.events[:-200]

    def table(self) -> dict[str, Any]:
        routes: dict[str, list[str]] = {}
        for rid in sorted(self.held):
            for t in self.held[rid]:
                routes.setdefault(t, []).append(rid)
        return {
            "version": self.version,
            "routes": routes,
            "replicas": {rid: dataclasses.asdict(rec) for rid, rec in self.replicas.items()},
        }

    async def table_since(self, version: int) -> dict[str, Any] | None:
        self._ensure_loop()
        return None if version == self.version else self.table()

    async def status(self) -> dict[str, Any]:
        self._ensure_loop()
        reg = self.view.current()
        replicas = []
        for rid, rec in sorted(self.replicas.items()):
            held = self.held.get(rid, {})
            replicas.append(
                {
                    "replica": rid,
                    "backbone": rec.backbone,
                    "node": rec.node_id,
                    "address": rec.address,
                    "http_port": rec.http_port,
                    "grpc_port": rec.grpc_port,
                    "server_pid": rec.server_pid,
                    "tasks": sorted(held),
                    "bytes": sum(held.values()),
                    "budget_bytes": rec.budget_bytes,
                    "slots": rec.slots,
                    "load": round(self.replica_load.get(rid, 0.0), 2),
                    "measured_load": round(sum(self.shares.get(rid, {}).values()), 2),
                    "healthy": self._misses.get(rid, 0) == 0,
                }
            )
        deployed = sorted(n for n, t in reg.tasks.items() if t.deployed)
        return {
            "replicas": replicas,
            "tasks": {n: {"replicas": [r["replica"] for r in replicas if n in r["tasks"]], "load": round(self.task_load.get(n, 0.0), 2), "measured_load": round(self._measured(n), 2)} for n in deployed},
            "releasing": sorted(f"{t}@{r}" for r, t in self.releasing),
            "events": self.events[-30:],
        }
