"""Every request that reaches a host gets exactly one final response.

Counted on both sides: the client counts what each call returned (an answer or
an error — every wait is bounded), the host counts per task what it received
(``fmplex_task_received_total``) and every final response it sent, by outcome
(``fmplex_task_responses_total``); a second response to one request would be
suppressed and counted (``outcome="duplicate_suppressed"``) and must stay 0.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import subprocess
import threading
import time
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import Server, text_input

TASKS = ("sentiment", "topic", "intent", "embed")


def counts(server: Server, task: str) -> tuple[float, float, float]:
    """(received, final responses, suppressed duplicates) of one task on the host."""
    text = server.metrics()
    received = responded = dup = 0.0
    for line in text.splitlines():
        if f'task="{task}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("fmplex_task_received_total{"):
            received += value
        elif line.startswith("fmplex_task_responses_total{"):
            if 'outcome="duplicate_suppressed"' in line:
                dup += value
            elif 'outcome="send_failed"' not in line:
                responded += value
    return received, responded, dup


STEADY_S = 0.8  # the host publishes its counts every 0.25 s: unchanged this long, they are current


def snapshot(server: Server, tasks: tuple[str, ...], timeout: float = 20.0) -> dict[str, tuple[float, float, float]]:
    """Counts once the host has published a response for everything it received
    and they stayed the same for ``STEADY_S`` (received and answered can be
    equal and still behind: both wait for the next publication)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        now = {t: counts(server, t) for t in tasks}
        if now != last:
            last, since = now, time.monotonic()
        steady = time.monotonic() - since >= STEADY_S
        if (steady and all(c[0] == c[1] for c in now.values())) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def settle(server: Server, tasks: tuple[str, ...], before: dict[str, tuple[float, float, float]], timeout: float = 20.0) -> dict[str, tuple[float, float, float]]:
    """Per-task deltas once every received request has its response counted (see ``snapshot``)."""
    now = snapshot(server, tasks, timeout)
    return {t: tuple(a - b for a, b in zip(now[t], before[t])) for t in tasks}  # type: ignore[misc]


