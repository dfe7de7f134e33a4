"""``fmplex cluster`` as a user runs it: up (one process), deploy, status, a dead tritonserver replaced, Ctrl-C.

A one-node local cluster (``fmplex cluster up``, 127.0.0.1 only) on a copy of
the embedded repository, driven by the CLI in subprocesses. A replica's
tritonserver is killed: Serve's health check fails, Serve replaces the
replica, and the task is answered again from the new one. Ctrl-C stops the
whole Ray cluster: no Ray, tritonserver or stub process of it is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from fmplex.cluster.testbed import TAG_VAR, wait_none_left
from fmplex.control.server import free_ports

from .conftest import EMBEDDED, FMPLEX, text_input

pytestmark = pytest.mark.e2e

REPLACED_BOUND_S = 150.0  # a dead tritonserver -> a new replica answers (a tritonserver start on 2 busy cores)


def _cli(repo: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FMPLEX, "cluster", *args, "--repo", str(repo)], capture_output=True, text=True, timeout=timeout)


def _infer_ok(port_http: int, port_grpc: int) -> np.ndarray:
    http = httpclient.InferenceServerClient(f"127.0.0.1:{port_http}", network_timeout=120)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{port_grpc}")
    try:
        a = http.infer("sentiment", [text_input(httpclient, ["I loved it"])]).as_numpy("LOGITS")
        b = grpc.infer("sentiment", [text_input(grpcclient, ["I loved it"])]).as_numpy("LOGITS")
        np.testing.assert_allclose(a, b, atol=1e-4)
        return a
    finally:
        http.close()
        grpc.close()


def test_cluster_cli_up_deploy_status_replace_and_stop(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED, repo)
    ports = free_ports()
    rec = _cli(repo, "deploy", "minilm", "--replicas", "1", "--offline")
    assert rec.returncode == 0, rec.stderr
    log = open(tmp_path / "up.log", "w")
    tag = uuid.uuid4().hex  # every process of the cluster inherits it: none may be left after Ctrl-C
    up = subprocess.Popen(
        [FMPLEX, "cluster", "up", "--repo", str(repo), "--http-port", str(ports.http), "--grpc-port", str(ports.grpc)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, TAG_VAR: tag},
    )
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C to stop" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "cluster up did not come up in 300 s"
            time.sleep(1)
        endpoint = json.loads((repo / "fmplex.cluster.endpoint.json").read_text())
        assert endpoint["address"].startswith("127.0.0.1:")

        first = _infer_ok(ports.http, ports.grpc)
        st = _cli(repo, "status", "--json")
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        (replica,) = status["replicas"]
        assert replica["tasks"] == ["sentiment"] and replica["healthy"] and replica["address"] == "127.0.0.1"
        table = _cli(repo, "status")
        assert "sentiment" in table.stdout and replica["replica"] in table.stdout

        # declarative scale to the same count keeps the replica
        same = _cli(repo, "scale", "minilm", "--replicas", "1")
        assert same.returncode == 0, same.stderr
        assert [r["replica"] for r in json.loads(_cli(repo, "status", "--json").stdout)["replicas"]] == [replica["replica"]]

        # a dead tritonserver: Serve replaces the replica, the task is answered again
        t0 = time.monotonic()
        os.kill(replica["server_pid"], signal.SIGKILL)
        while True:
            try:
                again = _infer_ok(ports.http, ports.grpc)
                now = json.loads(_cli(repo, "status", "--json").stdout)["replicas"]
                if now and now[0]["replica"] != replica["replica"]:
                    break
            except Exception:  # noqa: BLE001 - UNAVAILABLE while the replacement starts
                pass
            assert time.monotonic() - t0 < REPLACED_BOUND_S, "the replica was not replaced in time"
            time.sleep(2)
        np.testing.assert_allclose(again, first, atol=1e-4)
        print(f"\ndead tritonserver -> replaced replica answering after {time.monotonic() - t0:.1f}s")

        bad = _cli(repo, "scale", "vit", "--replicas", "2")
        assert bad.returncode != 0 and "not deployed" in bad.stderr
    finally:
        os.kill(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        finally:
            log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "stopped" in (tmp_path / "up.log").read_text()
    # no Ray process, tritonserver, stub or reaper is left: the killed tritonserver's stubs included
    left = wait_none_left(tag)
    assert not left, f"processes left after Ctrl-C: {left}"
    assert not (repo / "fmplex.cluster.endpoint.json").exists()
