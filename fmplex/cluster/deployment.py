"""The Ray Serve application: tritonserver replicas per backbone, one placer, one endpoint.

Three deployments make one Serve application (``fmplex``):

- ``fm-<backbone>`` (:class:`BackboneReplica`): each replica starts and owns a
  real tritonserver on the shared repository, exactly as ``fmplex serve`` does
  (:func:`fmplex.control.serving.start`: same backend assembly, host settings
  from the host's config, locked repository API, host watchdog), but loads
  only its backbone's host and no vFM. It announces itself to the placer and
  fails Serve's health check when its tritonserver is gone, so Serve replaces it.
  Its tritonserver dies with it (a reaper process), also on a killed node.
- ``Placer`` (:class:`Placer`, one replica): the one place where placement is
  decided, so that concurrent first requests for a new task load it once. It
  keeps the table of which replica holds which vFM, loads and unloads vFMs
  through each replica's repository API (the same ``Triton.load`` call as
  ``fmplex deploy``; the slot, ensemble and artifact check were done by
  ``fmplex deploy --offline`` on the shared repository), evicts by the host's
  byte budget and slots, gives hot tasks more replicas and takes them back,
  and drops replicas whose tritonserver stops answering.
- ``Ingress`` (:class:`Ingress`): the one endpoint. Serve's HTTP proxy hands it
  every KServe v2 HTTP request and Serve's gRPC proxy every
  ``inference.GRPCInferenceService`` call (registered with Triton's own
  servicer), so unchanged ``tritonclient.http`` and ``tritonclient.grpc``
  clients reach any vFM by its name. It forwards each call to a replica that
  holds the vFM (least in flight first), from a cached copy of the placer's
  table; a call that finds its replica gone is retried once elsewhere
  (inference is idempotent), else answered UNAVAILABLE / 503.

Why not Serve's multiplexing: see :mod:`fmplex.cluster.placement`. Serve still
does what it is good at: replica lifecycle, health checks, declarative
scaling, the proxies, and restarting what dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.service_pb2 as pb
import tritonclient.grpc.service_pb2_grpc as pb_grpc
from ray import serve

from fmplex import registry
from fmplex.artifacts import version_dir

from .config import HEAD_RESOURCE, INGRESS, PLACER, backbone_deployment
from .placement import Placement, PlacementError, PlacementPolicy, Release, ReplicaState, TaskInfo

log = logging.getLogger("ray.serve")

TICK_S = 0.5  # placer: liveness checks and hot-task rebalancing; ingress: load reports
RELEASE_GRACE_S = 2.0  # an extra copy leaves the table this long before it is unloaded
UNKNOWN_MARKERS = ("unknown model", "is not ready", "not found", "is not available")


@dataclasses.dataclass(frozen=True)
class ReplicaRecord:
    """How to reach one replica's tritonserver (announced by the replica itself)."""

    replica: str
    backbone: str
    host_model: str
    address: str  # node IP
    http_port: int
    grpc_port: int
    metrics_port: int
    api_key: str
    budget_bytes: int
    slots: int
    server_pid: int
    node_id: str
    log_path: str

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"


def _host_settings(repo: Path, host_model: str) -> tuple[int, int]:
    """(extension budget in bytes, slots) from the host's config.pbtxt, as the host reads them."""
    text = (repo / host_model / "config.pbtxt").read_text()

    def param(key: str, default: str) -> str:
        marker = f'key: "{key}" value {{ string_value: "'
        i = text.find(marker)
        return text[i + len(marker) : text.index('"', i + len(marker))] if i >= 0 else default

    return int(float(param("extension_budget_mb", "1024")) * 2**20), int(param("slots", "256"))


def artifact_bytes(repo: Path, entry: registry.TaskEntry) -> int:
    """A task's resident size for placement: the files of its deployed version."""
    vdir = version_dir(repo, entry.name, entry.deployed_version or entry.version)
    return sum(p.stat().st_size for p in vdir.iterdir() if p.is_file()) if vdir.is_dir() else 0


