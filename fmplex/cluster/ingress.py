"""The cluster's one endpoint (a Ray Serve deployment class): KServe v2 HTTP and Triton's gRPC service.

Routes every call by model name to a replica that holds the vFM, from a
cached copy of the placer's table; retries once elsewhere when a replica is
gone, else answers UNAVAILABLE / 503.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import tritonclient.grpc.service_pb2 as pb
import tritonclient.grpc.service_pb2_grpc as pb_grpc

from fmplex import registry
from fmplex.families import family_for

from .config import TICK_S
from .loads import LoadMeter
from .placement import PlacementError
from .replica import UNKNOWN_MARKERS, ReplicaRecord
from .stream import StreamRelay

log = logging.getLogger("ray.serve")


async def _events(resp: Any) -> AsyncIterator[bytes]:
    """A replica's server-sent events (HTTP ``generate_stream``), passed on as they arrive."""
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    finally:
        resp.release()


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
        self.meter = LoadMeter()  # measured loads (rate x cost per request) for placement
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self._http: Any = None
        self._loop_task: asyncio.Task[None] | None = None
        self.retries = 0
        self.unavailable = 0
        self._timing: _Timing | None = None  # per-stage timestamps, only while a benchmark asks for them

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
            for gone in set(self.meter.replicas()) - set(self.table["replicas"]):
                self.meter.forget(gone)
            try:
                shares = self.meter.shares(time.monotonic())
                version = await self.placer.report.remote(task_load, replica_load, used, shares)
                if version != self.table["version"]:
                    await self._refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving from the cached table
                log.warning("ingress: report to placer failed: %s", exc)

    async def _refresh(self) -> None:
        fresh = await self.placer.table_since.remote(self.table["version"])
        if fresh is not None:
            self.table = fresh

    def _resolve(self, name: str) -> tuple[str, str | None] | None:
        """(backbone, task) for a vFM, (backbone, None) for a host model; None if the cluster does not serve it.

        A task's other vFMs (a generative task's ``NAME.stream``) go where the task is.
        """
        reg = self.view.current()
        entry = reg.tasks.get(name)
        if entry is not None and entry.deployed:
            return entry.backbone, name
        base, dot, _ = name.partition(".")
        entry = reg.tasks.get(base) if dot else None
        if entry is not None and entry.deployed and name in family_for(entry.backbone).task_models(base):
            return entry.backbone, base
        for backbone in reg.hosts:
            if name in family_for(backbone).host_models(backbone):
                return backbone, None
        return None

    async def _pick(self, name: str, avoid: set[str]) -> ReplicaRecord:
        """The replica for a call on model ``name``; KeyError if the cluster does not serve it."""
        self._ensure_loop()
        found = self._resolve(name)
        if found is None:
            raise KeyError(name)
        backbone, task = found
        for attempt in range(2):
            replicas = self.table["replicas"]
            if task is not None:
                ids = [r for r in self.table["routes"].get(task, []) if r not in avoid and r in replicas]
            else:
                ids = [r for r, rec in replicas.items() if rec["backbone"] == backbone and r not in avoid]
            if ids:
                rid = min(ids, key=lambda r: (self.inflight_replica.get(r, 0), r))
                return ReplicaRecord(**replicas[rid])
            if attempt == 0:
                if task is not None:
                    self.table = await self.placer.ensure.remote(task)
                else:
                    await self._refresh()
        raise _Forward(f"no replica of backbone '{backbone}' is available for '{name}'")

    async def _call(self, name: str, fn: Any, rid: str = "") -> Any:
        """Run ``fn(record)`` on a replica for ``name``, retrying once on another one.

        ``rid``: the client's request id, kept with the stage timestamps while timing is on."""
        timing = self._timing
        received = time.monotonic() if timing is not None else 0.0
        avoid: set[str] = set()
        last: Exception | None = None
        found = self._resolve(name)
        task = found[1] if found is not None and found[1] is not None else name  # loads count per task
        for attempt in range(2):
            try:
                rec = await self._pick(name, avoid)
            except _Forward as exc:
                last = exc
                break
            self.inflight_task[task] = self.inflight_task.get(task, 0) + 1
            self.inflight_replica[rec.replica] = self.inflight_replica.get(rec.replica, 0) + 1
            self._used.add(task)
            self.meter.started(task, rec.replica, time.monotonic())
            try:
                if timing is None:
                    return await fn(rec)
                sent = time.monotonic()
                out = await fn(rec)
                timing.requests.append((rid, received, sent, time.monotonic(), rec.replica))
                return out
            except _Forward as exc:
                last = exc
                avoid.add(rec.replica)
                if attempt == 0:
                    self.retries += 1
                    await self.placer.suspect.remote(rec.replica)
                    await self._refresh()
            finally:
                self.inflight_task[task] -= 1
                self.inflight_replica[rec.replica] -= 1
                self.meter.finished(task, rec.replica, time.monotonic())
        self.unavailable += 1
        raise _Forward(f"'{name}' is unavailable right now (retried once): {last}")

    # --- HTTP ---------------------------------------------------------------------------
    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: PLC0415

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
                resp = await self._http.request(request.method, url, data=body, headers=headers)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                raise _Forward(f"replica {rec.replica} unreachable: {exc!r}") from None
            keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "inference-header-content-length", "content-encoding")}
            if resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(_events(resp), status_code=200, headers=keep)  # generate_stream: each event as it comes
            try:
                content = await resp.read()
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                raise _Forward(f"replica {rec.replica} unreachable: {exc!r}") from None
            finally:
                resp.release()
            if resp.status == 400 and any(m in content.decode("utf-8", "replace").lower() for m in UNKNOWN_MARKERS) and parts[-1] != "ready":
                raise _Forward(f"{rec.replica} does not hold {name}")
            return Response(content=content, status_code=resp.status, headers=keep)

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
            return await self._call(name, forward, getattr(request, "id", "") if method == "ModelInfer" else "")
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
        if self._resolve(request.name) is None:
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

    async def ModelStreamInfer(self, request_stream: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        """Triton's bidirectional stream (``tritonclient.grpc`` ``start_stream``/``async_stream_infer``):
        each request is routed by its model name, the responses of every replica are merged."""
        async for resp in StreamRelay(self, request_stream).run():
            yield resp

    async def counters(self) -> dict[str, int]:
        """Calls retried on another replica, and calls answered UNAVAILABLE (for status and tests)."""
        return {"retries": self.retries, "unavailable": self.unavailable}

    async def timing(self, on: bool) -> dict[str, Any]:
        """Start (``on``) or stop recording where each call's time goes in this process; what was recorded.

        For the calibration benchmark: per call (request id, received, forwarded, answered, replica) on
        ``time.monotonic`` (one clock for every process of the machine, so a client can set its own
        timestamps beside them); this event loop's lateness (a timer every ``_Timing.PERIOD_S``); and
        this process's garbage-collector pauses. Off (the default), a call costs one attribute read.
        """
        old, self._timing = self._timing, None
        out: dict[str, Any] = {"requests": [], "loop_lag_s": [], "gc_pauses_s": []}
        if old is not None:
            old.stop()
            out = {"requests": list(old.requests), "loop_lag_s": list(old.lag), "gc_pauses_s": list(old.gc_pauses)}
        if on:
            self._timing = _Timing(asyncio.get_running_loop())
        return out


class _Timing:
    """What :meth:`Ingress.timing` records (bounded: the newest entries are kept)."""

    PERIOD_S = 0.005
    KEEP = 200_000

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.requests: collections.deque[tuple[str, float, float, float, str]] = collections.deque(maxlen=self.KEEP)
        self.lag: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.KEEP)  # (when, seconds late)
        self.gc_pauses: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.KEEP)  # (when, seconds)
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)
        self._probe = loop.create_task(self._lag_probe())

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.monotonic()
        else:
            now = time.monotonic()
            self.gc_pauses.append((now, now - self._gc_start))

    async def _lag_probe(self) -> None:
        while True:
            due = time.monotonic() + self.PERIOD_S
            await asyncio.sleep(self.PERIOD_S)
            now = time.monotonic()
            self.lag.append((now, now - due))

    def stop(self) -> None:
        self._probe.cancel()
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
