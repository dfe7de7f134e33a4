"""The cluster's gRPC stream relay (fmplex.cluster.stream) against scripted replicas, no server.

The end-to-end test streams through a real cluster; here each replica's
``ModelStreamInfer`` is a script, so that what a real run rarely shows is
checked: ids and final flags as the client sent them, requests of one stream
split over replicas, a replica lost before and after its first response or
while a request is being routed to it, a stream that ends owing answers, and
errors that come back on the stream instead of ending it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import grpc
import tritonclient.grpc.service_pb2 as pb

from fmplex.cluster.loads import LoadMeter
from fmplex.cluster.replica import ReplicaRecord
from fmplex.cluster.stream import FINAL, WANT_FINAL, StreamRelay


def _record(rid: str) -> ReplicaRecord:
    return ReplicaRecord(rid, "smollm2", "fm.smollm2", "127.0.0.1", 1, 2, 3, "k", 1, 1, 1, "n", "log")


def _response(req: pb.ModelInferRequest, text: str, final: bool) -> pb.ModelStreamInferResponse:
    resp = pb.ModelStreamInferResponse()
    resp.infer_response.id = req.id
    resp.infer_response.model_name = req.model_name
    if text:
        resp.infer_response.outputs.add(name="TEXT_OUTPUT", datatype="BYTES", shape=[1])
        resp.infer_response.raw_output_contents.append(text.encode())
    resp.infer_response.parameters[FINAL].bool_param = final
    return resp


class _Call:
    """A scripted upstream stream: per request, ``pieces`` responses and an empty final one;
    ``break_after`` responses in all, then UNAVAILABLE (a lost replica), or with ``ends`` a clean end."""

    def __init__(self, requests: AsyncIterator[pb.ModelInferRequest], pieces: int, break_after: int | None, seen: list[Any], ends: bool) -> None:
        self.requests, self.pieces, self.break_after, self.seen, self.ends = requests, pieces, break_after, seen, ends

    async def _run(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        sent = 0
        async for req in self.requests:
            self.seen.append(req)
            assert req.parameters[WANT_FINAL].bool_param  # the relay always asks, to know when a request is done
            if req.model_name == "bad.stream":
                err = pb.ModelStreamInferResponse(error_message="max_tokens 9999 is more than this host's limit")
                err.infer_response.id = req.id
                yield err
                continue
            for i in range(self.pieces + 1):
                if self.break_after is not None and sent >= self.break_after:
                    if self.ends:
                        return
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "Socket closed")
                yield _response(req, f"p{i}" if i < self.pieces else "", i == self.pieces)
                sent += 1
                await asyncio.sleep(0)

    def __aiter__(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        return self._run()

    def cancel(self) -> None:
        pass


class _Stub:
    def __init__(self, pieces: int, break_after: int | None, ends: bool = False) -> None:
        self.pieces, self.break_after, self.seen, self.ends = pieces, break_after, [], ends

    def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest]) -> _Call:  # noqa: N802
        return _Call(requests, self.pieces, self.break_after, self.seen, self.ends)


class _Placer:
    def __init__(self, suspect_s: float) -> None:
        self.suspected: list[str] = []
        outer = self

        class _Suspect:
            async def remote(self, replica: str) -> None:
                outer.suspected.append(replica)
                await asyncio.sleep(suspect_s)  # the placer checks the replica: the relay reads on meanwhile

        self.suspect = _Suspect()


class _Ingress:
    """What the relay uses of the ingress: resolve, pick (least-loaded first, avoiding some), stubs, counters."""

    def __init__(self, stubs: dict[str, _Stub], routes: dict[str, list[str]], suspect_s: float = 0.0) -> None:
        self.stubs, self.routes = stubs, routes
        self.placer = _Placer(suspect_s)
        self.inflight_task: dict[str, int] = {}
        self.inflight_replica: dict[str, int] = {}
        self._used: set[str] = set()
        self.meter = LoadMeter()
        self.retries = self.unavailable = 0

    def _resolve(self, name: str) -> tuple[str, str | None] | None:
        task = name.removesuffix(".stream")
        return ("smollm2", task) if task in self.routes else None

    async def _pick(self, name: str, avoid: set[str]) -> ReplicaRecord:
        ids = [r for r in self.routes[name.removesuffix(".stream")] if r not in avoid]
        if not ids:
            raise RuntimeError(f"no replica is available for '{name}'")
        return _record(ids[0])

    def _stub(self, rec: ReplicaRecord) -> _Stub:
        return self.stubs[rec.replica]

    async def _refresh(self) -> None:
        pass


def _request(model: str, rid: str, want_final: bool = False) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=rid)
    if want_final:
        req.parameters[WANT_FINAL].bool_param = True
    return req


def _run(ingress: _Ingress, requests: list[pb.ModelInferRequest], gap_s: float = 0.0) -> list[pb.ModelStreamInferResponse]:
    async def main() -> list[pb.ModelStreamInferResponse]:
        async def client() -> AsyncIterator[pb.ModelInferRequest]:
            for r in requests:
                yield r
                await asyncio.sleep(gap_s)

        return [r async for r in StreamRelay(ingress, client()).run()]  # type: ignore[arg-type]

    return asyncio.run(asyncio.wait_for(main(), 10))  # a hang fails


def _texts(responses: list[pb.ModelStreamInferResponse], rid: str) -> list[str]:
    return [r.infer_response.raw_output_contents[0].decode() if r.infer_response.raw_output_contents else "" for r in responses if r.infer_response.id == rid and not r.error_message]


def test_ids_and_final_flags_read_as_from_one_server_and_requests_split_over_replicas() -> None:
    a, b = _Stub(2, None), _Stub(3, None)
    ing = _Ingress({"a": a, "b": b}, {"chat": ["a"], "pirate": ["b"]})
    out = _run(ing, [_request("chat.stream", "x"), _request("pirate.stream", "y", want_final=True), _request("chat.stream", "")])
    assert _texts(out, "x") == ["p0", "p1"]  # no empty final: the client did not ask for it
    assert _texts(out, "y") == ["p0", "p1", "p2", ""]  # it asked: the empty final comes, flagged
    assert [r.infer_response.parameters[FINAL].bool_param for r in out if r.infer_response.id == "y"] == [False, False, False, True]
    assert len(_texts(out, "")) == 2  # an empty id stays empty
    assert [r.model_name for r in a.seen] == ["chat.stream", "chat.stream"] and [r.model_name for r in b.seen] == ["pirate.stream"]
    assert len({r.id for r in a.seen + b.seen}) == 3  # each forwarded request has its own id upstream
    assert all(v == 0 for v in ing.inflight_task.values()) and all(v == 0 for v in ing.inflight_replica.values())
    # streamed requests count in the measured load as unary ones do: started and finished on their replica
    assert ing.meter.replicas() == ["a", "b"]
    assert set(ing.meter.rates(time.monotonic())) == {"chat", "pirate"}


def test_errors_come_back_on_the_stream_and_the_stream_goes_on() -> None:
    ing = _Ingress({"a": _Stub(1, None)}, {"chat": ["a"], "bad": ["a"]})
    out = _run(ing, [_request("nope.stream", "u"), _request("bad.stream", "v"), _request("chat.stream", "w")])
    errors = {r.infer_response.id: r.error_message for r in out if r.error_message}
    assert "unknown model" in errors["u"] and "nope.stream" in errors["u"]
    assert "max_tokens" in errors["v"]
    assert _texts(out, "w") == ["p0"]


def test_a_replica_lost_before_the_first_response_is_retried_once_elsewhere() -> None:
    dead, good = _Stub(2, 0), _Stub(2, None)
    ing = _Ingress({"dead": dead, "good": good}, {"chat": ["dead", "good"]})
    out = _run(ing, [_request("chat.stream", "x")])
    assert _texts(out, "x") == ["p0", "p1"] and not any(r.error_message for r in out)
    assert ing.retries == 1 and ing.placer.suspected == ["dead"] and len(good.seen) == 1


def test_a_request_routed_to_a_replica_as_its_stream_breaks_is_retried_not_dropped() -> None:
    # "y" comes while the relay reports "dead" (the table still routes chat there first): it must not
    # join the broken stream, whose requests are settled once the report is done
    dead, good = _Stub(1, 0), _Stub(1, None)
    ing = _Ingress({"dead": dead, "good": good}, {"chat": ["dead", "good"]}, suspect_s=0.05)
    out = _run(ing, [_request("chat.stream", "x"), _request("chat.stream", "y")], gap_s=0.01)
    assert _texts(out, "x") == ["p0"] and _texts(out, "y") == ["p0"] and not any(r.error_message for r in out)
    assert ing.retries == 2 and len(dead.seen) == 2 and len(good.seen) == 2


def test_a_stream_that_ends_without_answering_is_not_taken_for_an_answer() -> None:
    ing = _Ingress({"gone": _Stub(1, 0, ends=True), "good": _Stub(1, None)}, {"chat": ["gone", "good"]})
    out = _run(ing, [_request("chat.stream", "x")])
    assert _texts(out, "x") == ["p0"] and ing.retries == 1


def test_a_replica_lost_mid_stream_answers_unavailable_and_nothing_hangs() -> None:
    ing = _Ingress({"a": _Stub(3, 1)}, {"chat": ["a"]})
    out = _run(ing, [_request("chat.stream", "x")])
    assert _texts(out, "x") == ["p0"]  # what was sent stays sent
    errors = [r.error_message for r in out if r.error_message]
    assert len(errors) == 1 and errors[0].startswith("UNAVAILABLE") and "after 1 response" in errors[0]
    assert "'chat.stream'" in errors[0]  # the model: tritonclient gives a stream's error no request id
    assert ing.unavailable == 1


def test_no_replica_at_all_is_an_unavailable_response() -> None:
    ing = _Ingress({}, {"chat": []})
    out = _run(ing, [_request("chat.stream", "x")])
    assert len(out) == 1 and out[0].error_message.startswith("UNAVAILABLE") and out[0].infer_response.id == "x"
