"""Calibrating the cluster simulation against a real local cluster, and the cluster-scale figure
(fmplex/cluster/simulate.py).

Calibration (``--part calibration``, about 3-4 min): a three-node local Ray
cluster (two tritonserver replicas of fm.minilm, 12 tasks) is measured, and
the simulation is fed those measurements and asked to predict one run of it.
On this machine every process of the run -- both replicas, Serve's proxy, the
ingress, Ray itself and the load generator -- shares the same few CPUs, so
the costs are measured as CPU seconds per process group (/proc), not as
wall time, and the simulation shares the machine's CPUs between them
(processor sharing, one CPU at most per single-threaded server):

1. idle: what Ray and the replicas burn with no requests;
2. a replica's cost per batch: one replica straight to its tritonserver with
   1, 2, 4, 8 and 16 requests in flight; its CPU seconds against the batches
   and rows its host reports (``fmplex_batch_*`` metrics), fitted as
   CPU per batch = fixed + per row x rows (least squares);
3. the path's cost per request: an open-loop run (the same client as step 5,
   another seed) through the endpoint; CPU seconds of the load generator
   (this process), the proxy and the ingress per request;
4. latency outside any CPU (network hops): one request in flight through the
   endpoint, minus its CPU work;
5. the run to predict: open-loop Poisson arrivals, a Zipf(1) mix over the 12
   tasks, at a share of the endpoint's capacity (32 in flight), through the
   one gRPC endpoint: each replica's served load (its own Triton statistics)
   and the client's p99. The CPUs that other work took during it (the
   machine's busy time minus this run's processes) are measured, not fitted.
   The same arrivals are played ``--plays`` times (one play's p99 moves
   from another's), and the p99 is of every play together;
6. the simulation of that run, replayed request by request: the same arrival
   times and tasks, with the tasks where the cluster put them; once with
   the costs of steps 1-4 (a prediction), and once with the CPU each group
   of processes took in the plays (the model apart from those measurements).

In steps 3 and 5 the ingress records when it received, forwarded and got the
answer of each call (``Ingress.timing``), joined with the client's own send
and receive times by request id: where a request's time went along the path
(:func:`path_stages`). Step 5 also reads the kernel's per-thread CPU and
run-queue times of each process group (:func:`cpu_waits`), and where a
request's time went inside each replica (:func:`inside_replica`: Triton's
queue for the host, the host's queue, its batch, the response's send).

Figure (``--part figure``, a few minutes): ``python -m fmplex.cluster.simulate``
for R = 4, 16, 64, 256 (see its --help), written to
``perf/results/cluster_simulation.json``.

Writes ``perf/results/cluster_calibration.json`` (the goal: both errors
within 15%). The machine is shared: the load average and the other work's
CPUs are recorded beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
IN_FLIGHT = (1, 2, 4, 8, 16)
SENTENCE = "The battery died within an hour and support never replied."
TICK = os.sysconf("SC_CLK_TCK")


def _input():  # noqa: ANN202 - tritonclient is imported late (the figure part needs no client)
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    inp = grpcclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.array([SENTENCE.encode()], dtype=object))
    return inp


# --- where the CPU goes ---------------------------------------------------------
def _proc(pid: int) -> tuple[str, int, float] | None:
    """(command line, parent pid, user + system CPU seconds) of a live process."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return cmd, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def process_groups(tag: str, replica_by_grpc_port: dict[int, str]) -> dict[str, list[int]]:
    """The run's processes by role: each replica (its tritonserver and the stubs under it), the proxy,
    the ingress, and the rest of Ray (raylets, GCS, controller, placer, reapers)."""
    from fmplex.cluster.testbed import tagged_processes  # noqa: PLC0415

    info = {pid: _proc(pid) for pid in tagged_processes(tag)}
    servers = {}
    for pid, got in info.items():
        if got and "tritonserver" in got[0].split(" ")[0]:
            m = re.search(r"--grpc-port[= ](\d+)", got[0])
            if m and int(m.group(1)) in replica_by_grpc_port:
                servers[pid] = replica_by_grpc_port[int(m.group(1))]
    groups: dict[str, list[int]] = {}
    for pid, got in info.items():
        if got is None:
            continue
        cmd, parent = got[0], got[1]
        if pid in servers:
            name = servers[pid]
        elif parent in servers:
            name = servers[parent] + "/stub"  # the host: its batches run here
        elif "ProxyActor" in cmd:
            name = "proxy"
        elif "Ingress" in cmd:
            name = "ingress"
        else:
            name = "ray"
        groups.setdefault(name, []).append(pid)
    return groups


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, everyone's)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK


def snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group, of this process (the load generator), of the machine; and the clock."""
    out = {name: sum((_proc(p) or ("", 0, 0.0))[2] for p in pids) for name, pids in groups.items()}
    me = resource.getrusage(resource.RUSAGE_SELF)
    out["client"] = me.ru_utime + me.ru_stime
    out["machine"] = _busy_cpu_seconds()
    out["wall"] = time.monotonic()
    return out


def cpu_waits(groups: dict[str, list[int]]) -> dict[str, tuple[float, float, int]]:
    """(seconds on a CPU, seconds runnable but waiting for one, timeslices run) so far of each group, summed
    over every thread of its processes (the kernel's /proc/PID/task/TID/schedstat); and of this process ("client")."""
    out = {}
    for name, pids in {**groups, "client": [os.getpid()]}.items():
        ran = waited = 0.0
        slices = 0
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                except OSError:
                    continue
                ran, waited, slices = ran + int(fields[0]) / 1e9, waited + int(fields[1]) / 1e9, slices + int(fields[2])
        out[name] = (ran, waited, slices)
    return out


def wait_per_slice(a: dict[str, tuple[float, float, int]], b: dict[str, tuple[float, float, int]]) -> float:
    """Seconds a timeslice of this run's threads waited, on average, runnable but without a CPU, from ``a`` to ``b``
    (:func:`cpu_waits`): with the CPUs nearly idle, the time a thread takes to get one once woken."""
    waited = sum(b[g][1] - a[g][1] for g in a)
    slices = sum(b[g][2] - a[g][2] for g in a)
    return waited / max(1, slices)


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


def runnable_threads(exclude: set[int]) -> int:
    """Threads of the machine that are running or want a CPU now (state R), outside the processes ``exclude``."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            for tid in os.listdir(f"/proc/{entry}/task"):
                with open(f"/proc/{entry}/task/{tid}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "R":
                        n += 1
        except (OSError, IndexError):
            continue
    return n


class OtherWork:
    """Samples, every ``step`` seconds, what other work on the machine does: the CPUs it took (the
    machine's busy time minus this run's processes) and its threads that want a CPU at that instant.
    A shared machine's load comes and goes within a run."""

    def __init__(self, groups: dict[str, list[int]], step: float = 0.5) -> None:
        self.groups, self.step = groups, step
        self.steps: list[tuple[float, float]] = []  # (from second, CPUs taken)
        self.runnable: list[tuple[float, float]] = []  # (from second, threads wanting a CPU)
        self.ours: list[dict[str, float]] = []  # CPUs each of this run's process groups took, step by step
        self._ours = {p for pids in groups.values() for p in pids} | {os.getpid()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        last = snapshot(self.groups)
        self.runnable.append((0.0, float(runnable_threads(self._ours))))
        while not self._stop.wait(self.step):
            self.runnable.append((round(time.monotonic() - t0, 3), float(runnable_threads(self._ours))))
            now = snapshot(self.groups)
            d = delta(last, now)
            ours = sum(d[g] for g in self.groups) + d["client"]
            self.ours.append({g: round(d[g] / d["wall"], 3) for g in (*self.groups, "client")})
            self.steps.append((round(last["wall"] - t0, 3), round(max(0.0, (d["machine"] - ours) / d["wall"]), 3)))
            last = now

    def __enter__(self) -> OtherWork:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def host_totals(metrics_port: int) -> dict[str, float]:
    """Every ``fmplex_host_*`` and ``fmplex_batch_*`` counter of a replica's host so far, summed over its labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith(("fmplex_host_", "fmplex_batch_")) and name.endswith("_total"):
            total[name] = total.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def host_batches(t: dict[str, float]) -> tuple[float, float, float]:
    """(batches, rows, wall seconds in batches) a replica's host has run so far, of its :func:`host_totals`."""
    return t.get("fmplex_batch_batches_total", 0.0), t.get("fmplex_batch_rows_total", 0.0), t.get("fmplex_batch_seconds_total", 0.0)


def host_model_stats(status: dict, tasks: list[str]) -> dict[str, dict[str, tuple[int, float]]]:
    """Per replica, Triton's own statistics of its host model (every model there but the vFMs): for
    ``queue`` (waiting for ``execute``), ``compute_infer`` (the ``execute`` call) and ``success`` (the
    request's whole stay), (count, seconds) so far."""
    import tritonclient.http as httpclient  # noqa: PLC0415

    out = {}
    for r in status["replicas"]:
        c = httpclient.InferenceServerClient(f"{r['address']}:{r['http_port']}")
        got = {k: [0, 0.0] for k in ("queue", "compute_infer", "success")}
        for m in c.get_inference_statistics("")["model_stats"]:
            if m["name"] not in tasks and m["name"] not in r["tasks"]:
                for k in got:
                    got[k][0] += int(m["inference_stats"][k]["count"])
                    got[k][1] += int(m["inference_stats"][k]["ns"]) / 1e9
        out[r["replica"]] = {k: (n, sec) for k, (n, sec) in got.items()}
        c.close()
    return out


def inside_replica(before: dict, after: dict, t0: dict, t1: dict) -> dict[str, float]:
    """Where a replica's requests spent their time, mean ms per request over a stretch, from Triton's
    statistics of the host model (``before``/``after``: :func:`host_model_stats` of it) and the host's
    own counters (``t0``/``t1``: :func:`host_totals`)."""
    def per(k: str) -> float:
        n = after[k][0] - before[k][0]
        return round(1000 * (after[k][1] - before[k][1]) / n, 2) if n else 0.0

    def mean(seconds: str, count: str) -> float:
        n = t1.get(count, 0.0) - t0.get(count, 0.0)
        return round(1000 * (t1.get(seconds, 0.0) - t0.get(seconds, 0.0)) / n, 2) if n else 0.0

    return {"triton_queue_for_execute": per("queue"), "execute_call": per("compute_infer"),
            "host_queue": mean("fmplex_host_queue_seconds_total", "fmplex_host_queued_requests_total"),
            "batch": mean("fmplex_batch_seconds_total", "fmplex_batch_batches_total"),
            "send": mean("fmplex_host_response_send_seconds_total", "fmplex_host_response_sends_total"),
            "host_model_success": per("success"),
            # the host process's garbage collections over the stretch (each holds its interpreter lock): how many, total ms
            "gc_collections": round(t1.get("fmplex_host_gc_collections_total", 0.0) - t0.get("fmplex_host_gc_collections_total", 0.0)),
            "gc_ms": round(1000 * (t1.get("fmplex_host_gc_seconds_total", 0.0) - t0.get("fmplex_host_gc_seconds_total", 0.0)), 2)}


# --- load -------------------------------------------------------------------------
def closed_loop(port: int, tasks: list[str], clients: int, seconds: float, each: list[float] | None = None) -> tuple[float, float]:
    """(requests/s, mean latency s) with ``clients`` in flight, round-robin over ``tasks``; ``each``, if
    given, gets every request's latency (s)."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    done = [0] * clients
    spent = [0.0] * clients
    stop = time.monotonic() + seconds

    def run(k: int) -> None:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        i = k
        while time.monotonic() < stop:
            t0 = time.monotonic()
            c.infer(tasks[i % len(tasks)], [_input()])
            spent[k] += time.monotonic() - t0
            if each is not None:
                each.append(time.monotonic() - t0)
            done[k] += 1
            i += 1
        c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds, sum(spent) / max(1, sum(done))


def open_loop(port: int, tasks: list[str], rates: list[float], seconds: float, seed: int = 0,
              times: dict[str, tuple[float, float]] | None = None) -> tuple[list[float], int, list[tuple[float, int]]]:
    """Poisson arrivals per task (async gRPC); latencies of the answered ones (s), failures, and the
    arrivals as sent ((seconds since the start, task index), for the simulation to replay).
    ``times``, if given, gets each answered request's (sent, answered) on ``time.monotonic``, by the
    request id it was sent with (the ingress records its own timestamps under the same id)."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

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
    for n, (at, task) in enumerate(arrivals):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.monotonic()
        sent_at.append((sent - t0, index[task]))
        rid = f"{seed}-{n}"

        def done(result: object, error: object, sent: float = sent, rid: str = rid) -> None:
            now = time.monotonic()
            with lock:
                if error is None:
                    latencies.append(now - sent)
                    if times is not None:
                        times[rid] = (sent, now)
                else:
                    failures[0] += 1
            pending.release()

        client.async_infer(task, [_input()], callback=done, request_id=rid)
    for _ in arrivals:
        pending.acquire(timeout=120)
    client.close()
    return latencies, failures[0], sent_at


def _pcts(xs: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max / mean of seconds, in ms."""
    if not xs:
        return {}
    a = np.asarray(xs) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 2), "p90": round(float(np.percentile(a, 90)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2), "mean": round(float(a.mean()), 2)}


def path_stages(client: dict[str, tuple[float, float]], ingress: dict) -> dict:
    """Where each request's time went along the path, joined by request id (every time on one clock):

    - ``to_ingress``: client sent -> the ingress has the call (the client's send, the gRPC proxy, Ray's
      call from the proxy to the ingress replica, and that replica's queue until the handler runs);
    - ``ingress_in``: the ingress's own routing, until the call to the replica is made;
    - ``replica``: the call to the replica's tritonserver until its answer (the gRPC hop, Triton's
      queue, the host's batch, the ensemble);
    - ``from_ingress``: the ingress has the answer -> the client has it (Ray's return to the proxy, the
      proxy, the client's gRPC callback).

    Each as percentiles, and the tail: the mean of each stage over the slowest 1% (and 10%) of requests.
    The ingress's event-loop lateness and GC pauses are summarised beside them."""
    rows, each = [], []
    for rid, received, forwarded, answered, rep in ingress["requests"]:
        if rid in client:
            sent, got = client[rid]
            rows.append((got - sent, received - sent, forwarded - received, answered - forwarded, got - answered))
            each.append((sent, got - sent, answered - forwarded, rep))
    names = ("total", "to_ingress", "ingress_in", "replica", "from_ingress")
    out: dict = {"joined": len(rows), "of_client": len(client)}
    if not rows:
        return out
    arr = np.asarray(rows)
    out["stages_ms"] = {n: _pcts(list(arr[:, i])) for i, n in enumerate(names)}
    order = np.argsort(arr[:, 0])
    for share, key in ((0.01, "slowest_1pct_mean_ms"), (0.10, "slowest_10pct_mean_ms")):
        tail = arr[order[-max(1, int(len(arr) * share)):]]
        out[key] = {n: round(float(tail[:, i].mean() * 1000), 2) for i, n in enumerate(names)}
    lag = [x for _, x in ingress["loop_lag_s"]]
    out["ingress_loop_lag_ms"] = _pcts(lag)
    gcs = [x for _, x in ingress["gc_pauses_s"]]
    out["ingress_gc"] = {"pauses": len(gcs), **({"max_ms": round(max(gcs) * 1000, 2), "total_ms": round(sum(gcs) * 1000, 1)} if gcs else {})}
    # when the slowest 1% were sent (s since the first request): one stall, or spread over the run
    t0 = min(e[0] for e in each)
    slow = sorted(each, key=lambda e: e[1])[-max(1, len(each) // 100):]
    out["slowest_1pct_sent_at_s"] = sorted(round(t - t0, 2) for t, *_ in slow)
    by_rep: dict[str, list[float]] = {}
    for _t, _total, at, rep in each:
        by_rep.setdefault(str(rep), []).append(at)
    out["replica_stage_mean_ms_by_replica"] = {r: round(1000 * float(np.mean(v)), 2) for r, v in by_rep.items()}
    return out


def ingress_timing(on: bool) -> dict:
    """Start / stop the ingress's per-stage timestamps (:meth:`fmplex.cluster.ingress.Ingress.timing`)."""
    from ray import serve  # noqa: PLC0415

    from fmplex.cluster.config import APP_NAME, INGRESS  # noqa: PLC0415

    return serve.get_deployment_handle(INGRESS, APP_NAME).timing.remote(on).result(timeout_s=60)


def replica_counts(status: dict, tasks: list[str]) -> dict[str, tuple[int, float]]:
    """(successful inferences, seconds) each replica's own tritonserver has counted for these tasks' vFMs
    so far: Triton's ``success`` statistics, whose duration runs from receiving a request to its answer."""
    import tritonclient.http as httpclient  # noqa: PLC0415

    out = {}
    for r in status["replicas"]:
        c = httpclient.InferenceServerClient(f"{r['address']}:{r['http_port']}")
        n, ns = 0, 0
        for t in r["tasks"]:
            if t in tasks:
                for m in c.get_inference_statistics(t)["model_stats"]:
                    n += int(m["inference_stats"]["success"]["count"])
                    ns += int(m["inference_stats"]["success"]["ns"])
        out[r["replica"]] = (n, ns / 1e9)
        c.close()
    return out


def real_p99_of(latencies: list[float]) -> float:
    """The p99 of latencies in seconds, in ms (infinite for none)."""
    return float(np.percentile(latencies, 99) * 1000) if latencies else float("inf")


def _metrics_port(groups: dict[str, list[int]], replica: str) -> int:
    for pid in groups[replica]:
        got = _proc(pid)
        m = re.search(r"--metrics-port[= ](\d+)", got[0]) if got else None
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no tritonserver process found for replica {replica}")


# --- the two parts ------------------------------------------------------------------
def calibrate(args: argparse.Namespace) -> dict:
    from fmplex.cluster import local  # noqa: PLC0415
    from fmplex.cluster.config import ClusterSpec  # noqa: PLC0415
    from fmplex.cluster.simulate import Costs, Workload, simulate  # noqa: PLC0415
    from fmplex.cluster.testbed import TAG_VAR, add_tasks, local_cluster  # noqa: PLC0415
    from fmplex.runtime.settings import worker_count  # noqa: PLC0415

    tag = f"bench-cluster-{uuid.uuid4().hex[:8]}"
    os.environ[TAG_VAR] = tag  # every process the run starts carries it: that is how its CPU is found
    load_before = os.getloadavg()[0]  # other work on the machine, before this run adds its own
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fmplex-cluster-bench-"))
    repo = work / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    tasks = sorted(add_tasks(repo, 8))
    spec = ClusterSpec(replicas={"minilm": 2}, hot_load=1e6, cool_load=1.0)  # no hot copies: a fixed placement to replay
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        with local_cluster(repo, spec) as lc:
            port = lc.grpc_port
            closed_loop(port, tasks, 12, 3)  # first requests place every task; warm up
            status = local.placer_status()
            replicas = [r["replica"] for r in status["replicas"]]
            groups = process_groups(tag, {r["grpc_port"]: r["replica"] for r in status["replicas"]})
            holder = next(r for r in status["replicas"] if tasks[0] in r["tasks"])
            hname = holder["replica"]
            mport = _metrics_port(groups, hname)
            # 1. idle
            time.sleep(1.0)
            a, wi = snapshot(groups), cpu_waits(groups)
            time.sleep(args.idle_seconds)
            idle = {k: v / args.idle_seconds for k, v in delta(a, snapshot(groups)).items() if k != "wall"}
            wake_idle = wait_per_slice(wi, cpu_waits(groups))
            # 2. one replica, k in flight: CPU per batch against rows per batch
            fit_x, fit_y, curve = [], [], {}
            alone: list[float] = []  # each request's latency with one in flight: how a replica's service time varies
            for k in IN_FLIGHT:
                b0, a = host_batches(host_totals(mport)), snapshot(groups)
                rps, _ = closed_loop(holder["grpc_port"], tasks[:1], k, args.cost_seconds, each=alone if k == 1 else None)
                time.sleep(1.0)  # the host publishes its batch counts every 0.25 s
                d, b1 = delta(a, snapshot(groups)), host_batches(host_totals(mport))
                batches, rows = b1[0] - b0[0], b1[1] - b0[1]
                server = d[hname] - idle.get(hname, 0.0) * d["wall"]
                stub = d[hname + "/stub"] - idle.get(hname + "/stub", 0.0) * d["wall"]
                cpu = server + stub
                curve[k] = {"rps": round(rps, 1), "rows_per_batch": round(rows / batches, 2), "cpu_ms_per_batch": round(1000 * cpu / batches, 2),
                            "wall_ms_per_batch": round(1000 * (b1[2] - b0[2]) / batches, 2),
                            "of_which_host_stub": round(1000 * stub / batches, 2)}
                fit_x.append(rows / batches)
                fit_y.append(cpu / batches)
            per_row, per_batch = np.polyfit(fit_x, fit_y, 1)
            per_batch, per_row = max(0.0, float(per_batch)), max(1e-6, float(per_row))
            # the host runs ``workers`` batches at once; with all of them busy (4 or more in flight), the CPUs
            # its batches take together: one process's batches share its interpreter lock
            workers = worker_count("auto", "cpu")
            replica_cpus = float(np.median([workers * curve[k]["cpu_ms_per_batch"] / curve[k]["wall_ms_per_batch"] for k in IN_FLIGHT if k >= 2 * workers]))
            mean_alone = float(np.mean(alone))
            spread = tuple(round(float(q) / mean_alone, 4) for q in np.quantile(alone, np.linspace(0.005, 0.995, 100)))
            # the endpoint's capacity sets the offered rate
            capacity, _ = closed_loop(port, tasks, 32, args.cost_seconds)
            rate = args.utilisation * capacity
            base = Workload(tasks=len(tasks), rate_per_task=rate / len(tasks), duration_s=args.seconds, warmup_s=0)
            # 3. the path's CPU per request: the same open-loop client, another seed
            # (with the ingress's stage timestamps on, as in the run to predict, so both pay their small cost)
            pre_times: dict[str, tuple[float, float]] = {}
            ingress_timing(True)
            a, w_pre = snapshot(groups), cpu_waits(groups)
            lat_pre, _, sent_pre = open_loop(port, tasks, base.rates(), args.cost_seconds * 2, seed=1, times=pre_times)
            d, w_pre = delta(a, snapshot(groups)), {g: tuple(y - x for x, y in zip(w_pre[g], w)) for g, w in cpu_waits(groups).items()}
            stages_pre = path_stages(pre_times, ingress_timing(False))
            n = max(1, len(sent_pre))
            path_cpu = {g: max(0.0, (d[g] - idle.get(g, 0.0) * d["wall"]) / n) for g in ("client", "proxy", "ingress", "ray")}
            # 4. one request in flight through the endpoint: what is not CPU work is network latency
            a, w4 = snapshot(groups), cpu_waits(groups)
            _, lat1 = closed_loop(port, tasks[:1], 1, args.cost_seconds)
            d, wake_one = delta(a, snapshot(groups)), wait_per_slice(w4, cpu_waits(groups))
            others1 = max(0.0, (d["machine"] - sum(d[g] for g in groups) - d["client"]) / d["wall"])
            idle_cpus = sum(idle.get(g, 0.0) for g in groups)
            cpu1 = path_cpu["client"] + path_cpu["proxy"] + path_cpu["ingress"] + per_batch + per_row
            overhead = max(0.0, lat1 - cpu1 / min(1.0, cpus - idle_cpus - others1))
            # 5. the run to predict
            before = replica_counts(local.placer_status(), tasks)
            hosts0 = host_model_stats(local.placer_status(), tasks)
            mports = {r: _metrics_port(groups, r) for r in replicas}
            totals0 = {r: host_totals(m) for r, m in mports.items()}
            batches0 = {r: host_batches(t) for r, t in totals0.items()}
            load_at_run = os.getloadavg()[0]
            a = snapshot(groups)
            run_times: dict[str, tuple[float, float]] = {}
            ingress_timing(True)
            w0 = cpu_waits(groups)
            with OtherWork(groups) as other:
                latencies, failures, trace = open_loop(port, tasks, base.rates(), args.seconds, times=run_times)
            d = delta(a, snapshot(groups))
            w1 = cpu_waits(groups)
            stages_run = path_stages(run_times, ingress_timing(False))
            after = replica_counts(local.placer_status(), tasks)
            time.sleep(1.0)  # the host publishes its batch counts every 0.25 s
            totals1 = {r: host_totals(m) for r, m in mports.items()}
            batches1 = {r: host_batches(t) for r, t in totals1.items()}
            hosts1 = host_model_stats(local.placer_status(), tasks)
            status = local.placer_status()
            # the same arrivals again, --plays times in all: how far one play's p99 moves from another's, and
            # what CPU each group took in every play (the replay with the run's own costs uses their mean)
            again, failures_again, plays_p99 = [], 0, [real_p99_of(latencies)]
            plays_on_cpu = [{g: w1[g][0] - w0[g][0] for g in w0}]
            for _ in range(args.plays - 1):
                wa = cpu_waits(groups)
                lat_k, failed, _ = open_loop(port, tasks, base.rates(), args.seconds)
                wb = cpu_waits(groups)
                again, failures_again = again + lat_k, failures_again + failed
                plays_p99.append(real_p99_of(lat_k))
                plays_on_cpu.append({g: wb[g][0] - wa[g][0] for g in wa})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = sum(d[g] for g in groups) + d["client"]
    others = max(0.0, (d["machine"] - ours) / d["wall"])  # CPUs other work on the machine took during the run
    # CPUs this run's processes take off any request's path: their idle work, and Ray's own per-request bookkeeping
    side = sum(idle.get(g, 0.0) for g in groups) + path_cpu["ray"] * rate
    background = others + side
    real_load = [(after[r][0] - before[r][0]) / args.seconds for r in replicas]
    real_p99 = real_p99_of(latencies)
    # the p99 the simulation is held to: of every play of the same arrivals together, as one play's moves
    # from another's by 4% to 3x
    real_p99_both = real_p99_of(latencies + again)
    placement = [replicas.index(next(r["replica"] for r in status["replicas"] if t in r["tasks"])) for t in tasks]
    half = {g: v / 2 for g, v in path_cpu.items()}
    path_in = (("client", half["client"]), ("proxy", half["proxy"]), ("ingress", half["ingress"]))
    path_out = (("ingress", half["ingress"]), ("proxy", half["proxy"]), ("client", half["client"]))
    # this run's own side work takes its CPUs, and other work what it took, half second by half second
    costs = Costs(
        throughput=tuple((b, b / (per_batch + per_row * b)) for b in range(1, 17)),
        overhead_s=overhead, path_in=path_in, path_out=path_out, cpus=cpus, background_cpus=side, background_trace=tuple(other.steps),
        workers=workers, replica_cpus=replica_cpus, service_spread=spread,
    )
    # the same requests at the same times, plus the time the client needs after the last one to collect the answers
    replay = dataclasses.replace(base, duration_s=args.seconds + 30)
    models = cpu_models(costs, bursts_of(w_pre, replicas), wake_one, handoff_seconds(curve))
    by_model = {name: simulate("shared", len(replicas), replay, c, placement=placement, trace=trace) for name, c in models.items()}
    costs = models[CPU_MODEL]
    sim = by_model[CPU_MODEL]
    sim_load = [x * replay.duration_s / args.seconds for x in sim.replica_load]
    # what the old model (each server its own processor; no client, no sharing) would say of the same run
    # other work as its mean over the run: what its coming and going adds
    steady = simulate("shared", len(replicas), replay, dataclasses.replace(costs, background_cpus=background, background_trace=()), placement=placement, trace=trace)
    dedicated = simulate("shared", len(replicas), replay, dataclasses.replace(costs, cpus=None), placement=placement, trace=trace)
    finite = lambda x: round(x, 3) if np.isfinite(x) else None  # noqa: E731 - JSON has no infinity
    # how much the p99 moves if every measured CPU cost were 5% lower or higher
    sensitivity = {f"x{f}": finite(simulate("shared", len(replicas), replay, scaled(costs, f), placement=placement, trace=trace).p99_ms)
                   for f in (0.95, 1.05)}
    real_rows = [round((batches1[r][1] - batches0[r][1]) / max(1.0, batches1[r][0] - batches0[r][0]), 2) for r in replicas]
    # how long the hosts' batches took on the wall clock, and the share of the run each replica spent in them
    real_batch_ms = [round(1000 * (batches1[r][2] - batches0[r][2]) / max(1.0, batches1[r][0] - batches0[r][0]), 2) for r in replicas]
    real_busy = [round((batches1[r][2] - batches0[r][2]) / args.seconds, 3) for r in replicas]
    load_err = [abs(s - r) / r if r else float("inf") for s, r in zip(sim_load, real_load)]
    p99_err = abs(sim.p99_ms - real_p99_both) / real_p99_both
    results = {
        "how": "python perf/bench_cluster.py --part calibration",
        "minutes": round((time.monotonic() - started) / 60, 1),
        "cpus": cpus,
        "machine_load_average_1min": {"before": round(load_before, 1), "at_run": round(load_at_run, 1), "after": round(os.getloadavg()[0], 1)},
        "other_work_cpus_during_run": round(others, 2),
        "idle_cpus_by_group": {g: round(v, 3) for g, v in idle.items() if g not in ("client", "machine")},
        "side_work_cpus": round(side, 3),
        "measured_costs": {
            "replica_by_in_flight": curve,
            "replica_cpu_ms_per_batch_fixed": round(per_batch * 1000, 2),
            "replica_cpu_ms_per_row": round(per_row * 1000, 2),
            "replica_workers": workers,
            "replica_cpus_of_its_batches_together": round(replica_cpus, 3),
            "replica_latency_alone_ms": {"mean": round(1000 * mean_alone, 2), "p50": round(1000 * float(np.median(alone)), 2),
                                         "p99": round(1000 * float(np.percentile(alone, 99)), 2), "max": round(1000 * max(alone), 2)},
            "path_cpu_ms_per_request": {g: round(v * 1000, 2) for g, v in path_cpu.items()},
            "latency_1_in_flight_ms": round(lat1 * 1000, 1),
            "wait_per_timeslice_ms_idle": round(wake_idle * 1000, 4),
            "wait_per_timeslice_ms_1_in_flight": round(wake_one * 1000, 4),
            "network_latency_ms": round(overhead * 1000, 1),
            "rps_endpoint_32_in_flight": round(capacity, 1),
            "path_run_p99_ms": round(float(np.percentile(lat_pre, 99) * 1000), 1) if lat_pre else None,
        },
        "path_stages": {"path_run": stages_pre, "run": stages_run},
        "offered_rps": round(rate, 1),
        "utilisation": args.utilisation,
        "seconds": args.seconds,
        "real": {"replica_load_rps": [round(x, 1) for x in real_load], "p99_ms": round(real_p99, 1), "p50_ms": round(float(np.percentile(latencies, 50) * 1000), 1),
                 "answered": len(latencies), "failures": failures},
        "real_p99_ms_of_every_play": round(real_p99_both, 1),
        "real_p99_ms_by_play": [round(x, 1) for x in plays_p99],
        # per request of a play, each group's ms on a CPU: the mean over the plays
        "plays_ms_per_request_on_cpu": {g: round(1000 * float(np.mean([p[g] for p in plays_on_cpu])) / max(1, len(trace)), 3) for g in plays_on_cpu[0]},
        "real_same_arrivals_again": {"p99_ms": round(float(np.percentile(again, 99) * 1000), 1) if again else None,
                                     "p50_ms": round(float(np.percentile(again, 50) * 1000), 1) if again else None,
                                     "answered": len(again), "failures": failures_again},
        "simulated": {"replica_load_rps": [round(x, 1) for x in sim_load], "p99_ms": finite(sim.p99_ms), "p50_ms": finite(sim.p50_ms),
                      "stages_ms": sim.stages, "rows_per_batch": sim.rows_per_batch,
                      "ms_per_request_waiting_for_cpu": {({str(i): r for i, r in enumerate(replicas)}).get(k, k): round(1000 * v / max(1, len(trace)), 2)
                                                         for k, v in sim.cpu_wait_s.items()}},
        "real_rows_per_batch": real_rows,
        "real_wall_ms_per_batch": real_batch_ms,
        # per replica: the mean time a request spent inside its tritonserver (Triton's own statistics), against
        # the mean of the replica stage the ingress saw (its call to the answer): what the gRPC hop adds
        "real_ms_per_request_inside_triton": [round(1000 * (after[r][1] - before[r][1]) / max(1, after[r][0] - before[r][0]), 2) for r in replicas],
        "real_replica_stage_mean_ms": [stages_run.get("replica_stage_mean_ms_by_replica", {}).get(r) for r in replicas],
        "real_share_of_run_in_batches": real_busy,
        # per replica, where a request's time inside it went (mean ms): Triton's queue for the host's execute(),
        # that call, the host's own queue, a batch (per batch), the response's decision to its send's return,
        # and the host model's whole stay as Triton counts it
        "real_inside_replica_ms": {r: inside_replica(hosts0[r], hosts1[r], totals0[r], totals1[r]) for r in replicas},
        # per request of the run, each group's threads: ms on a CPU, and ms runnable but waiting for one
        "run_ms_per_request_on_cpu_and_waiting_for_cpu": {g: [round(1000 * (w1[g][0] - w0[g][0]) / max(1, len(trace)), 2),
                                                            round(1000 * (w1[g][1] - w0[g][1]) / max(1, len(trace)), 2)] for g in w0},
        "run_timeslices_per_request": {g: round((w1[g][2] - w0[g][2]) / max(1, len(trace)), 1) for g in w0},
        # the same of the path run (step 3), measured before the run to predict: (ms on a CPU, ms waiting, timeslices) per request
        "path_run_per_request_on_cpu_waiting_slices": {g: [round(1000 * w[0] / n, 2), round(1000 * w[1] / n, 2), round(w[2] / n, 1)] for g, w in w_pre.items()},
        "cpus_busy_during_run": round(d["machine"] / d["wall"], 2),
        "cpu_model": CPU_MODEL,
        "simulated_by_cpu_model": {name: {"p50_ms": finite(r.p50_ms), "p99_ms": finite(r.p99_ms), "p99_error": finite(abs(r.p99_ms - real_p99_both) / real_p99_both),
                                          "stages_ms": r.stages, "rows_per_batch": r.rows_per_batch, "batch_ms": r.batch_ms}
                                   for name, r in by_model.items()},
        "simulated_p99_with_every_cpu_cost_scaled": sensitivity,
        "simulated_with_other_work_at_its_mean": {"p99_ms": finite(steady.p99_ms), "p50_ms": finite(steady.p50_ms)},
        "simulated_without_cpu_sharing": {"p99_ms": finite(dedicated.p99_ms), "p50_ms": finite(dedicated.p50_ms)},
        "other_work_cpus_every_half_second": [c for _, c in other.steps],
        "run_cpus_by_group_every_half_second": other.ours,
        # context only: threads of other work wanting a CPU at each sample. As a model (each thread an equal
        # claimant) it overshot the p99: servers that sleep between requests get more than an equal share.
        "other_work_runnable_threads_every_half_second": [c for _, c in other.runnable],
        "relative_error": {"replica_load": [round(e, 3) for e in load_err], "p99": finite(p99_err)},
        "within_15_percent": bool(max(load_err) <= 0.15 and np.isfinite(p99_err) and p99_err <= 0.15),
        # what the replay was given, to try another model offline (--part replay) without a new run
        "replay_input": {"workload": dataclasses.asdict(replay), "placement": placement, "measured_seconds": args.seconds,
                         "trace": [[round(t, 5), i] for t, i in trace], "costs": dataclasses.asdict(costs),
                         "costs_by_model": {name: dataclasses.asdict(c) for name, c in models.items()}},
    }
    # the same replay with the run's own CPU costs: the model apart from how well steps 1-4 measured them
    results["simulated_with_the_runs_own_cpu_costs"] = {
        name: {"p99_ms": finite(r.p99_ms), "p50_ms": finite(r.p50_ms), "p99_error": finite(r.p99_ms / real_p99_both - 1),
               "replica_cpu_ms_per_batch_1": round(1000 / c.seqs_per_s(1), 2), "path_in_ms": {n: round(x * 1000, 2) for n, x in c.path_in},
               "background_cpus": round(c.background_cpus, 3)}
        for name, (c, r) in run_cost_replays(results).items()}
    for k, v in results.items():
        if k != "replay_input":
            print(f"{k}: {v}", flush=True)
    return results


# the model the results' ``simulated`` is of; every one is reported beside it. Over 21 runs ``bursts`` had the
# lowest error but for ``bursts, hand-offs``, whose medians are lower but which is within 15% in fewer runs from
# the costs measured beforehand (docs/scaling-out.md)
CPU_MODEL = "bursts"


GIL_SWITCH_S = 0.005  # CPython's default sys.getswitchinterval(); the hosts leave it alone


def handoff_seconds(curve: dict) -> float:
    """A replica's tritonserver's CPU per request, halved: the work of each hand-off, in and out (the
    host's own part of a request is in its batches), from step 2's measurements at each load."""
    per = [(v["cpu_ms_per_batch"] - v["of_which_host_stub"]) / v["rows_per_batch"] for v in curve.values() if v.get("rows_per_batch")]
    return max(0.0, float(np.median(per))) / 2 / 1000 if per else 0.0


def cpu_models(costs, bursts: tuple[tuple[str, float], ...], wake_s: float, handoff_s: float = 0.0) -> dict:  # noqa: ANN001 - Costs is imported late
    """The CPU models the calibration compares, each as the run's costs (see fmplex.cluster.cpus):

    - ``sharing``: processor sharing of the CPUs; a replica runs one batch at a time, of its mean cost;
      the proxy and the ingress serve one request at a time;
    - ``sharing, workers``: the host's workers run batches side by side, within the CPUs they took
      together when all were busy (one process's interpreter lock); each batch's cost varies as one
      request's latency alone did; the proxy and the ingress interleave requests, as event loops do;
    - ``bursts``: as ``sharing, workers``, but every server's work as the kernel runs it: short bursts
      of its measured mean length, each woken after the measured wait for a CPU and then queued for one;
    - ``bursts, hand-offs`` (with ``handoff_s``): as ``bursts``, and each request passes its replica's
      hand-offs in and out (the host's execute() and response-sender threads), each ``handoff_s`` of the
      replica's work (taken from its batches) and, while a worker runs a batch, a wait for the
      interpreter lock of CPython's switch interval.
    """
    one = dataclasses.replace(costs, workers=1, replica_cpus=1.0, service_spread=(), interleave_stages=False)
    loops = dataclasses.replace(costs, interleave_stages=True)
    models = {
        "sharing": one,
        "sharing, workers": loops,
        "bursts": dataclasses.replace(loops, bursts=bursts, wake_s=wake_s),
    }
    if handoff_s > 0:  # the batches keep the rest of the replica's work
        batches = tuple((b, b / max(1e-9, b / t - 2 * handoff_s * b)) for b, t in costs.throughput)
        models["bursts, hand-offs"] = dataclasses.replace(models["bursts"], throughput=batches, handoff_s=handoff_s, gil_wait_s=GIL_SWITCH_S)
    return models


def with_run_costs(costs, replay, on_cpu_s: dict[str, float], replicas: list[str], background_cpus: float, rounds: int = 3):  # noqa: ANN001, ANN201 - Costs is imported late
    """``costs`` with the run's own CPU costs: each stage (client, proxy, ingress) and the replicas
    together scaled so that the simulation gives them the CPU seconds their processes took in the run
    (``on_cpu_s``, the kernel's count less their idle work), and Ray's own work what it took then.

    That is a replay of the run's service demands, as a trace-driven validation uses them: it tests
    the model of queueing, batching and CPU sharing apart from how well steps 2-3 measured the costs
    beforehand. In the runs those moved: the run took up to ~16% more CPU per request than they said.
    ``replay(costs)`` simulates the run; the rows per batch move with the costs, hence a few rounds."""
    groups = [g for r in replicas for g in (r, r + "/stub")]
    costs = dataclasses.replace(costs, background_cpus=background_cpus)
    for _ in range(rounds):
        work = replay(costs).work_s
        sim_replicas = sum(work.get(k, 0.0) for i in range(len(replicas)) for k in (str(i), f"{i}/in", f"{i}/out"))
        f_rep = sum(on_cpu_s.get(g, 0.0) for g in groups) / sim_replicas if sim_replicas else 1.0
        f_stage = {n: on_cpu_s[n] / work[n] if work.get(n) and n in on_cpu_s else 1.0 for n, _ in costs.path_in + costs.path_out}
        costs = dataclasses.replace(
            costs, throughput=tuple((b, t / f_rep) for b, t in costs.throughput), handoff_s=costs.handoff_s * f_rep,
            path_in=tuple((n, x * f_stage[n]) for n, x in costs.path_in), path_out=tuple((n, x * f_stage[n]) for n, x in costs.path_out))
    return costs


def bursts_of(waits: dict[str, tuple[float, float, int]], replicas: list[str]) -> tuple[tuple[str, float], ...]:
    """Each server's mean burst (seconds on a CPU per timeslice) over a stretch of :func:`cpu_waits`:
    a replica is its tritonserver and its host's stub together; other work, Ray's own processes."""
    def mean(groups: list[str]) -> float:
        return sum(waits[g][0] for g in groups) / max(1, sum(waits[g][2] for g in groups))
    stubs = [g for r in replicas for g in (r, r + "/stub") if g in waits]
    return (("replica", mean(stubs)), *((g, mean([g])) for g in ("proxy", "ingress", "client")), ("background", mean(["ray"])))


def models_of(got: dict) -> dict:
    """Every CPU model's costs for a calibration results file, rebuilt from what the run measured (files
    written before a model existed get it from their measurements too: the workers' CPUs from the batch
    curve, bursts from the path run's timeslices)."""
    from fmplex.cluster.simulate import Costs  # noqa: PLC0415

    tuples = lambda x: tuple(tuple(e) for e in x)  # noqa: E731 - JSON gives lists
    c = got["replay_input"]["costs"]
    costs = Costs(**{**c, **{k: tuples(c[k]) for k in ("throughput", "path_in", "path_out", "background_trace", "bursts") if k in c},
                     "service_spread": tuple(c.get("service_spread", ()))})
    # back to the base costs: the file holds the chosen model's (a hand-offs model took their work from the batches)
    h = costs.handoff_s
    costs = dataclasses.replace(costs, bursts=(), wake_s=0.0, interleave_stages=False, handoff_s=0.0, gil_wait_s=0.0,
                                throughput=tuple((b, b / (b / t + 2 * h * b)) for b, t in costs.throughput))
    measured = got["measured_costs"]
    if "replica_cpus_of_its_batches_together" not in measured:
        workers = 2  # what the hosts ran on this 2-core machine before the runs recorded it
        curve = [v for k, v in measured["replica_by_in_flight"].items() if int(k) >= 2 * workers]
        costs = dataclasses.replace(costs, workers=workers, replica_cpus=float(np.median([workers * v["cpu_ms_per_batch"] / v["wall_ms_per_batch"] for v in curve])))
    per = got["path_run_per_request_on_cpu_waiting_slices"]  # ms on a CPU, ms waiting, slices: bursts_of wants the ratio only
    replicas = [g for g in per if "/" not in g and g not in ("ray", "proxy", "ingress", "client")]
    wake = measured.get("wait_per_timeslice_ms_1_in_flight", 0.0) / 1000
    return cpu_models(costs, bursts_of({g: (v[0] / 1000, v[1] / 1000, v[2]) for g, v in per.items()}, replicas), wake,
                      handoff_seconds(measured["replica_by_in_flight"]))


def run_cost_replays(got: dict) -> dict:
    """Each CPU model's replay of a calibration run (a results dict) with the run's own CPU costs
    (:func:`with_run_costs`): name -> (its costs, its Result)."""
    from fmplex.cluster.simulate import Workload, simulate  # noqa: PLC0415

    given = got["replay_input"]
    work, seconds, n = Workload(**given["workload"]), given["measured_seconds"], len(given["trace"])
    trace = [(t, i) for t, i in given["trace"]]
    idle = got["idle_cpus_by_group"]
    # ms per request on a CPU during the run, less each group's idle work: seconds over the run
    per_request = got.get("plays_ms_per_request_on_cpu") or {g: v[0] for g, v in got["run_ms_per_request_on_cpu_and_waiting_for_cpu"].items()}
    on_cpu_s = {g: max(0.0, v * n / 1000 - idle.get(g, 0.0) * seconds) for g, v in per_request.items()}
    replicas = [g for g in on_cpu_s if "/" not in g and g not in ("ray", "proxy", "ingress", "client")]
    # Ray's own work as it was in the run, in place of its idle and per-request figures from steps 1 and 3
    ray_before = idle.get("ray", 0.0) + got["measured_costs"]["path_cpu_ms_per_request"].get("ray", 0.0) / 1000 * got["offered_rps"]
    background = got["side_work_cpus"] - ray_before + (on_cpu_s.get("ray", 0.0) / seconds + idle.get("ray", 0.0))
    out = {}
    for name, costs in models_of(got).items():
        replay = lambda c: simulate("shared", len(replicas), work, c, placement=given["placement"], trace=trace)  # noqa: E731
        mine = with_run_costs(costs, replay, on_cpu_s, replicas, background)
        out[name] = (mine, replay(mine))
    return out


def replay_run(paths: list[Path]) -> dict:
    """Replay calibration runs from their results files (``replay_input``; ``.json`` or ``.json.gz``) in
    the simulation as it is now, with every CPU model: seconds, no cluster; for trying a change of the
    model against measured runs. Prints each run's real p99 (of every play of its arrivals, where it has
    them) against each model's, and the median absolute error of each model over the runs."""
    import gzip  # noqa: PLC0415
    import json  # noqa: PLC0415

    from fmplex.cluster.simulate import Workload, simulate  # noqa: PLC0415

    out: dict = {"runs": {}}
    for path in paths:
        got = json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
        given = got["replay_input"]
        work = Workload(**given["workload"])
        # every play of the arrivals together, where it was played more than once
        real = got.get("real_p99_ms_of_every_play") or got.get("real_p99_ms_of_both_plays") or got["real"]["p99_ms"]
        plays = got.get("real_p99_ms_by_play") or [got["real"]["p99_ms"], got.get("real_same_arrivals_again", {}).get("p99_ms")]
        row = {"offered_rps": got["offered_rps"], "cpus_busy": got.get("cpus_busy_during_run"), "real_p99_ms": real, "plays_p99_ms": plays}
        for name, costs in models_of(got).items():
            sim = simulate("shared", len(got["real"]["replica_load_rps"]), work, costs, placement=given["placement"],
                           trace=[(t, i) for t, i in given["trace"]])
            row[name] = {"p50_ms": round(sim.p50_ms, 1), "p99_ms": round(sim.p99_ms, 1), "p99_error": round(sim.p99_ms / real - 1, 3)}
        if "run_ms_per_request_on_cpu_and_waiting_for_cpu" in got:  # the run's own CPU costs, where it recorded them
            for name, (_costs, sim) in run_cost_replays(got).items():
                row[f"{name}, run's costs"] = {"p50_ms": round(sim.p50_ms, 1), "p99_ms": round(sim.p99_ms, 1), "p99_error": round(sim.p99_ms / real - 1, 3)}
        out["runs"][path.name] = row
        print(f"{path.name}: {row['offered_rps']} req/s, {row['cpus_busy']} CPUs busy, real p99 {real} ms (plays {row['plays_p99_ms']}); "
              + "; ".join(f"{k} {v['p99_ms']} ({v['p99_error']:+.0%})" for k, v in row.items() if isinstance(v, dict)), flush=True)
    names = sorted({k for r in out["runs"].values() for k, v in r.items() if isinstance(v, dict)})
    out["median_abs_p99_error"] = {n: round(float(np.median([abs(r[n]["p99_error"]) for r in out["runs"].values() if n in r])), 3) for n in names}
    out["runs_within_15_percent"] = {n: f"{sum(abs(r[n]['p99_error']) <= 0.15 for r in out['runs'].values() if n in r)} of {sum(n in r for r in out['runs'].values())}"
                                     for n in names}
    # the real p99's own repeatability: how far one play of a run's arrivals lands from another, and how
    # often each model's p99 falls between the run's lowest and highest play
    played = {k: [p for p in r["plays_p99_ms"] if p] for k, r in out["runs"].items()}
    played = {k: p for k, p in played.items() if len(p) > 1}
    out["plays_highest_over_lowest"] = {k: round(max(p) / min(p), 2) for k, p in played.items()}
    out["runs_between_the_plays"] = {n: f"{sum(min(p) <= out['runs'][k][n]['p99_ms'] <= max(p) for k, p in played.items() if n in out['runs'][k])} of {len(played)}"
                                     for n in names}
    print(f"median |p99 error| over {len(paths)} runs: {out['median_abs_p99_error']}; within 15%: {out['runs_within_15_percent']}")
    print(f"highest / lowest play's p99, per run played more than once: {out['plays_highest_over_lowest']}; "
          f"simulated p99 between them: {out['runs_between_the_plays']}")
    return out


def scaled(costs, factor: float):  # noqa: ANN001, ANN201 - Costs is imported late
    """``costs`` with every CPU cost (replica batches, path stages) times ``factor``."""
    return dataclasses.replace(
        costs, throughput=tuple((b, t / factor) for b, t in costs.throughput),
        path_in=tuple((n, x * factor) for n, x in costs.path_in), path_out=tuple((n, x * factor) for n, x in costs.path_out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("calibration", "figure", "all", "replay"), default="all",
                    help="calibration: the real three-node run and its replay (3-4 min); figure: the simulated R = 4..256 figure "
                         "(about 20 min on 2 busy cores); replay: the simulation of the last calibration run again (its results file), no cluster")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the open-loop run to predict")
    ap.add_argument("--plays", type=int, default=3, help="how many times the run's arrivals are played (its p99 is of them all)")
    ap.add_argument("--utilisation", type=float, default=0.5, help="offered load as a share of the endpoint's measured capacity")
    ap.add_argument("--cost-seconds", type=float, default=6.0, help="length of each cost measurement")
    ap.add_argument("--idle-seconds", type=float, default=4.0, help="length of the idle measurement")
    ap.add_argument("--gpus", type=int, nargs="+", default=[4, 16, 64, 256], help="figure: cluster sizes R")
    ap.add_argument("--files", nargs="*", default=[], help="replay: the calibration results files to replay (default: the last run's)")
    ap.add_argument("--out", default=None, help="replay: also write the replays under perf/results/ with this name")
    args = ap.parse_args()
    from perf.common import write_results  # noqa: PLC0415

    if args.part == "replay":
        got = replay_run([Path(f) for f in args.files] or [ROOT / "perf" / "results" / "cluster_calibration.json"])
        if args.out:
            write_results(args.out, got)
        return 0
    if args.part in ("calibration", "all"):
        write_results("cluster_calibration.json", calibrate(args))
    if args.part in ("figure", "all"):
        write_results("cluster_simulation.json", figure(args.gpus))
    return 0


FIGURES = {  # name: the arguments of python -m fmplex.cluster.simulate
    "by_load": [],
    "by_count": ["--placing", "count"],
    "by_load_uncapped": ["--max-replicas-per-task", "256"],
    "by_load_memory_bound": ["--backbone-mb", "14000", "--device-gb", "80"],
}


def figure(gpus: list[int]) -> dict:
    """The cluster-scale figure: tasks hosted within the p99 SLO, shared vs one copy per task, for each variant."""
    import json  # noqa: PLC0415

    from fmplex.cluster import simulate  # noqa: PLC0415

    out: dict = {"how": "python perf/bench_cluster.py --part figure (simulated, not measured; MiniLM CPU costs unless said)"}
    for name, extra in FIGURES.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            t0 = time.monotonic()
            argv = ["--gpus", *map(str, gpus), *extra, "--out", tmp.name]
            print(f"== {name}: python -m fmplex.cluster.simulate {' '.join(argv[:-2])}", flush=True)
            simulate.main(argv)
            out[name] = {**json.loads(Path(tmp.name).read_text()), "minutes": round((time.monotonic() - t0) / 60, 1)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
