"""Isolation under overload: does one task's flood hurt a well-behaved task?

Side by side in one run, on one real server:

1. ``unloaded``: the well-behaved task (1 sentence per request, one client,
   back to back) alone -> its p50/p99 latency;
2. ``flood``: the same, while perf_analyzer (another process) floods another
   task of equal weight with 10 concurrent 8-row requests back to back
   (over 10x its fair share of the backbone);

and the host's mean batch time during the flood. The target (issue "Never
lose a request"): loaded p99 <= 1.25 x unloaded p99 + one batch time.
Writes ``perf/results/overload_bench.json``.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _metric(metrics_url: str, name: str, **labels: str) -> float:
    """A counter summed over the series whose labels include ``labels``."""
    from fmplex.control.triton_api import scrape_metrics  # noqa: PLC0415

    want = set(labels.items())
    prefix = "fmplex_" if name.startswith("fmplex_") else name
    found = [v for (n, lab), v in scrape_metrics(metrics_url, prefix).items() if n == name and want <= set(lab)]
    return sum(found) if found else float("nan")  # NaN: not exposed (a counter not yet bumped), never a silent 0


def _flood_failures(metrics_url: str, flooder: str) -> dict[str, float]:
    """What the server counted against the flooding task: requests that failed
    (Triton's own counter for the vFM, what its client saw) and the host's
    reasons (queue full, expired)."""
    return {
        "failed": _metric(metrics_url, "nv_inference_request_failure", model=flooder),
        "rejected_queue_full": _metric(metrics_url, "fmplex_task_rejected_queue_full_total", task=flooder),
        "expired": _metric(metrics_url, "fmplex_task_expired_total", task=flooder),
    }


def flood_counts(before: dict[str, float], after: dict[str, float], flooder: str) -> dict[str, int]:
    """Counter increases over the flood. A counter not exposed (NaN) was never bumped: 0. Triton's
    own failure counter exists once the vFM has been called, so its absence after the flood is an error."""
    if math.isnan(after["failed"]):
        raise RuntimeError(f"Triton exposes no nv_inference_request_failure for '{flooder}': cannot count the flood's errors")
    return {k: 0 if math.isnan(after[k]) else int(after[k] - (0.0 if math.isnan(before[k]) else before[k])) for k in before}


def flood_error_lines(output: str) -> list[str]:
    """perf_analyzer's error lines (it prints failed requests' messages)."""
    return [ln.strip() for ln in output.splitlines() if "error" in ln.lower() or "failed" in ln.lower()][:20]


def _latencies(grpc_url: str, task: str, seconds: float) -> list[float]:
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    client = grpcclient.InferenceServerClient(grpc_url)
    inp = grpcclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"The staff were friendly and the room was clean."], dtype=object))
    out: list[float] = []
    end = time.monotonic() + seconds
    try:
        client.infer(task, [inp], client_timeout=60)  # warm
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.infer(task, [inp], client_timeout=60)
            out.append(time.perf_counter() - t0)
            time.sleep(0.02)  # a well-behaved client: ~a few requests/s, far below its share
    finally:
        client.close()
    return out


def measure(grpc_url: str, metrics_url: str, victim: str, flooder: str, seconds: float = 8.0, flood_clients: int = 10) -> dict[str, Any]:
    unloaded = _latencies(grpc_url, victim, seconds)
    e0 = _flood_failures(metrics_url, flooder)  # the flood's failures are counted from its start to the victim's last request
    # The flood comes from perf_analyzer, another process: flood clients in
    # this process would hold its GIL and delay the victim's own client.
    from fmplex.control.server import perf_analyzer_command  # noqa: PLC0415

    from perf.common import text_input_file  # noqa: PLC0415

    data = text_input_file(Path(tempfile.mkdtemp(prefix="fmplex-flood-")) / "flood.json", ["please book a table for four people tomorrow at eight"] * 8)
    cmd, env = perf_analyzer_command()
    flood = subprocess.Popen(
        [*cmd, "-m", flooder, "-u", grpc_url, "-i", "grpc", "--input-data", str(data), "--shape", "TEXT:8",
         "--concurrency-range", str(flood_clients), "--measurement-interval", str(int((seconds + 4) * 1000)),
         "--measurement-mode", "time_windows", "--max-trials", "1", "--stability-percentage", "999"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    time.sleep(2.0)
    b0, s0 = _metric(metrics_url, "fmplex_batch_batches_total"), _metric(metrics_url, "fmplex_batch_seconds_total")
    r0 = _metric(metrics_url, "fmplex_batch_rows_total")
    f0 = _metric(metrics_url, "fmplex_task_served_rows_total")
    loaded = _latencies(grpc_url, victim, seconds)
    time.sleep(0.5)
    b1, s1 = _metric(metrics_url, "fmplex_batch_batches_total"), _metric(metrics_url, "fmplex_batch_seconds_total")
    r1 = _metric(metrics_url, "fmplex_batch_rows_total")
    f1 = _metric(metrics_url, "fmplex_task_served_rows_total")
    e1 = _flood_failures(metrics_url, flooder)
    flood.terminate()
    try:
        flood_out, _ = flood.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        flood.kill()
        flood_out, _ = flood.communicate()
    shutil.rmtree(data.parent, ignore_errors=True)
    flood_done = [int((f1 - f0 - len(loaded)) / 8)]
    flood_errors = flood_counts(e0, e1, flooder)
    batch_s = (s1 - s0) / max(1.0, b1 - b0)
    p = lambda xs, q: float(np.percentile(np.array(xs) * 1000, q))  # noqa: E731
    res = {
        "victim": victim,
        "flooder": flooder,
        "unloaded_ms": {"p50": p(unloaded, 50), "p99": p(unloaded, 99), "n": len(unloaded)},
        "loaded_ms": {"p50": p(loaded, 50), "p99": p(loaded, 99), "n": len(loaded)},
        "batch_ms_mean": batch_s * 1000,
        "rows_per_batch": (r1 - r0) / max(1.0, b1 - b0),
        "flood_requests_served": flood_done[0],
        "victim_requests_per_s": len(loaded) / seconds,
        "flood_rows_per_s": 8 * flood_done[0] / (seconds + 0.5),
        "flood_errors": flood_errors["failed"],  # flood requests that failed while the victim was measured
        "flood_rejected_queue_full": flood_errors["rejected_queue_full"],
        "flood_expired": flood_errors["expired"],
        "flood_error_lines": flood_error_lines(flood_out or ""),
    }
    res["target_ms"] = 1.25 * res["unloaded_ms"]["p99"] + res["batch_ms_mean"]
    res["meets_target"] = res["loaded_ms"]["p99"] <= res["target_ms"]
    return res


def main() -> int:
    from fmplex.control import serving  # noqa: PLC0415
    from perf.common import write_results  # noqa: PLC0415
    from fmplex.control.server import free_ports  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-batch-rows", type=int, nargs="+", default=[64, 16],
                    help="host batch budgets to compare, each on its own server (default: 64 16)")
    args = ap.parse_args()
    results = {}
    for rows in args.max_batch_rows:
        work = Path(tempfile.mkdtemp(prefix="fmplex-overload-"))
        shutil.copytree(ROOT / "model_repository", work / "repo")
        cfg = work / "repo" / "fm.minilm" / "config.pbtxt"
        text = cfg.read_text()
        cfg.write_text(re.sub(r'key: "max_batch_rows" value \{ string_value: "\d+" \}', f'key: "max_batch_rows" value {{ string_value: "{rows}" }}', text))
        ports = free_ports()
        proc = serving.start(work / "repo", ports, log_path=work / "server.log")
        try:
            res = measure(f"127.0.0.1:{ports.grpc}", f"http://127.0.0.1:{ports.metrics}/metrics", "sentiment", "intent",
                          seconds=4.0 if args.quick else args.seconds)
        finally:
            proc.stop()
            shutil.rmtree(work, ignore_errors=True)
        results[f"max_batch_rows_{rows}"] = res
        print(f"== max_batch_rows {rows}")
        print(f"   victim '{res['victim']}' alone:   p50 {res['unloaded_ms']['p50']:7.1f} ms  p99 {res['unloaded_ms']['p99']:7.1f} ms")
        print(f"   while '{res['flooder']}' floods: p50 {res['loaded_ms']['p50']:7.1f} ms  p99 {res['loaded_ms']['p99']:7.1f} ms")
        print(f"   mean batch {res['batch_ms_mean']:.1f} ms ({res['rows_per_batch']:.1f} rows); flood {res['flood_rows_per_s']:.0f} rows/s; "
              f"target p99 <= {res['target_ms']:.1f} ms: {'met' if res['meets_target'] else 'MISSED'}")
        print(f"   flood errors {res['flood_errors']} (queue full {res['flood_rejected_queue_full']}, expired {res['flood_expired']})")
    write_results("overload_bench.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
