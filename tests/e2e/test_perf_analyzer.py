"""perf_analyzer, Triton's own load generator, drives a vFM like any model."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from fmplex.control.perf import perf_analyzer_command

from .conftest import Server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_measures_a_vfm(server: Server, tmp_path: Path, protocol: str) -> None:
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"TEXT": {"content": ["The service was quick and friendly."], "shape": [1]}}]}))
    cmd, env = perf_analyzer_command()
    url = server.grpc_url if protocol == "grpc" else server.http_url
    ok0 = server.metric("fmplex_task_served_requests_total", task="sentiment")
    out = subprocess.run(
        [*cmd, "-m", "sentiment", "-u", url, "-i", protocol, "--input-data", str(data), "--shape", "TEXT:1",
         "--concurrency-range", "4", "--measurement-interval", "1500", "--stability-percentage", "50", "--max-trials", "4"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    match = re.search(r"Concurrency: 4, throughput: ([\d.]+) infer/sec", out.stdout)
    assert match, out.stdout[-2000:]
    assert float(match.group(1)) > 5.0

    assert server.wait_metric("fmplex_task_served_requests_total", ok0 + 21, task="sentiment") - ok0 > 20
