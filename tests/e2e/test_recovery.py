"""Faults of the host itself, with requests in flight: nothing hangs, service returns.

Its own server (a locked one, started as ``fmplex serve`` does, with the host
watchdog). In order: the host's stub process is killed (Triton answers every
request with "Stub process ... is not healthy" and never restarts it: the
watchdog reloads the host, and the recovery time is measured); the host is
unloaded and loaded again; finally the server is shut down. Under each fault,
a flood of clients is running and every one of their calls must return — an
answer or an error — within its bounded wait.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from typing import Iterator

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fmplex.control import serving
from fmplex.control.server import GRPC_API_KEY_HEADER, free_ports

from .conftest import EMBEDDED, Server, text_input

KEY = "recovery-test-key"


class Flood:
    """Clients calling back to back; counts outcomes; every wait bounded."""

    def __init__(self, server: Server, clients: int = 6, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.server = server
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.lost: list[tuple[int, float]] = []  # (client, time.time() it was sent) of calls that ran into their deadline
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        c = grpcclient.InferenceServerClient(self.server.grpc_url)
        while not self.stop.is_set():
            sent = time.time()
            try:
                c.infer("topic", [text_input(grpcclient, ["Shares rallied after strong earnings"] * 4)], client_timeout=self.timeout)
                with self.lock:
                    self.ok += 1
            except InferenceServerException as exc:
                with self.lock:
                    self.errors.append(str(exc)[:200])
                    if "DEADLINE_EXCEEDED" in str(exc):
                        self.lost.append((k, sent))
                time.sleep(0.05)
        c.close()

    def __enter__(self) -> Flood:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in self.threads), "a client call hung"


def probe(server: Server) -> bool:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        r = c.infer("sentiment", [text_input(grpcclient, ["What a wonderful, friendly place."])], client_timeout=30)
        return r.as_numpy("LABEL")[0] == b"positive"
    except InferenceServerException:
        return False
    finally:
        c.close()


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("recovery")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / "server.log", api_key=KEY, watchdog=True)
    try:
        yield Server(proc, repo, ports, work / "server.log")
    finally:
        proc.stop()


def test_killed_stub_is_reloaded_by_the_watchdog(locked: Server) -> None:
    assert probe(locked)
    pid = int(locked.metric("fmplex_host_pid"))
    with Flood(locked, clients=6, timeout=20.0) as flood:
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        while not probe(locked):
            assert time.monotonic() - t0 < 120, "the host did not come back"
            time.sleep(0.5)
        recovery = time.monotonic() - t0
        time.sleep(1.0)
    print(f"\nstub killed: service back after {recovery:.1f}s; flood: {flood.ok} ok, {len(flood.errors)} errors")
    wd = locked.proc.watchdog
    assert wd is not None and len(wd.recoveries) == 1 and wd.recoveries[0].error is None
    assert flood.ok > 0
    # Requests inside the stub when it died are never answered by Triton: their
    # clients see their own deadline. Counted and ordered, not timed: each client
    # has one call in flight, so at most one such call per client, and every one
    # was sent before the watchdog saw the stub gone (later calls get Triton's
    # "not healthy" error at once, or an answer).
    lost = [e for e in flood.errors if "DEADLINE_EXCEEDED" in e]
    clients = [k for k, _ in flood.lost]
    assert len(clients) == len(set(clients)), f"a client lost more than one call: {flood.lost}"
    detected = wd.recoveries[0].detected_at
    assert all(sent < detected for _, sent in flood.lost), f"a call sent after the death was detected got no answer: {flood.lost}"
    assert all("not healthy" in e or "unavailable" in e.lower() or "DEADLINE_EXCEEDED" in e for e in flood.errors), flood.errors[:3]
    print(f"in flight at the kill: {len(lost)} client deadlines; refused while dead: {len(flood.errors) - len(lost)}")
    assert int(locked.metric("fmplex_host_pid")) != pid


def test_a_second_stub_death_is_recovered_too(locked: Server) -> None:
    """Triton ignores a load whose override equals the config it last parsed,
    so a watchdog that re-sent the same config recovered only the first death."""
    assert probe(locked)
    wd = locked.proc.watchdog
    assert wd is not None
    before = len(wd.recoveries)
    for _ in range(2):
        pid = int(locked.metric("fmplex_host_pid"))
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        while not probe(locked):
            assert time.monotonic() - t0 < 120, "the host did not come back"
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while int(locked.metric("fmplex_host_pid")) == pid and time.monotonic() < deadline:
            time.sleep(0.3)  # the new instance publishes its pid within a flush
        assert int(locked.metric("fmplex_host_pid")) != pid
    assert len(wd.recoveries) == before + 2 and all(r.error is None for r in wd.recoveries[before:])


def test_host_unload_and_reload_with_requests_in_flight(locked: Server) -> None:
    headers = {GRPC_API_KEY_HEADER: KEY}
    c = grpcclient.InferenceServerClient(locked.grpc_url)
    try:
        with Flood(locked) as flood:
            time.sleep(1.0)
            c.unload_model("fm.minilm", headers=headers, client_timeout=120)
            time.sleep(1.0)
            c.load_model("fm.minilm", headers=headers, client_timeout=300)
            t0 = time.monotonic()
            while not probe(locked):
                assert time.monotonic() - t0 < 60, "vFMs did not answer after the host came back"
                time.sleep(0.5)
            time.sleep(0.5)
    finally:
        c.close()
    assert flood.ok > 0 and flood.errors, "the unload window should refuse some requests"


def test_shutdown_with_requests_in_flight_ends_every_call(locked: Server) -> None:
    flood = Flood(locked, clients=8)
    with flood:
        time.sleep(1.0)
        t0 = time.monotonic()
        locked.proc.stop()
        stopped = time.monotonic() - t0
        time.sleep(0.5)
    assert stopped < 60
    assert flood.ok > 0
    assert flood.errors, "calls after the shutdown must fail, not hang"
    assert locked.proc.proc is not None and locked.proc.proc.poll() is not None