def _spawn_reaper(server_pid: int) -> subprocess.Popen[bytes]:
    """A tiny process that kills the tritonserver's process group once its owner (this replica) is gone.

    A Serve replica killed with its node gets no chance to stop its child; the
    tritonserver would go on serving a vFM the placer no longer knows about.
    """
    code = (
        "import os, signal, sys, time\n"
        "owner, pgid = int(sys.argv[1]), int(sys.argv[2])\n"
        "while os.getppid() == owner:\n"
        "    time.sleep(0.5)\n"
        "    try:\n"
        "        os.killpg(pgid, 0)\n"
        "    except ProcessLookupError:\n"
        "        sys.exit(0)\n"
        "try:\n"
        "    os.killpg(pgid, signal.SIGKILL)\n"
        "except ProcessLookupError:\n"
        "    pass\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), str(server_pid)], start_new_session=True)


class BackboneReplica:
    """One tritonserver holding one backbone's host; vFMs are loaded onto it by the placer."""

    def __init__(self, repository: str, backbone: str, app_name: str = "fmplex") -> None:
        import ray  # noqa: PLC0415

        from fmplex.control import serving  # noqa: PLC0415
        from fmplex.control.server import generate_key  # noqa: PLC0415

        self.repo = Path(repository)
        reg = registry.load(self.repo)
        if backbone not in reg.hosts:
            raise registry.RegistryError(f"no host for backbone '{backbone}' in {self.repo}")
        host_model = reg.hosts[backbone].model
        budget, slots = _host_settings(self.repo, host_model)
        ctx = serve.get_replica_context()
        replica_id = ctx.replica_id.unique_id
        address = ray.util.get_node_ip_address()
        # On a loopback-only node (tests, 'fmplex cluster up') nothing listens beyond 127.0.0.1.
        bind = ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"] if address.startswith("127.") else []
        logs = Path(tempfile.gettempdir()) / "fmplex-cluster"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{backbone_deployment(backbone)}-{replica_id}.log"
        key = generate_key()
        from fmplex.control.server import Ports, free_ports  # noqa: PLC0415

        fixed = os.environ.get("FMPLEX_TRITON_PORTS")  # one replica per pod: known ports (metrics scraping)
        ports = Ports(*(int(p) for p in fixed.split(","))) if fixed else free_ports()
        self.proc = serving.start(
            self.repo,
            ports,
            log_path=log_path,
            api_key=key,
            watchdog=True,
            backbones=[backbone],
            load_vfms=False,
            extra_args=bind,
        )
        assert self.proc.proc is not None
        self.reaper = _spawn_reaper(self.proc.proc.pid)
        self.record = ReplicaRecord(
            replica=replica_id,
            backbone=backbone,
            host_model=host_model,
            address=address,
            http_port=ports.http,
            grpc_port=ports.grpc,
            metrics_port=ports.metrics,
            api_key=key,
            budget_bytes=budget,
            slots=slots,
            server_pid=self.proc.proc.pid,
            node_id=ray.get_runtime_context().get_node_id(),
            log_path=str(log_path),
        )
        self.placer = serve.get_deployment_handle(PLACER, app_name)
        self._announce()

    def _announce(self) -> None:
        # Fire and forget: the placer also learns from later health checks (it may start after us).
        self._pending = self.placer.register.remote(dataclasses.asdict(self.record))

    def check_health(self) -> None:
        """Serve replaces this replica when its tritonserver is gone (the host watchdog handles a dead stub)."""
        proc = self.proc.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"tritonserver (pid {self.record.server_pid}) exited; see {self.record.log_path}")
        self._announce()

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.record)

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.stop(grace=10)
        reaper = getattr(self, "reaper", None)
        if reaper is not None and reaper.poll() is None:
            reaper.kill()


def _triton(record: ReplicaRecord, timeout: float = 60.0) -> Any:
    from fmplex.control.triton_api import Triton  # noqa: PLC0415

    return Triton(record.grpc_url, timeout=timeout, key=record.api_key)


