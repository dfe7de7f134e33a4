"""Calibrating the cluster simulation against a real local cluster (fmplex/cluster/simulate.py).

A three-node local Ray cluster (two tritonserver replicas of fm.minilm, 12
tasks) is measured, and the simulation is fed those measurements and asked to
predict the same run:

1. costs: one replica's throughput, straight to its tritonserver, with 1, 2,
   4, 8 and 16 requests in flight (the simulation's throughput-by-batch-size
   curve); what the endpoint path adds to one request (Serve's gRPC proxy and
   the ingress: batch-1 time through the endpoint minus straight to the
   replica); the endpoint's capacity with 32 in flight over all tasks. The
   simulation models the endpoint as one FIFO server taking 1/capacity per
   request, plus the rest of the batch-1 difference as plain latency;
2. an open-loop Poisson run with a Zipf(1) mix over the 12 tasks at a share of
   the measured capacity, through the one gRPC endpoint: per-replica served
   load (each replica's own Triton statistics) and the client's p99;
3. the simulation of that run, replayed request by request: the same arrival
   times and tasks, with the tasks where the cluster put them.

Reports both and their relative errors (the goal: within 15%). Writes
``perf/results/cluster_calibration.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from fmplex.cluster import local  # noqa: E402
from fmplex.cluster.config import ClusterSpec  # noqa: E402
from fmplex.cluster.simulate import Costs, Workload, simulate  # noqa: E402
from fmplex.cluster.testbed import add_tasks, local_cluster  # noqa: E402
from perf.common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IN_FLIGHT = (1, 2, 4, 8, 16)
SENTENCE = "The battery died within an hour and support never replied."


def _input() -> grpcclient.InferInput:
    inp = grpcclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.array([SENTENCE.encode()], dtype=object))
    return inp


def closed_loop(port: int, tasks: list[str], clients: int, seconds: float) -> float:
    """Requests/s with ``clients`` in flight, round-robin over ``tasks``."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def run(k: int) -> None:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        i = k
        while time.monotonic() < stop:
            c.infer(tasks[i % len(tasks)], [_input()])
            done[k] += 1
            i += 1
        c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def open_loop(port: int, tasks: list[str], rates: list[float], seconds: float, seed: int = 0) -> tuple[list[float], int, list[tuple[float, int]]]:
    """Poisson arrivals per task (async gRPC); latencies of the answered ones (s), failures, and the
    arrivals as sent ((seconds since the start, task index), for the simulation to replay)."""
    rng = np.random.default_rng(seed)
    arrivals = []
    for task, rate in zip(tasks, rates):
        t = rng.exponential(1 / rate)
        while t < seconds:
            arrivals.append((t, task))
            t += rng.exponential(1 / rate)
    arrivals.sort()
    sent_at: list[tuple[float, int]] = []
    index = {t: i for i, t in enumerate(tasks)}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    latencies: list[float] = []
    failures = [0]
    pending = threading.Semaphore(0)
    lock = threading.Lock()
    t0 = time.monotonic()
    for at, task in arrivals:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.monotonic()
        sent_at.append((sent - t0, index[task]))

        def done(result: object, error: object, sent: float = sent) -> None:
            with lock:
                if error is None:
                    latencies.append(time.monotonic() - sent)
                else:
                    failures[0] += 1
            pending.release()

        client.async_infer(task, [_input()], callback=done)
    for _ in arrivals:
        pending.acquire(timeout=120)
    client.close()
    return latencies, failures[0], sent_at


