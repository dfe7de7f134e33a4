"""Per-task queue limits and deadlines: immediate, clear errors over HTTP and gRPC.

Set live with ``fmplex task set-weight --queue-limit/--deadline-ms`` (a
registry edit, no reload) and put back afterwards.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Iterator
import urllib.error
import urllib.request
import json

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import Server, text_input


def set_limits(server: Server, *args: str) -> None:
    out = subprocess.run(server.cli("task", "set-weight", "intent", "1", *args), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def http_infer(server: Server, task: str, texts: list[str]) -> tuple[int, str]:
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{task}/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Backlog:
    """Big 'topic' requests, back to back from 3 clients, so queues build up.

    ``latencies`` are the seconds each of them took: a request that waited its
    turn in the host's queue took about that long, so "immediate" below means
    "shorter than the fastest backlog request" -- a bound measured on the
    same machine at the same moment, not a fixed number of seconds.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(3)]

    def _run(self) -> None:
        c = grpcclient.InferenceServerClient(self.server.grpc_url)
        while not self.stop.is_set():
            t0 = time.monotonic()
            c.infer("topic", [text_input(grpcclient, ["Shares rallied after earnings beat forecasts"] * 64)], client_timeout=120)
            self.latencies.append(time.monotonic() - t0)
        c.close()

    def fastest_after(self, count: int) -> float:
        """The fastest backlog request, once ``count`` more have finished."""
        want = len(self.latencies) + count
        deadline = time.monotonic() + 120
        while len(self.latencies) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.latencies, "the backlog answered nothing"
        return min(self.latencies)


@pytest.fixture
def busy(server: Server) -> Iterator[Backlog]:
    backlog = Backlog(server)
    for t in backlog.threads:
        t.start()
    backlog.fastest_after(1)  # the backlog is being served
    yield backlog
    backlog.stop.set()
    for t in backlog.threads:
        t.join(timeout=120)


def test_queue_full_is_immediate_over_http_and_grpc(server: Server, busy: Backlog) -> None:
    set_limits(server, "--queue-limit", "2")
    try:
        time.sleep(0.3)  # the host sees the registry change on its next request
        results: list[tuple[str, float, str]] = []
        lock = threading.Lock()

        def one(k: int) -> None:
            t0 = time.monotonic()
            if k % 2:
                c = grpcclient.InferenceServerClient(server.grpc_url)
                try:
                    c.infer("intent", [text_input(grpcclient, ["hello there"])], client_timeout=120)
                    outcome = "ok"
                except InferenceServerException as exc:
                    outcome = str(exc)
                c.close()
            else:
                status, body = http_infer(server, "intent", ["hello there"])
                outcome = "ok" if status == 200 else f"{status} {body}"
            with lock:
                results.append(("grpc" if k % 2 else "http", time.monotonic() - t0, outcome))

        threads = [threading.Thread(target=one, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        set_limits(server, "--queue-limit", "256")
    queued = busy.fastest_after(3)
    full = [r for r in results if "queue is full" in r[2]]
    assert len(results) == 12 and any(r[2] == "ok" for r in results)
    assert full, results
    slow = [r for r in full if r[1] >= queued]
    assert not slow, f"a queue-full refusal took as long as a queued request ({queued:.2f}s): {slow}"
    http_full = [r for r in full if r[0] == "http"]
    grpc_full = [r for r in full if r[0] == "grpc"]
    assert http_full and grpc_full, f"both protocols must see a refusal: {results}"
    assert all(r[2].startswith("503 ") for r in http_full), http_full
    assert all("UNAVAILABLE" in r[2] for r in grpc_full), grpc_full


def test_task_deadline_fails_queued_requests_promptly(server: Server, busy: Backlog) -> None:
    set_limits(server, "--deadline-ms", "1")
    try:
        time.sleep(0.3)
        c = grpcclient.InferenceServerClient(server.grpc_url)
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException, match="deadline exceeded") as err:
            c.infer("intent", [text_input(grpcclient, ["will it rain tomorrow?"])], client_timeout=120)
        took = time.monotonic() - t0
        c.close()
        status, body = http_infer(server, "intent", ["will it rain tomorrow?"])
    finally:
        set_limits(server, "--deadline-ms", "0")
    queued = busy.fastest_after(3)
    assert "UNAVAILABLE" in str(err.value)
    assert took < queued, f"the expired request waited {took:.2f}s, as long as a queued backlog request ({queued:.2f}s)"
    assert status == 503 and "deadline exceeded" in body
