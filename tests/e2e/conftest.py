"""A real tritonserver on a copy of the embedded repository, shared by the e2e tests.

One server per test session (the backbone takes seconds to load on 2 cores);
tests that change state (deploys, weights) put it back. The image and series
modules share a second one (``vision_series``). Ports are picked free
so parallel runs do not collide; the server is always stopped at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from fmplex.control import serving
from fmplex.control.server import Ports, TritonProcess, free_ports

if TYPE_CHECKING:
    from .vision_series import VisionSeries

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "model_repository"
FMPLEX = str(Path(sys.executable).parent / "fmplex")


@dataclasses.dataclass
class Server:
    proc: TritonProcess
    repo: Path
    ports: Ports
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of one fmplex metric over the series matching ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{"):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def answered(self, task: str) -> float:
        """Requests of ``task`` that got their final response: every outcome
        except the two that annotate one (``send_failed`` is counted besides
        the outcome when Triton refused the send, ``duplicate_suppressed`` for
        a second final response that was dropped); docs/settings-and-metrics.md."""
        name = "fmplex_task_responses_total"
        return self.metric(name, task=task) - self.metric(name, task=task, outcome="send_failed") - self.metric(
            name, task=task, outcome="duplicate_suppressed"
        )

    def wait_metric(self, name: str, at_least: float, timeout: float = 15.0, **labels: str) -> float:
        """The metric once it reaches ``at_least`` (the host publishes every
        0.25 s, later on a busy machine), or its value at the timeout."""
        import time  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.2)

    def settled(self, tasks: object, timeout: float = 15.0) -> None:
        """Wait until the host has published a response for every request of
        these tasks it received (its counters flush every 0.25 s)."""
        import time  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            # equal counts can still be behind (both wait for the next publication): wait until they stop moving too
            text = [ln for ln in self.metrics().splitlines() if ln.startswith("fmplex_task_")]
            if text != last:
                last, since = text, time.monotonic()
            if time.monotonic() - since >= 0.8 and all(
                self.metric("fmplex_task_received_total", task=t) == self.answered(t)
                and self.metric("fmplex_task_served_requests_total", task=t)
                == self.metric("fmplex_task_responses_total", task=t, outcome="ok")
                for t in tasks  # type: ignore[attr-defined]
            ):
                return
            time.sleep(0.2)

    def host_loads(self) -> int:
        """How often Triton started loading the backbone host (from its own log)."""
        return self.log.read_text(errors="replace").count('loading: fm.minilm:1"')

    def cli(self, *args: str) -> list[str]:
        return [FMPLEX, *args, "--repo", str(self.repo)]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("e2e")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)
    ports = free_ports()
    log = work / "tritonserver.log"
    proc = serving.start(repo, ports, log_path=log)
    try:
        yield Server(proc, repo, ports, log)
    finally:
        proc.stop()


@pytest.fixture(scope="package")
def vision_series(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisionSeries]:
    """The server with the image and series hosts and every task that
    test_vision_series.py and test_fuzz_vision_series.py send to (vision_series.py).
    Package scope: it stops once the last e2e test has run, before the unit tests."""
    from .vision_series import started  # noqa: PLC0415 - torch and the families only for the modules that use it

    with started(tmp_path_factory.mktemp("vision_series")) as served:
        yield served


@pytest.fixture
def http(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60, connection_timeout=10)
    yield client
    client.close()


@pytest.fixture
def grpc(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def text_input(mod: object, texts: list[str] | list[bytes], dtype: str = "BYTES") -> object:
    arr = np.array([t if isinstance(t, bytes) else t.encode("utf-8") for t in texts], dtype=object)
    inp = mod.InferInput("TEXT", list(arr.shape), dtype)  # type: ignore[attr-defined]
    inp.set_data_from_numpy(arr)
    return inp
