"""Where the cores go while the MiniLM host is saturated, next to the raw forward.

The saturation benchmarks report fmplex's throughput as a fraction of the
raw limit (the bare batched forward, every core busy, 64-row batches,
tokenized once). This names the rest of the cores' time, from two
measurements taken in one run on one machine:

- **CPU-seconds per answered request, by process**, from ``/proc/<pid>/stat``
  over the saturated window: the host's Python stub (decode, tokenize,
  forward, heads, responses), tritonserver itself (gRPC front end, ensemble
  steps, IPC with the stubs), the ensemble's other stubs, and this load
  generator (tritonclient). The raw forward's CPU-seconds per row is
  measured as CPU time (``thread_time``) by batch size, so that other load
  on the machine inflates it less than a rate. Their quotient is the
  throughput, as a fraction of the raw limit, that fmplex could reach with
  every core busy; the machine's idle share says how far from busy it was.
- **The host's stacks** (py-spy, every thread, samples of running threads
  only, so shares are of the stub's CPU time), grouped by what the frames
  show: backbone forward, tokenizer, task heads, scheduler, response
  sending, Triton request IPC, metrics.

Saturation is ``--concurrency`` closed-loop clients per task (default 48 x 4
tasks: enough rows queued for both workers to run the 64-row batches the raw
limit uses). Writes perf/results/saturation_profile.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmplex.control import serving  # noqa: E402
from fmplex.control.server import free_ports  # noqa: E402
from perf import deployments as dep  # noqa: E402
from perf.bench_baselines import raw_limit, sentences  # noqa: E402
from perf.bench_growth import batch_sizes, delta, mean_rows  # noqa: E402
from perf.common import RESULTS, machine_header, write_results  # noqa: E402
from perf.load import Driver, Target, summarize  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

# First match wins, leaf first: a sample is charged to the innermost frame
# that names one of these. Substrings of "function (file:line)" frames.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("waiting", ("wait (threading.py", "_wait_for_tstate_lock", "get (queue.py", "sleep (")),
    ("response sending", ("ResponseLedger._send ", "sender.send", "response_sender")),
    ("scheduler", ("runtime/scheduler/",)),
    ("tokenizer", ("tokenization_utils", "tokenizers", "_batch_encode")),
    ("task heads and extensions", ("extensions/", "Executor._apply")),
    ("backbone forward", ("torch/", "transformers/", "segments.py", "row_deltas.py", "Executor._pass", "Executor.forward")),
    ("request decode and validation", ("validation.py", ".accept (", "as_numpy", "decode")),
    ("metrics", ("metrics.py", "prometheus.py")),
    ("Triton IPC (execute, stub loop)", ("execute (", "triton_python_backend_utils")),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_idle() -> tuple[float, float]:
    """(idle + iowait jiffies, total jiffies) of the whole machine."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return float(vals[3] + vals[4]), float(sum(vals))


def processes(server_pid: int) -> dict[str, int]:
    """The server's processes by role: the host stub, other stubs, the server."""
    out = {"tritonserver (front end, ensembles, IPC)": server_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != server_pid or not args or b"stub" not in args[0]:
            continue
        instance = next((a.decode() for a in args if a.startswith(b"fm.minilm_")), None)
        if instance is not None:
            out[f"host stub {instance} (fm.minilm)"] = int(entry.name)
        else:
            out.setdefault("other stubs", int(entry.name))
    return out


def categorise(collapsed: Path) -> dict[str, float]:
    """Share of py-spy samples per category (see CATEGORIES)."""
    counts: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")[::-1]  # leaf first
        label = "other Python" if frames and frames[0] else "native (no Python frame)"
        for frame in frames:
            hit = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit is not None:
                label = hit
                break
        counts[label] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.most_common()}


