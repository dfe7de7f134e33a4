"""Triton's ``ModelStreamInfer`` (a bidirectional gRPC stream) relayed through the cluster's one endpoint.

A client stream may carry requests for any models, interleaved, and each
request of a decoupled model (a generative ``NAME.stream`` vFM) gets many
responses. The relay routes every request on its own, like a unary call: to
a replica that holds the task, over one upstream ``ModelStreamInfer`` stream
per replica, and merges the responses of all upstreams into the client's
stream as they come.

To know when a request is done (which a request routed elsewhere or lost
with its replica needs), the relay gives each forwarded request its own id
and asks Triton for the empty final response; the client sees its own ids,
and empty final responses only if it asked for them, so the stream reads as
it does from one server. Errors are stream responses with ``error_message``, as
Triton sends them, and never end the client's stream:

- an unknown model, or no replica for it, is answered at once;
- a request whose replica's stream breaks before any response is retried
  once on another replica (inference is idempotent); after a response, or
  on the second failure, it is answered UNAVAILABLE.

An error response names its model: ``tritonclient`` hands a stream's error to
the callback without the request's id, so a client with several requests in
flight tells them apart by model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import grpc
import tritonclient.grpc.service_pb2 as pb

from .replica import UNKNOWN_MARKERS

if TYPE_CHECKING:
    from .replica import ReplicaRecord

log = logging.getLogger("ray.serve")

FINAL = "triton_final_response"  # response parameter: the last response of its request
WANT_FINAL = "triton_enable_empty_final_response"  # request parameter: send a final flag, also with no outputs
_DONE = object()


@dataclasses.dataclass
class _Pending:
    """A forwarded request not yet finished (for a retry after a broken upstream, and load counts)."""

    request: pb.ModelInferRequest  # as the client sent it
    task: str
    replica: str
    upstream: _Upstream
    answered: int = 0  # responses relayed so far
    retried: bool = False


class _Upstream:
    """One ``ModelStreamInfer`` stream to one replica, for every request of a client stream routed there."""

    def __init__(self, rec: ReplicaRecord, stub: Any) -> None:
        self.rec = rec
        self.queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        self.call = stub.ModelStreamInfer(self._requests())
        self.closed = False

    async def _requests(self) -> AsyncIterator[pb.ModelInferRequest]:
        while True:
            req = await self.queue.get()
            if req is None:
                return
            yield req

    def close(self) -> None:
        """Half-close: Triton ends the stream once the requests sent so far are answered."""
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class StreamRelay:
    """One client's ``ModelStreamInfer`` stream: requests routed one by one, responses merged."""

    def __init__(self, ingress: Any, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        # ``ingress``: the Ingress deployment (fmplex.cluster.ingress), which imports this
        # module, so it is not imported here, not even for typing (no import cycles).
        self.ingress = ingress
        self.requests = requests
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.pending: dict[str, _Pending] = {}
        self.client_ids: dict[str, tuple[str, bool]] = {}  # our id -> (the client's id, client wants final flags)
        self.upstreams: dict[str, _Upstream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading = True
        self.busy = 0  # dispatches and upstream pumps still running
        self._ids = itertools.count()

    async def run(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self._spawn(self._read())
        try:
            while True:
                item = await self.out.get()
                if item is _DONE:
                    return
                yield item
        finally:
            for up in self.upstreams.values():
                up.call.cancel()
            for t in self.tasks:
                t.cancel()
            for p in self.pending.values():
                self._count(p, -1)

    # --- bookkeeping --------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        self.busy += 1
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self.busy -= 1
            if not t.cancelled() and t.exception() is not None:
                log.warning("stream relay: %r", t.exception())
            self._maybe_done()

        task.add_done_callback(done)

    def _maybe_done(self) -> None:
        if not self.reading and self.busy == 0:
            self.out.put_nowait(_DONE)

    def _count(self, p: _Pending, delta: int) -> None:
        ing = self.ingress
        ing.inflight_task[p.task] = ing.inflight_task.get(p.task, 0) + delta
        ing.inflight_replica[p.replica] = ing.inflight_replica.get(p.replica, 0) + delta
        if delta > 0:
            ing._used.add(p.task)
            ing.meter.started(p.task, p.replica, time.monotonic())
        else:  # a stream's request counts in the measured load like a unary one
            ing.meter.finished(p.task, p.replica, time.monotonic())

    def _error(self, request: pb.ModelInferRequest, message: str) -> None:
        resp = pb.ModelStreamInferResponse(error_message=message)
        resp.infer_response.id = request.id
        resp.infer_response.model_name = request.model_name
        self.out.put_nowait(resp)

    # --- requests -----------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            async for request in self.requests:
                await self._dispatch(request, set())
        finally:
            self.reading = False
            for up in self.upstreams.values():
                up.close()
            self._maybe_done()

    async def _dispatch(self, request: pb.ModelInferRequest, avoid: set[str], retried: bool = False) -> None:
        """Send ``request`` to a replica that holds its model, or answer it with an error."""
        name = request.model_name
        found = self.ingress._resolve(name)
        if found is None:
            self._error(request, f"Request for unknown model: '{name}' is not found")
            return
        task = found[1] or name
        try:
            rec = await self.ingress._pick(name, avoid)
        except Exception as exc:  # noqa: BLE001 - no replica, a failed placement, a lost placer: answered, never hung
            self.ingress.unavailable += 1
            self._error(request, f"UNAVAILABLE: '{name}' is unavailable right now: {exc}")
            return
        ours = f"fmplex-{next(self._ids)}"
        wants_final = request.parameters[WANT_FINAL].bool_param if WANT_FINAL in request.parameters else False
        self.client_ids[ours] = (request.id, wants_final)
        forwarded = pb.ModelInferRequest()
        forwarded.CopyFrom(request)
        forwarded.id = ours
        forwarded.parameters[WANT_FINAL].bool_param = True
        up = self.upstreams.get(rec.replica)
        if up is None or up.closed:
            up = _Upstream(rec, self.ingress._stub(rec))
            self.upstreams[rec.replica] = up
            self._spawn(self._pump(up))
        p = _Pending(request, task, rec.replica, up, retried=retried)
        self.pending[ours] = p
        self._count(p, +1)
        up.queue.put_nowait(forwarded)
        if not self.reading:  # a retry after the client's last request: nothing more goes there
            up.close()

    def _finish(self, ours: str) -> _Pending | None:
        p = self.pending.pop(ours, None)
        if p is not None:
            self._count(p, -1)
        return p

    # --- responses ----------------------------------------------------------------------
    async def _pump(self, up: _Upstream) -> None:
        """Relay one upstream's responses; when it breaks, retry or fail what it still owed."""
        why, broken = "its stream ended", False
        try:
            async for resp in up.call:
                self._relay(resp)
        except grpc.aio.AioRpcError as exc:
            why, broken = f"{exc.code().name}: {exc.details()}", True
        finally:
            # at once, before any await: a request routed to this replica from now on opens a
            # new stream (and is retried if that fails too), instead of waiting on a dead one
            up.close()
            if self.upstreams.get(up.rec.replica) is up:
                del self.upstreams[up.rec.replica]
        # a broken stream owes all it did not finish; one that ended, what it never answered
        await self._lost(up, [(o, p) for o, p in self.pending.items() if p.upstream is up and (broken or p.answered == 0)], why)
        for ours in [o for o, p in self.pending.items() if p.upstream is up]:
            self._finish(ours)  # answered, and the stream ended cleanly: Triton sent all it will

    def _relay(self, resp: pb.ModelStreamInferResponse) -> None:
        ours = resp.infer_response.id
        client_id, wants_final = self.client_ids.get(ours, (ours, True))
        resp.infer_response.id = client_id
        params = resp.infer_response.parameters
        final = FINAL in params and params[FINAL].bool_param
        p = self.pending.get(ours)
        if p is not None:
            if resp.error_message and p.answered == 0 and not p.retried and _not_held(resp.error_message):
                # the table was stale (the task left that replica): once more, elsewhere
                self._finish(ours)
                self.ingress.retries += 1
                self._spawn(self._dispatch(p.request, {p.replica}, retried=True))
                return
            p.answered += 1
            if final or resp.error_message:
                self._finish(ours)
        if not wants_final and final and not resp.infer_response.outputs and not resp.error_message:
            return  # the empty final response the relay asked for, not the client
        self.out.put_nowait(resp)

    async def _lost(self, up: _Upstream, owed: list[tuple[str, _Pending]], why: str) -> None:
        if not owed:
            return
        try:
            await self.ingress.placer.suspect.remote(up.rec.replica)
            await self.ingress._refresh()
        except Exception as exc:  # noqa: BLE001 - a lost placer: retry from the cached table, never leave them owed
            log.warning("stream relay: could not report replica %s: %r", up.rec.replica, exc)
        for ours, p in owed:
            self._finish(ours)
            if p.answered == 0 and not p.retried:
                self.ingress.retries += 1
                await self._dispatch(p.request, {p.replica}, retried=True)
            else:
                self.ingress.unavailable += 1
                self._error(p.request, f"UNAVAILABLE: '{p.request.model_name}' lost replica {p.replica} mid-stream ({why}) after {p.answered} response(s)")


def _not_held(message: str) -> bool:
    low = message.lower()
    return "unknown model" in low and any(m in low for m in UNKNOWN_MARKERS)