def test_many_concurrent_http_and_grpc_clients_each_get_one_answer(server: Server) -> None:
    before = snapshot(server, TASKS)
    sent = {"ok": 0, "error": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        proto = grpcclient if k % 2 else httpclient
        c = proto.InferenceServerClient(server.grpc_url if k % 2 else server.http_url)
        try:
            for i in range(12):
                task = TASKS[(k + i) % len(TASKS)]
                bad = i % 5 == 4  # every fifth request is invalid (bad UTF-8)
                texts = [b"\xff\xfe"] if bad else [f"client {k} request {i} about football and markets"]
                try:
                    kwargs = {"client_timeout": 60} if k % 2 else {}
                    c.infer(task, [text_input(proto, texts)], **kwargs)
                    outcome = "ok"
                except InferenceServerException:
                    outcome = "error"
                assert (outcome == "error") == bad
                with lock:
                    sent[outcome] += 1
        finally:
            c.close()

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    delta = settle(server, TASKS, before)
    assert sent["ok"] + sent["error"] == 16 * 12
    assert sum(d[0] for d in delta.values()) == 16 * 12, delta
    for task, (received, responded, dup) in delta.items():
        assert received == responded, f"{task}: {received} received, {responded} answered"
        assert dup == 0


def test_client_timeouts_and_cancellations_still_get_one_response_each(server: Server) -> None:
    """Clients that give up (gRPC deadline) or cancel do not leave requests
    unanswered on the host, and the host keeps serving."""
    before = snapshot(server, ("intent", "sentiment"))
    stop = threading.Event()

    def backlog() -> None:  # keep the host busy so the short waits expire
        c = grpcclient.InferenceServerClient(server.grpc_url)
        while not stop.is_set():
            c.infer("intent", [text_input(grpcclient, ["book me a table for two tonight"] * 48)], client_timeout=60)
        c.close()

    threads = [threading.Thread(target=backlog, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    gave_up = 0
    try:
        time.sleep(0.3)
        for _ in range(10):
            with pytest.raises(InferenceServerException, match="Deadline"):
                c.infer("sentiment", [text_input(grpcclient, ["too late"])], client_timeout=0.005)
            gave_up += 1
        done: list[Any] = []
        for _ in range(5):
            ctx = c.async_infer("sentiment", [text_input(grpcclient, ["cancel me"])], callback=lambda r, e: done.append(e), client_timeout=60)
            ctx.cancel()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    delta = settle(server, ("intent", "sentiment"), before)
    for task, (received, responded, dup) in delta.items():
        assert received == responded and dup == 0, (task, delta)
    assert gave_up == 10
    ok = c.infer("sentiment", [text_input(grpcclient, ["An absolutely delightful evening, I loved it."])], client_timeout=60)
    assert ok.as_numpy("LABEL")[0] == b"positive"
    c.close()


def test_triton_timeout_fails_a_queued_request_within_one_batch(server: Server) -> None:
    """A request carrying a Triton timeout (microseconds) behind a backlog gets
    'deadline exceeded' (UNAVAILABLE) as soon as a worker is free, not after the
    backlog: within about one batch (the fastest backlog request, which waited
    for nothing, measures a batch), and sooner than the typical backlog request."""
    stop = threading.Event()
    latencies: list[float] = []

    def backlog() -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        while not stop.is_set():
            t0 = time.monotonic()
            c.infer("intent", [text_input(grpcclient, ["please book a table for four tomorrow night"] * 64)], client_timeout=120)
            latencies.append(time.monotonic() - t0)
        c.close()

    threads = [threading.Thread(target=backlog, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        deadline = time.monotonic() + 120
        while not latencies and time.monotonic() < deadline:  # the backlog is being served
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException, match="deadline exceeded") as err:
            c.infer("sentiment", [text_input(grpcclient, ["quick"])], timeout=2000, client_timeout=60)
        took = time.monotonic() - t0
        assert "UNAVAILABLE" in str(err.value)
        r = c.infer("sentiment", [text_input(grpcclient, ["fine"])], priority=1, client_timeout=120)  # priority accepted
        assert r.as_numpy("LABEL") is not None
        seen = len(latencies)
        while len(latencies) < seen + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        c.close()
    batch = min(latencies)
    assert took <= 1.5 * batch + 0.05, f"the expired request waited {took:.2f}s, more than about one batch ({batch:.2f}s)"
    assert took < statistics.median(latencies), f"the expired request waited {took:.2f}s, as long as a typical backlog request ({statistics.median(latencies):.2f}s)"


def test_undeploy_while_requests_are_queued_answers_each_once(server: Server) -> None:
    """Flood a vFM, undeploy it mid-flood: requests Triton accepted are answered
    (the host keeps their task), later ones are refused by Triton; none hangs."""
    before = snapshot(server, ("intent",))
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller(k: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        for _i in range(8):
            try:
                r = c.infer("intent", [text_input(grpcclient, ["is it going to rain tomorrow?"] * 16)], client_timeout=60)
                assert list(r.as_numpy("LABEL")) == [b"weather"] * 16
                o = "ok"
            except InferenceServerException as exc:
                o = "refused" if ("unknown model" in str(exc) or "not found" in str(exc) or "unavailable" in str(exc).lower()) else f"other: {exc}"
            with lock:
                outcomes.append(o)
        c.close()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while counts(server, "intent")[0] < before["intent"][0] + 6 and time.monotonic() < deadline:
        time.sleep(0.05)  # undeploy once the host has received requests: mid-flood by count, not by sleep
    fmplex = server.cli("undeploy", "intent", "--url", server.grpc_url)
    out = subprocess.run(fmplex, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a client hung"
    out = subprocess.run(server.cli("deploy", "intent", "--url", server.grpc_url), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(outcomes) == 48
    assert all(o in ("ok", "refused") for o in outcomes), [o for o in outcomes if o not in ("ok", "refused")][:3]
    assert "ok" in outcomes
    delta = settle(server, ("intent",), before)
    received, responded, dup = delta["intent"]
    assert received == responded and dup == 0
    assert received == outcomes.count("ok"), "every request the host received was answered with its result"


def test_no_response_was_ever_sent_twice(server: Server) -> None:
    text = server.metrics()
    assert 'outcome="duplicate_suppressed"' not in text
    assert any(line.startswith("fmplex_task_responses_total{") for line in text.splitlines())