def replica_counts(status: dict, tasks: list[str]) -> dict[str, int]:
    """Successful inferences each replica's own tritonserver has counted for these tasks."""
    out = {}
    for r in status["replicas"]:
        c = httpclient.InferenceServerClient(f"{r['address']}:{r['http_port']}")
        total = 0
        for t in r["tasks"]:
            if t in tasks:
                stats = c.get_inference_statistics(t)
                total += sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])
        out[r["replica"]] = total
        c.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the open-loop run")
    ap.add_argument("--utilisation", type=float, default=0.5, help="offered load as a share of the measured capacity")
    ap.add_argument("--cost-seconds", type=float, default=6.0, help="length of each throughput measurement")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine: the p99 is only as good as the machine is quiet
    work = Path(tempfile.mkdtemp(prefix="fmplex-cluster-bench-"))
    repo = work / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    tasks = sorted(add_tasks(repo, 8))
    spec = ClusterSpec(replicas={"minilm": 2}, hot_load=1e6, cool_load=1.0)  # no hot copies: a fixed placement to replay
    try:
        with local_cluster(repo, spec) as lc:
            port = lc.grpc_port
            closed_loop(port, tasks, 12, 3)  # first requests place every task; warm up
            status = local.placer_status()
            holder = next(r for r in status["replicas"] if tasks[0] in r["tasks"])
            # one replica (the holder of one task), k requests in flight: the throughput-by-batch-size curve
            curve = {k: closed_loop(holder["grpc_port"], tasks[:1], k, args.cost_seconds) for k in IN_FLIGHT}
            endpoint1 = closed_loop(port, tasks[:1], 1, args.cost_seconds)  # the same replica through the endpoint
            capacity = closed_loop(port, tasks, 32, args.cost_seconds)  # both replicas through the endpoint
            # the endpoint as one FIFO server: its work per request from its capacity (it, not the replicas,
            # limits it: see the direct curve), and the rest of what it adds to one request as plain latency
            endpoint_s = 1 / capacity
            overhead = max(0.0, 1 / endpoint1 - 1 / curve[1] - endpoint_s)
            rate = args.utilisation * capacity
            base = Workload(tasks=len(tasks), rate_per_task=rate / len(tasks), duration_s=args.seconds, warmup_s=0)
            status = local.placer_status()
            before = replica_counts(status, tasks)
            latencies, failures, trace = open_loop(port, tasks, base.rates(), args.seconds)
            after = replica_counts(local.placer_status(), tasks)
            status = local.placer_status()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    replicas = [r["replica"] for r in status["replicas"]]
    real_load = [(after[r] - before[r]) / args.seconds for r in replicas]
    real_p99 = float(np.percentile(latencies, 99) * 1000) if latencies else float("inf")
    placement = [replicas.index(next(r["replica"] for r in status["replicas"] if t in r["tasks"])) for t in tasks]
    costs = Costs(throughput=tuple((k, v) for k, v in sorted(curve.items())), overhead_s=overhead, endpoint_s=endpoint_s)
    # the same requests at the same times, plus the time the client needs after the last one to collect the answers
    replay = dataclasses.replace(base, duration_s=args.seconds + 30)
    sim = simulate("shared", 2, replay, costs, placement=placement, trace=trace)
    sim_load = [x * replay.duration_s / args.seconds for x in sim.replica_load]
    sim_p99 = sim.p99_ms
    load_err = [abs(s - r) / r if r else float("inf") for s, r in zip(sim_load, real_load)]
    p99_err = abs(sim_p99 - real_p99) / real_p99
    finite = lambda x: round(x, 3) if np.isfinite(x) else None  # noqa: E731 - JSON has no infinity
    sim_p99, p99_err = finite(sim_p99), finite(p99_err)
    results = {
        "measured_costs": {
            "rps_one_replica_direct_by_in_flight": {k: round(v, 1) for k, v in curve.items()},
            "rps_one_replica_through_endpoint_1_in_flight": round(endpoint1, 1),
            "endpoint_ms_per_request": round(endpoint_s * 1000, 1),
            "endpoint_latency_ms": round(overhead * 1000, 1),
            "rps_endpoint_32_in_flight": round(capacity, 1),
        },
        "offered_rps": round(rate, 1),
        "utilisation": args.utilisation,
        "machine_load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "real": {"replica_load_rps": [round(x, 1) for x in real_load], "p99_ms": round(real_p99, 1), "answered": len(latencies), "failures": failures},
        "simulated": {"replica_load_rps": [round(x, 1) for x in sim_load], "p99_ms": sim_p99},
        "relative_error": {"replica_load": [round(e, 3) for e in load_err], "p99": p99_err},
        "within_15_percent": bool(max(load_err) <= 0.15 and p99_err is not None and p99_err <= 0.15),
    }
    for k, v in results.items():
        print(f"{k}: {v}")
    write_results("cluster_calibration.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