def _live(record: ReplicaRecord) -> bool:
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(f"{record.http_url}/v2/health/live", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


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
            with _triton(rec, timeout=10) as triton:
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
        self._event("replica lost", replica=replica, backbone=rec.backbone, tasks=lost, why=why)
        self.version += 1

    async def suspect(self, replica: str) -> None:
        """The ingress could not reach ``replica``: check at once, drop it if its tritonserver is gone."""
        rec = self.replicas.get(replica)
        if rec is not None and not await asyncio.to_thread(_live, rec):
            async with self._lock:
                self._drop(replica, "not answering")

    # --- tasks ------------------------------------------------------------------------
    def _task_info(self, name: str) -> TaskInfo:
        reg = self.view.current()
        entry = reg.tasks.get(name)
        if entry is None or not entry.deployed:
            raise KeyError(name)
        return TaskInfo(name, entry.backbone, artifact_bytes(self.repo, entry), entry.pinned)

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
            with _triton(rec) as triton:
                secs = await asyncio.to_thread(triton.load, info.name)
        except Exception as exc:  # noqa: BLE001 - a dead replica is dropped; a broken task is reported
            if not await asyncio.to_thread(_live, rec):
                self._drop(rec.replica, f"load of {info.name} failed: {exc}")
                return False
            raise PlacementError(f"loading task '{info.name}' on replica {rec.replica} failed: {exc}") from None
        self.held[rec.replica][info.name] = info.bytes
        self._event("placed", replica=rec.replica, task=info.name, ms=round(secs * 1000, 1))
        self.version += 1
        return True

    @staticmethod
    def _unload_now(rec: ReplicaRecord, name: str) -> None:
        try:
            with _triton(rec) as triton:
                triton.unload(name)
        except Exception as exc:  # noqa: BLE001 - the replica may be gone; nothing holds the task there any more
            log.warning("unloading %s from %s failed: %s", name, rec.replica, exc)

    # --- load reports, hot tasks, liveness -----------------------------------------------
    async def report(self, task_load: dict[str, float], replica_load: dict[str, float], used: list[str]) -> int:
        """The ingress's view of the last tick: requests in flight per task and per replica; returns the table version."""
        self._ensure_loop()
        self.task_load = task_load
        self.replica_load = {r: v for r, v in replica_load.items() if r in self.replicas}
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
        alive = await asyncio.gather(*(asyncio.to_thread(_live, r) for r in recs))
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
            tasks[name] = TaskInfo(name, entry.backbone, artifact_bytes(self.repo, entry), entry.pinned)
        async with self._lock:
            actions = self.policy.rebalance(tasks, self.task_load, self._states())
            for act in actions:
                if isinstance(act, Placement):
                    await self._load(tasks[act.task], act)
                    self._event("hot: extra replica", replica=act.replica, task=act.task, load=self.task_load.get(act.task))
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
                    "healthy": self._misses.get(rid, 0) == 0,
                }
            )
        deployed = sorted(n for n, t in reg.tasks.items() if t.deployed)
        return {
            "replicas": replicas,
            "tasks": {n: {"replicas": [r["replica"] for r in replicas if n in r["tasks"]], "load": round(self.task_load.get(n, 0.0), 2)} for n in deployed},
            "releasing": sorted(f"{t}@{r}" for r, t in self.releasing),
            "events": self.events[-30:],
        }


class _Forward(Exception):
    """A forwarded call that did not reach a working replica (retry once elsewhere)."""


