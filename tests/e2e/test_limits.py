"""Per-task queue limits and deadlines: immediate, clear errors over HTTP and gRPC.

Set live with ``fmplex task set-weight --queue-limit/--deadline-ms`` (a
registry edit, no reload) and put back afterwards.
"""

from __future__ import annotations

import subprocess
import threading
import time
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


@pytest.fixture
def busy(server: Server):  # noqa: ANN201
    """Keep the host busy with big 'topic' requests so queues build up."""
    stop = threading.Event()

    def run() -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        while not stop.is_set():
            c.infer("topic", [text_input(grpcclient, ["Shares rallied after earnings beat forecasts"] * 64)], client_timeout=120)
        c.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    yield
    stop.set()
    for t in threads:
        t.join(timeout=120)


def test_queue_full_is_immediate_over_http_and_grpc(server: Server, busy: None) -> None:
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
    full = [r for r in results if "queue is full" in r[2]]
    assert len(results) == 12 and any(r[2] == "ok" for r in results)
    assert full, results
    assert all(r[1] < 2.0 for r in full), "a queue-full refusal was not immediate"
    http_full = [r for r in full if r[0] == "http"]
    grpc_full = [r for r in full if r[0] == "grpc"]
    assert all(r[2].startswith("503 ") for r in http_full), http_full
    assert all("UNAVAILABLE" in r[2] for r in grpc_full), grpc_full


def test_task_deadline_fails_queued_requests_promptly(server: Server, busy: None) -> None:
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
    assert "UNAVAILABLE" in str(err.value) and took < 2.0
    assert status == 503 and "deadline exceeded" in body
