"""vFM lifecycle under load: undeploy/redeploy and re-weighting never touch the backbone."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import Server, text_input


class Stream(threading.Thread):
    """A client sending one task's requests back to back, counting outcomes."""

    def __init__(self, server: Server, task: str, protocol: str, rows: int = 1, deadline: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.server, self.task, self.protocol, self.rows = server, task, protocol, rows
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + deadline  # bounded even if the test forgets to stop it

    def run(self) -> None:
        mod = grpcclient if self.protocol == "grpc" else httpclient
        url = self.server.grpc_url if self.protocol == "grpc" else self.server.http_url
        client = mod.InferenceServerClient(url)
        texts = [f"request text number {i} about a film I saw" for i in range(self.rows)]
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    if self.protocol == "grpc":
                        r = client.infer(self.task, [text_input(mod, texts)], client_timeout=30)
                    else:
                        r = client.infer(self.task, [text_input(mod, texts)])
                    if r.as_numpy("LABEL") is None or len(r.as_numpy("LABEL")) != self.rows:
                        self.errors.append("malformed response")
                    else:
                        self.ok += 1
                except InferenceServerException as exc:
                    self.errors.append(str(exc))
        finally:
            client.close()


def run_cli(server: Server, *args: str, url: bool = True) -> str:
    cmd = server.cli(*args, *(("--url", server.grpc_url) if url else ()))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_undeploy_redeploy_under_load_loses_nothing_and_keeps_the_backbone(server: Server) -> None:
    loads0 = server.host_loads()
    pid0 = server.metric("fmplex_host_pid")
    assert loads0 == 1 and pid0 > 0
    streams = [Stream(server, "sentiment", "http"), Stream(server, "topic", "grpc")]
    for s in streams:
        s.start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for _ in range(3):
            time.sleep(0.5)
            run_cli(server, "undeploy", "intent")
            with pytest.raises(InferenceServerException):
                client.infer("intent", [text_input(grpcclient, ["hello"])], client_timeout=30)
            time.sleep(0.3)
            out = run_cli(server, "deploy", "intent")
            assert "deployed intent v1" in out
            r = client.infer("intent", [text_input(grpcclient, ["hi, good morning"])], client_timeout=30)
            assert r.as_numpy("LABEL")[0] == b"greeting"
        time.sleep(0.5)
    finally:
        client.close()
        for s in streams:
            s.stop.set()
        for s in streams:
            s.join(timeout=60)
    for s in streams:
        assert not s.is_alive()
        assert s.errors == [], f"{s.task}: {len(s.errors)} failed, first: {s.errors[:1]}"
        assert s.ok > 10, f"{s.task} answered only {s.ok} requests"
    assert server.host_loads() == loads0, "the backbone host was reloaded"
    assert server.metric("fmplex_host_pid") == pid0


def test_set_weight_takes_effect_without_reload(server: Server) -> None:
    """Two saturating tasks: equal weights share the backbone about equally;
    after ``set-weight`` to 4:1 the heavier one gets most rows — live."""
    loads0 = server.host_loads()
    pid0 = server.metric("fmplex_host_pid")
    tasks = ("sentiment", "intent")

    def window(seconds: float) -> dict[str, float]:
        # 32-row requests, 6 clients per task: both queues stay backlogged even while batches
        # grow to 64 rows (2 requests each, one batch per worker in flight), so the scheduler
        # (not the clients) decides the split.
        streams = [Stream(server, t, "grpc", rows=32) for t in tasks for _ in range(6)]
        for s in streams:
            s.start()
        time.sleep(2.0)  # reach steady state
        time.sleep(0.6)
        before = {t: server.metric("fmplex_task_served_rows_total", task=t) for t in tasks}
        time.sleep(seconds)
        after = {t: server.metric("fmplex_task_served_rows_total", task=t) for t in tasks}
        for s in streams:
            s.stop.set()
        for s in streams:
            s.join(timeout=60)
        assert all(not s.errors for s in streams), [s.errors[:1] for s in streams if s.errors]
        return {t: after[t] - before[t] for t in tasks}

    try:
        equal = window(6.0)
        ratio_equal = equal["sentiment"] / max(1.0, equal["intent"])
        out = run_cli(server, "task", "set-weight", "sentiment", "4", url=False)
        assert "weight 1 -> 4" in out
        time.sleep(0.3)
        weighted = window(6.0)
        ratio_weighted = weighted["sentiment"] / max(1.0, weighted["intent"])
    finally:
        run_cli(server, "task", "set-weight", "sentiment", "1", url=False)
    assert server.metric("fmplex_task_weight", task="sentiment") in (1.0, 4.0)
    assert 0.6 < ratio_equal < 1.6, f"equal weights served {equal}"
    print(f"\nset-weight: equal {equal} ({ratio_equal:.2f}), 4:1 {weighted} ({ratio_weighted:.2f})")
    assert ratio_weighted > 2.5, f"weights 4:1 served {weighted} (ratio {ratio_weighted:.2f}, before {ratio_equal:.2f})"
    assert server.host_loads() == loads0 and server.metric("fmplex_host_pid") == pid0


def test_status_reports_tasks_from_triton(server: Server, http: httpclient.InferenceServerClient) -> None:
    http.infer("sentiment", [text_input(httpclient, ["counted"])])
    out = run_cli(server, "status", "--metrics-url", f"http://127.0.0.1:{server.ports.metrics}/metrics")
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    assert lines["host"][2].startswith("READY"), out
    for task in ("sentiment", "topic", "intent", "embed"):
        assert lines[task][2] == "READY", out
        assert int(lines[task][7]) >= 0
    assert lines["sentiment"][1] == "classifier"
    assert int(lines["sentiment"][7]) > 0, "status shows no requests for a task that served some"
    assert float(lines["sentiment"][10].strip("()")) > 1.0, "a classifier head has kilobytes of weights"
    assert lines["extensions:"], out
