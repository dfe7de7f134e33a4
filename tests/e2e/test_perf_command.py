"""``fmplex perf`` against a real tritonserver serving a text vFM and a generative vFM.

One server for this module: the embedded repository (MiniLM text tasks) plus
the SmolLM2 hosts and a generative task ``chat`` (with its ``chat.stream``
twin), made with the CLI. Every run sends a fixed number of requests
(``--request-count``), so Triton's own statistics of each vFM must have grown
by exactly the count perf_analyzer reports, with no failures.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import tritonclient.http as httpclient

from fmplex.control import serving
from fmplex.control.server import free_ports
from fmplex.control import workflows

from .conftest import EMBEDDED, Server

pytestmark = pytest.mark.e2e

FMPLEX = str(Path(sys.executable).parent / "fmplex")


def _cli(*args: str) -> str:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def mixed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("perf")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)
    _cli("init", str(repo), "--backbone", "smollm2", "--slots", "4")
    _cli("task", "create", "chat", "--backbone", "smollm2", "--kind", "generate", "--repo", str(repo))
    _cli("deploy", "chat", "--offline", "--repo", str(repo))
    ports = free_ports()
    log = work / "tritonserver.log"
    t0 = time.monotonic()
    proc = serving.start(repo, ports, log_path=log)
    try:
        workflows.start_up(f"127.0.0.1:{ports.grpc}", repo, None)
        print(f"server with MiniLM and SmolLM2 hosts ready in {time.monotonic() - t0:.1f} s")
        yield Server(proc, repo, ports, log)
    finally:
        proc.stop()


def _stats(server: Server, model: str) -> tuple[int, int, int]:
    """(inference_count, success count, fail count) from Triton's statistics API."""
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        s = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return int(s["inference_count"]), int(s["inference_stats"]["success"]["count"]), int(s["inference_stats"]["fail"]["count"])


def _perf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FMPLEX, "perf", *args], capture_output=True, text=True, timeout=300)


def _reported_counts(stdout: str) -> dict[str, int]:
    """Requests per model from the summary (perf_analyzer's own 'Request count')."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+)\s+concurrency \d+\s+[\d.]+ infer/s\s+(\d+) requests", stdout, re.M)}


def test_text_and_generative_vfms_at_once(mixed_server: Server, tmp_path: Path) -> None:
    before = {m: _stats(mixed_server, m) for m in ("sentiment", "chat")}
    report = tmp_path / "report.csv"
    out = _perf("sentiment", "chat", "--url", mixed_server.grpc_url, "--concurrency-range", "2", "--request-count", "6",
                "--max-tokens", "4", "-f", str(report), "--write-input-data", str(tmp_path / "inputs"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    counts = _reported_counts(out.stdout)
    assert counts == {"sentiment": 6, "chat": 6}, out.stdout[-2000:]
    for model in ("sentiment", "chat"):
        with (tmp_path / f"report.{model}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert float(rows[0]["Inferences/Second"]) > 0, rows
        after = _stats(mixed_server, model)
        grew = [a - b for a, b in zip(after, before[model])]
        assert grew == [counts[model], counts[model], 0], (model, before[model], after)  # inference, success, fail
    total = re.search(r"sum of 2\s+concurrency 2\s+([\d.]+) infer/s", out.stdout)
    assert total and float(total.group(1)) > 0, out.stdout[-1000:]
    text = json.loads((tmp_path / "inputs" / "sentiment.json").read_text())["data"]
    gen = json.loads((tmp_path / "inputs" / "chat.json").read_text())["data"]
    assert len({len(e["TEXT"]["content"][0]) for e in text}) > 3 and all("MAX_TOKENS" not in e for e in text)
    assert all(e["MAX_TOKENS"]["content"] == [4] for e in gen)
    assert "LD_LIBRARY_PATH=" in out.stdout  # the command line shown is one a user can paste


def test_streaming_twin_reports_time_to_first_response(mixed_server: Server) -> None:
    before = _stats(mixed_server, "chat.stream")
    out = _perf("chat", "--streaming", "--url", mixed_server.grpc_url, "--request-count", "3", "--max-tokens", "4")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "--streaming" in out.stdout and _reported_counts(out.stdout) == {"chat.stream": 3}
    ttft = re.search(r"chat\.stream\s+time to first response: avg ([\d.]+) ms.* over (\d+) requests", out.stdout)
    assert ttft and float(ttft.group(1)) > 0 and int(ttft.group(2)) == 3, out.stdout[-1000:]
    grew = [a - b for a, b in zip(_stats(mixed_server, "chat.stream"), before)]
    assert grew == [3, 3, 0]


def test_perf_analyzer_failure_is_reported_with_its_status(mixed_server: Server, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.json"  # a generative request sent to a text vFM
    wrong.write_text(json.dumps({"data": [{"TEXT": {"content": ["hi"], "shape": [1]}, "MAX_TOKENS": {"content": [4], "shape": [1]}}]}))
    out = _perf("sentiment", "--url", mixed_server.grpc_url, "--request-count", "2", "--input-data", str(wrong))
    assert out.returncode not in (0, 1), out.returncode  # perf_analyzer's own exit status
    assert "perf_analyzer failed on sentiment" in out.stderr and "'MAX_TOKENS' is not found" in out.stderr


def test_http_with_several_sentences_per_request(mixed_server: Server, tmp_path: Path) -> None:
    before = _stats(mixed_server, "topic")
    out = _perf("topic", "-i", "http", "--url", mixed_server.http_url, "--request-count", "5", "--rows", "3",
                "--write-input-data", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "--shape TEXT:3" in out.stdout and _reported_counts(out.stdout) == {"topic": 5}
    assert all(e["TEXT"]["shape"] == [3] for e in json.loads((tmp_path / "topic.json").read_text())["data"])
    assert [a - b for a, b in zip(_stats(mixed_server, "topic"), before)] == [5, 5, 0]
