"""Bounded soak: a few minutes of mixed load, deploys/undeploys and weight
changes on one real server. Off in ``make test``; ``make soak`` runs it
(SOAK_SECONDS, default 180). Reports requests sent/answered/failed — failures
only where expected (deliberately invalid requests; the undeployed task while
it is out) — and server memory at start and end (bounded growth).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fmplex.control import serving
from fmplex.control.server import free_ports

from ..e2e.conftest import EMBEDDED, text_input

pytestmark = pytest.mark.soak
FMPLEX = str(Path(sys.executable).parent / "fmplex")
ROOT = Path(__file__).resolve().parents[2]


def server_pss_mib(pid: int) -> float:
    pids, frontier, total = [pid], [pid], 0
    while frontier:
        p = frontier.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        pids += kids
        frontier += kids
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def test_soak(tmp_path: Path) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "180"))
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED, repo)
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=tmp_path / "server.log", watchdog=True)
    grpc_url, http_url = f"127.0.0.1:{ports.grpc}", f"127.0.0.1:{ports.http}"
    stats = {"sent": 0, "ok": 0, "expected_fail": 0, "unexpected": []}
    lock = threading.Lock()
    stop = threading.Event()
    out_window = threading.Event()  # set while 'intent' is undeployed

    def client(k: int) -> None:
        rng = random.Random(k)
        proto = grpcclient if k % 2 else httpclient
        c = proto.InferenceServerClient(grpc_url if k % 2 else http_url)
        while not stop.is_set():
            task = rng.choice(["sentiment", "topic", "intent", "embed"])
            bad = rng.random() < 0.05
            texts = [b"\xff\xfe"] if bad else [f"soak {k} {rng.random()} the match and the markets"] * rng.randint(1, 6)
            try:
                kwargs = {"client_timeout": 60} if k % 2 else {}
                c.infer(task, [text_input(proto, texts)], **kwargs)
                outcome = "ok" if not bad else "unexpected: invalid request answered"
            except InferenceServerException as exc:
                refused = task == "intent" and ("unknown model" in str(exc) or "not found" in str(exc) or "unavailable" in str(exc).lower())
                outcome = "expected_fail" if bad or refused else f"unexpected: {exc}"
            with lock:
                stats["sent"] += 1
                if outcome.startswith("unexpected"):
                    stats["unexpected"].append(outcome[:200])
                else:
                    stats[outcome] += 1
        c.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
    try:
        for t in threads:
            t.start()
        time.sleep(10)  # warm up: allocator pools and every extension loaded
        mem0 = server_pss_mib(proc.proc.pid)  # type: ignore[union-attr]
        t_end = time.monotonic() + seconds
        cycles = 0
        while time.monotonic() < t_end:
            time.sleep(5)
            out_window.set()
            subprocess.run([FMPLEX, "undeploy", "intent", "--repo", str(repo), "--url", grpc_url], check=True, capture_output=True, timeout=120)
            time.sleep(2)
            subprocess.run([FMPLEX, "deploy", "intent", "--repo", str(repo), "--url", grpc_url], check=True, capture_output=True, timeout=120)
            out_window.clear()
            weight = random.choice(["0.5", "1", "2", "4"])
            subprocess.run([FMPLEX, "task", "set-weight", "topic", weight, "--repo", str(repo)], check=True, capture_output=True, timeout=60)
            cycles += 1
        stop.set()
        for t in threads:
            t.join(timeout=120)
        mem1 = server_pss_mib(proc.proc.pid)  # type: ignore[union-attr]
    finally:
        stop.set()
        proc.stop()
    report = {
        "seconds": seconds,
        "sent": stats["sent"],
        "answered": stats["ok"],
        "failed_expected": stats["expected_fail"],
        "failed_unexpected": len(stats["unexpected"]),
        "deploy_cycles": cycles,
        "memory_pss_mib": {"start": round(mem0, 1), "end": round(mem1, 1)},
    }
    print("\nsoak:", json.dumps(report))
    (ROOT / "perf" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "perf" / "results" / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    assert stats["unexpected"] == [], stats["unexpected"][:5]
    assert stats["sent"] == stats["ok"] + stats["expected_fail"]
    assert stats["ok"] > 10 * seconds / 10
    # Bounded growth: allocator warm-up and extension reloads, not a leak.
    assert mem1 <= mem0 * 1.15 + 64, f"server memory grew from {mem0:.0f} to {mem1:.0f} MiB"