class Ingress:
    """The one endpoint: KServe v2 over HTTP and Triton's gRPC service, routed by model name."""

    def __init__(self, placer: Any, repository: str) -> None:
        self.placer = placer
        self.repo = Path(repository)
        self.view = registry.RegistryView(self.repo)
        self.table: dict[str, Any] = {"version": -1, "routes": {}, "replicas": {}}
        self.inflight_task: dict[str, int] = {}
        self.inflight_replica: dict[str, int] = {}
        self._load_area: dict[str, float] = {}
        self._replica_area: dict[str, float] = {}
        self._used: set[str] = set()
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self._http: Any = None
        self._loop_task: asyncio.Task[None] | None = None
        self.retries = 0
        self.unavailable = 0

    # --- table and load reports ----------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        samples = 0
        while True:
            await asyncio.sleep(TICK_S / 5)
            samples += 1
            for t, n in self.inflight_task.items():
                self._load_area[t] = self._load_area.get(t, 0.0) + n
            for r, n in self.inflight_replica.items():
                self._replica_area[r] = self._replica_area.get(r, 0.0) + n
            if samples < 5:
                continue
            task_load = {t: a / samples for t, a in self._load_area.items()}
            replica_load = {r: a / samples for r, a in self._replica_area.items()}
            self._load_area, self._replica_area, samples = {}, {}, 0
            used, self._used = sorted(self._used), set()
            try:
                version = await self.placer.report.remote(task_load, replica_load, used)
                if version != self.table["version"]:
                    await self._refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving from the cached table
                log.warning("ingress: report to placer failed: %s", exc)

    async def _refresh(self) -> None:
        fresh = await self.placer.table_since.remote(self.table["version"])
        if fresh is not None:
            self.table = fresh

    def _backbone_of(self, name: str) -> tuple[str, bool] | None:
        """(backbone, is_task) for a vFM or a host model name; None if the cluster does not serve it."""
        reg = self.view.current()
        entry = reg.tasks.get(name)
        if entry is not None and entry.deployed:
            return entry.backbone, True
        for backbone, host in reg.hosts.items():
            if host.model == name:
                return backbone, False
        return None

    async def _pick(self, name: str, avoid: set[str]) -> ReplicaRecord:
        """The replica for a call on model ``name``; KeyError if the cluster does not serve it."""
        self._ensure_loop()
        found = self._backbone_of(name)
        if found is None:
            raise KeyError(name)
        backbone, is_task = found
        for attempt in range(2):
            replicas = self.table["replicas"]
            if is_task:
                ids = [r for r in self.table["routes"].get(name, []) if r not in avoid and r in replicas]
            else:
                ids = [r for r, rec in replicas.items() if rec["backbone"] == backbone and r not in avoid]
            if ids:
                rid = min(ids, key=lambda r: (self.inflight_replica.get(r, 0), r))
                return ReplicaRecord(**replicas[rid])
            if attempt == 0:
                if is_task:
                    self.table = await self.placer.ensure.remote(name)
                else:
                    await self._refresh()
        raise _Forward(f"no replica of backbone '{backbone}' is available for '{name}'")

    async def _call(self, name: str, fn: Any) -> Any:
        """Run ``fn(record)`` on a replica for ``name``, retrying once on another one."""
        avoid: set[str] = set()
        last: Exception | None = None
        for attempt in range(2):
            try:
                rec = await self._pick(name, avoid)
            except _Forward as exc:
                last = exc
                break
            self.inflight_task[name] = self.inflight_task.get(name, 0) + 1
            self.inflight_replica[rec.replica] = self.inflight_replica.get(rec.replica, 0) + 1
            self._used.add(name)
            try:
                return await fn(rec)
            except _Forward as exc:
                last = exc
                avoid.add(rec.replica)
                if attempt == 0:
                    self.retries += 1
                    await self.placer.suspect.remote(rec.replica)
                    await self._refresh()
            finally:
                self.inflight_task[name] -= 1
                self.inflight_replica[rec.replica] -= 1
        self.unavailable += 1
        raise _Forward(f"'{name}' is unavailable right now (retried once): {last}")

    # --- HTTP ---------------------------------------------------------------------------
    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response  # noqa: PLC0415

        path = request.url.path.rstrip("/")
        parts = path.split("/")
        if path in ("/v2/health/live",):
            return Response(status_code=200)
        if path == "/v2/health/ready":
            ready = bool(self.table["replicas"]) or bool((await self.placer.table_since.remote(-2))["replicas"])
            return Response(status_code=200 if ready else 503)
        if len(parts) >= 3 and parts[2] in ("repository", "systemsharedmemory", "cudasharedmemory", "trace", "logging"):
            return JSONResponse({"error": "not available through the cluster endpoint: use 'fmplex cluster' / 'fmplex deploy'"}, 403)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "inference-header-content-length", "content-encoding", "accept-encoding")}
        if len(parts) >= 4 and parts[2] == "models" and parts[3]:
            name = parts[3]
        elif path == "/v2":
            name = ""
        else:
            return JSONResponse({"error": f"unknown path {path}"}, 404)
        if name == "":
            reg = self.view.current()
            name = next(iter(h.model for h in reg.hosts.values()), "")

        async def forward(rec: ReplicaRecord) -> Any:
            import aiohttp  # noqa: PLC0415

            if self._http is None:
                # bytes pass through as they are: compressed bodies stay compressed, with their header
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), auto_decompress=False)
            url = rec.http_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
            try:
                async with self._http.request(request.method, url, data=body, headers=headers) as resp:
                    content = await resp.read()
                    if resp.status == 400 and any(m in content.decode("utf-8", "replace").lower() for m in UNKNOWN_MARKERS) and parts[-1] != "ready":
                        raise _Forward(f"{rec.replica} does not hold {name}")
                    keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "inference-header-content-length", "content-encoding")}
                    return Response(content=content, status_code=resp.status, headers=keep)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                raise _Forward(f"replica {rec.replica} unreachable: {exc!r}") from None

        try:
            return await self._call(name, forward)
        except KeyError:
            return JSONResponse({"error": f"Request for unknown model: '{name}' is not found"}, 400)
        except _Forward as exc:
            return JSONResponse({"error": f"UNAVAILABLE: {exc}"}, 503)
        except PlacementError as exc:
            return JSONResponse({"error": f"UNAVAILABLE: {exc}"}, 503)

    # --- gRPC (inference.GRPCInferenceService) -------------------------------------------
    def _stub(self, rec: ReplicaRecord) -> Any:
        cached = self._channels.get(rec.replica)
        if cached is None:
            channel = grpc.aio.insecure_channel(
                rec.grpc_url, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            )
            cached = (channel, pb_grpc.GRPCInferenceServiceStub(channel))
            self._channels[rec.replica] = cached
        return cached[1]

    async def _grpc(self, method: str, name: str, request: Any, grpc_context: Any, empty: Any) -> Any:
        async def forward(rec: ReplicaRecord) -> Any:
            try:
                return await getattr(self._stub(rec), method)(request, timeout=300)
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if exc.code() == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "socket" in details.lower() or "reset" in details.lower() or "closed" in details.lower()):
                    raise _Forward(f"replica {rec.replica} unreachable: {details}") from None
                if method != "ModelReady" and any(m in details.lower() for m in UNKNOWN_MARKERS) and "unknown model" in details.lower():
                    raise _Forward(f"{rec.replica} does not hold {name}") from None
                grpc_context.set_code(exc.code())
                grpc_context.set_details(details)
                return empty

        try:
            return await self._call(name, forward)
        except KeyError:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"Request for unknown model: '{name}' is not found")
        except (_Forward, PlacementError) as exc:
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(f"UNAVAILABLE: {exc}")
        return empty

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC method name
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        self._ensure_loop()
        if not self.table["replicas"]:
            await self._refresh()
        return pb.ServerReadyResponse(ready=bool(self.table["replicas"]))

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        reg = self.view.current()
        host = next(iter(h.model for h in reg.hosts.values()), "")
        return await self._grpc("ServerMetadata", host, request, grpc_context, pb.ServerMetadataResponse())

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        if self._backbone_of(request.name) is None:
            return pb.ModelReadyResponse(ready=False)
        return await self._grpc("ModelReady", request.name, request, grpc_context, pb.ModelReadyResponse())

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self._grpc("ModelMetadata", request.name, request, grpc_context, pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self._grpc("ModelConfig", request.name, request, grpc_context, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self._grpc("ModelStatistics", request.name, request, grpc_context, pb.ModelStatisticsResponse())

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self._grpc("ModelInfer", request.model_name, request, grpc_context, pb.ModelInferResponse())

    async def counters(self) -> dict[str, int]:
        """Calls retried on another replica, and calls answered UNAVAILABLE (for status and tests)."""
        return {"retries": self.retries, "unavailable": self.unavailable}


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path`` of the generated config)."""
    repository = str(args["repository"])
    backbones = list(args.get("backbones", []))
    head = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    replicas = []
    for b in backbones:
        dep = serve.deployment(
            name=backbone_deployment(b),
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=2,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=15,
        )(BackboneReplica)
        replicas.append(dep.bind(repository, b))
    placer = serve.deployment(name=PLACER, ray_actor_options=head, max_ongoing_requests=1000)(Placer).bind(
        repository,
        *replicas,
        hot_load=float(args.get("hot_load", 8.0)),
        cool_load=float(args.get("cool_load", 2.0)),
        max_replicas_per_task=int(args.get("max_replicas_per_task", 3)),
    )
    return serve.deployment(name=INGRESS, ray_actor_options=head, max_ongoing_requests=1000)(Ingress).bind(placer, repository)