def top_leaves(collapsed: Path, n: int = 25, depth: int = 3) -> list[tuple[float, str]]:
    """The ``n`` commonest innermost ``depth`` frames, with their sample shares."""
    counts: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if k.isdigit():
            counts[" <- ".join(stack.split(";")[::-1][:depth])] += int(k)
    total = sum(counts.values()) or 1
    return [(v / total, key) for key, v in counts.most_common(n)]


def forward_cpu_ms_per_row(texts: list[str], sizes: tuple[int, ...] = (16, 24, 32, 48, 64), seconds: float = 2.0) -> dict[int, float]:
    """CPU ms per row of the bare forward by batch size, one thread, from
    ``thread_time`` (not the wall clock), so other load on the machine does
    not inflate it the way it inflates a rate."""
    import numpy as np  # noqa: PLC0415

    from fmplex.backbones import get_backbone  # noqa: PLC0415
    from fmplex.triton_backend.executor import Executor, set_threads  # noqa: PLC0415

    set_threads(1)
    ex = Executor(get_backbone("minilm"), "cpu")
    ids = [np.asarray(x, dtype=np.int64) for x in ex.tokenizer(texts)["input_ids"]]
    out: dict[int, float] = {}
    for b in sizes:
        ex.encode(ids[:b])
        n, k, c0, t0 = 0, 0, time.thread_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ex.encode([ids[(k + i) % len(ids)] for i in range(b)])
            n, k = n + b, k + b
        out[b] = 1e3 * (time.thread_time() - c0) / n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=4, help="classifier tasks (default 4)")
    ap.add_argument("--concurrency", type=int, default=48, help="closed-loop clients per task (default 48)")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds saturated (default 12)")
    ap.add_argument("--saturated-batch-rows", type=int, default=None, help="override the host's batch growth limit (0 = off)")
    ap.add_argument("--no-py-spy", action="store_true", help="skip the stack samples (CPU accounting only)")
    ap.add_argument("--results", type=Path, default=None, help="results folder (default perf/results)")
    cfg = ap.parse_args()
    texts = sentences()
    names = dep.task_names(cfg.tasks)
    work = Path(tempfile.mkdtemp(prefix="fmplex-profile-"))
    cores = len(os.sched_getaffinity(0))
    raw = raw_limit(texts, 4.0, "cpu")
    raw_rps = max(raw.values())
    log(f"raw: {', '.join(f'{k} {v:.1f}' for k, v in raw.items())} sentences/s; {cores} cores")
    fwd = forward_cpu_ms_per_row(texts)
    log("forward CPU ms per row by batch rows: " + ", ".join(f"{b}: {v:.2f}" for b, v in fwd.items()))
    repo = dep.fmplex_repo(work, names)
    if cfg.saturated_batch_rows is not None:
        config = repo / "fm.minilm" / "config.pbtxt"
        key = 'key: "saturated_batch_rows" value { string_value: "'
        head, tail = config.read_text().split(key, 1)
        config.write_text(head + key + str(cfg.saturated_batch_rows) + tail[tail.index('"'):])
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / "server.log")
    metrics = f"http://127.0.0.1:{ports.metrics}/metrics"
    driver = Driver(Target("fmplex", f"127.0.0.1:{ports.grpc}", {t: t for t in names}), texts, timeout_s=30.0)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        assert proc.proc is not None
        pids = processes(proc.proc.pid)
        log("processes: " + ", ".join(f"{k} pid {v}" for k, v in pids.items()))
        driver.closed_loop({t: 4 for t in names}, 3.0)  # warm-up
        # Let the clients reach steady state, then measure a window inside the run.
        import threading  # noqa: PLC0415

        holder: dict[str, Any] = {}
        run = threading.Thread(target=lambda: holder.update(recs=driver.closed_loop({t: cfg.concurrency for t in names}, cfg.duration + 3.0)))
        run.start()
        time.sleep(1.5)
        b0 = batch_sizes(metrics)
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        me0 = sum(os.times()[:2])
        idle0, total0 = machine_idle()
        t0 = time.perf_counter()
        host_pid = next(p for k, p in pids.items() if k.startswith("host stub"))
        samples = work / "host.collapsed"
        spied = None
        if not cfg.no_py_spy:
            spied = subprocess.Popen([spy, "record", "--pid", str(host_pid), "--duration", str(int(cfg.duration)), "--rate", "100",
                                      "--nonblocking", "--format", "raw", "--output", str(samples)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spied.wait()
        else:
            time.sleep(cfg.duration)
        window = time.perf_counter() - t0
        c1 = {k: cpu_seconds(p) for k, p in pids.items()}
        me1 = sum(os.times()[:2])
        idle1, total1 = machine_idle()
        sizes = delta(batch_sizes(metrics), b0)
        run.join()
        recs = holder["recs"]
    finally:
        driver.close()
        proc.stop()
    # Requests answered inside the measured window (the run started 1.5 s before it).
    start = 1.5
    sat = summarize(recs, (start, start + window), timeout_s=30.0)
    answered = sat["throughput_rps"] * window
    cpu = {k: c1[k] - c0[k] for k in pids}
    cpu["load generator (tritonclient, this process)"] = me1 - me0
    per_req = {k: 1e3 * v / answered for k, v in cpu.items()}
    total_ms = sum(per_req.values())
    raw_ms = fwd[max(fwd)]  # the raw limit's forward: 64-row batches
    busy = 1.0 - (idle1 - idle0) / max(1.0, total1 - total0)
    result: dict[str, Any] = {
        **machine_header(),
        "cores": cores,
        "tasks": cfg.tasks,
        "concurrency_per_task": cfg.concurrency,
        "window_s": window,
        "raw": raw,
        "raw_limit_rps": raw_rps,
        "throughput_rps": sat["throughput_rps"],
        "saturation_over_raw": sat["throughput_rps"] / raw_rps,
        "p99_ms": sat["p99_ms"],
        "shed_share": sat["shed_share"],
        "batch_rows": sizes,
        "mean_batch_rows": mean_rows(sizes),
        "machine_busy_share": busy,
        "cpu_ms_per_request": per_req,
        "cpu_ms_per_request_total": total_ms,
        "forward_cpu_ms_per_row_by_batch_rows": fwd,
        "raw_cpu_ms_per_row": raw_ms,
        "raw_cpu_ms_per_row_from_rate": 1e3 * cores / raw_rps,
        "ceiling_over_raw_if_all_cores_busy": raw_ms / total_ms,
    }
    if not cfg.no_py_spy and samples.exists():
        result["host_stack_shares"] = categorise(samples)
        result["host_top_stacks"] = [{"share": sh, "frames": fr} for sh, fr in top_leaves(samples)]
    path = write_results("saturation_profile.json", result, cfg.results or RESULTS)
    log(f"\nsaturated: {sat['throughput_rps']:.1f} req/s = {result['saturation_over_raw']:.2f}x raw ({raw_rps:.1f}); "
        f"mean batch {result['mean_batch_rows']:.1f} rows; machine busy {busy:.0%}; failed {sat['shed_share']:.1%}")
    log(f"CPU ms per answered request (raw forward: {raw_ms:.2f} ms per row):")
    for k, v in sorted(per_req.items(), key=lambda kv: -kv[1]):
        log(f"  {v:7.2f}  {k}")
    log(f"  {total_ms:7.2f}  total -> ceiling {result['ceiling_over_raw_if_all_cores_busy']:.2f}x raw with every core busy")
    stub_ms = sum(v for k, v in per_req.items() if k.startswith("host stub"))
    for k, v in result.get("host_stack_shares", {}).items():
        log(f"  {v:6.1%}  ({v * stub_ms:5.2f} ms)  host stub: {k}")
    log(f"wrote {path}")
    if os.environ.get("FMPLEX_KEEP_PROFILE"):
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
