"""fmplex side by side with the deployments a user would pick instead.

One run, one machine, deployments measured one after another with the same
clients and the same tasks (read the ratios: these machines are shared):

- ``raw``: the backbone's batched forward in a tight loop in this process
  (1 torch thread): the physical limit, ``raw_limit_rps``.
- ``fmplex``: N classifier tasks as vFMs on one shared host.
- ``isolated``: one model per task, own backbone copy, Triton's dynamic batcher.
- ``partitioned``: the same, each confined to 1/N of the machine (CFS quota).

Per deployment: saturation throughput (closed loop, every task), latency vs
offered load (open-loop Poisson sweep), bursty arrivals and a trace replay at
the matched load, perf_analyzer per vFM, memory (PSS of tritonserver + stubs),
fairness under saturation with weights 1:2:4 (Jain's index of served rows /
weight). Then tasks that fit a memory budget, for fmplex and isolated.

Writes perf/results/summary.json, summary.md, latency_vs_load.png,
memory_vs_tasks.png (and baselines_trace.csv, the replayed trace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmplex.control import serving  # noqa: E402
from fmplex.control.server import Ports, free_ports, perf_analyzer_command  # noqa: E402
from fmplex.control.train import read_labelled_csv  # noqa: E402
from fmplex.control.triton_api import Triton  # noqa: E402
from perf import deployments as dep  # noqa: E402
from perf.common import RESULTS, cpu_seconds, process_tree, server_memory, text_input_file, write_results  # noqa: E402
from perf.load import Driver, Target, bursty, jain, poisson, read_trace, summarize, write_trace  # noqa: E402

DEPLOYMENTS = ("fmplex", "isolated", "partitioned")
FAIR_WEIGHTS = (1.0, 2.0, 4.0)


def log(msg: str) -> None:
    print(msg, flush=True)


def sentences() -> list[str]:
    out: list[str] = []
    for name in ("sentiment", "topic", "intent"):
        out += read_labelled_csv(ROOT / "fmplex" / "data" / f"{name}.csv")[0]
    return out


def machine(device: str) -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform(),
                            "device": device, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if device != "cpu":
        info["gpu"] = gpu_name()
    return info


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_memory_mib() -> float | None:
    """GPU memory in use on the device (all processes), where there is one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# --- raw limit ----------------------------------------------------------------------


def raw_limit(texts: list[str], seconds: float, device: str) -> dict[str, float]:
    """Sentences/s of the bare batched forward (tokenized once, same sentences)."""
    import numpy as np  # noqa: PLC0415

    from fmplex.backbones import get_backbone  # noqa: PLC0415
    from fmplex.triton_backend.executor import Executor, set_threads  # noqa: PLC0415

    set_threads(1)
    ex = Executor(get_backbone("minilm"), device)
    ids = [np.asarray(x, dtype=np.int64) for x in ex.tokenizer(texts)["input_ids"]]
    out: dict[str, float] = {}
    for b in (1, 16, 64):
        ex.encode(ids[:b])
        n, k, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rows = [ids[(k + i) % len(ids)] for i in range(b)]
            ex.encode(rows)
            n, k = n + b, k + b
        out[f"batch_{b}"] = n / (time.perf_counter() - t0)
    cores = len(os.sched_getaffinity(0))
    if cores > 1 and device == "cpu":  # every core busy, one forward per thread (as the host's workers)
        import threading  # noqa: PLC0415

        counts = [0] * cores

        def spin(j: int, stop: float) -> None:
            k = j * 64
            while time.perf_counter() < stop:
                ex.encode([ids[(k + i) % len(ids)] for i in range(64)])
                counts[j] += 64
                k += 64

        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        threads = [threading.Thread(target=spin, args=(j, stop)) for j in range(cores)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        out[f"threads_{cores}_batch_64"] = sum(counts) / (time.perf_counter() - t0)
    del ex
    return out


# --- one deployment -------------------------------------------------------------------


def perf_analyzer_runs(url: str, models: list[str], data: Path, concurrency: int, interval_ms: int, batch_dim: bool) -> dict[str, Any]:
    """perf_analyzer, one run per vFM/model, one after another (closed loop)."""
    cmd, env = perf_analyzer_command()
    out: dict[str, Any] = {}
    for m in models:
        args = [*cmd, "-m", m, "-u", url, "-i", "grpc", "--input-data", str(data), "--shape", "TEXT:1",
                "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
                "--stability-percentage", "999", "--max-trials", "3", "--percentile", "99"]  # shared machine: take 3 windows as they come
        p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        thr = re.search(r"throughput: ([\d.]+) infer/sec", p.stdout)
        lat = re.search(r"p99 latency: (\d+) usec", p.stdout)
        if p.returncode != 0 or not thr:
            out[m] = {"error": (p.stdout + p.stderr)[-500:]}
            continue
        out[m] = {"throughput_rps": float(thr.group(1)), "p99_ms": int(lat.group(1)) / 1000 if lat else None}
    return out


def measure(name: str, target: Target, texts: list[str], cfg: argparse.Namespace, pid: int, loads: list[float],
            matched: float, trace: Path, set_weights: Callable[[dict[str, float]], None] | None) -> dict[str, Any]:
    tasks = list(target.models)
    driver = Driver(target, texts)
    res: dict[str, Any] = {}
    try:
        log(f"   warm-up ({name})")
        driver.closed_loop({t: 1 for t in tasks}, 2.0)

        d = cfg.duration
        pids = process_tree(pid)
        c0, own0, w0 = cpu_seconds(pids), time.process_time(), time.perf_counter()
        recs = driver.closed_loop({t: cfg.concurrency for t in tasks}, d)
        c1, own1, w1 = cpu_seconds(pids), time.process_time(), time.perf_counter()
        sat = summarize(recs, (0.5, d))
        res["saturation"] = sat
        # Where the cores went while saturated: the model processes (stubs), Triton's
        # front end (tritonserver itself) and this client; in cores (1.0 = one core busy).
        span = w1 - w0
        stubs = sum(c1.get(p, 0) - c0.get(p, 0) for p in pids if p != pid and p in c0)
        res["cpu_cores_busy"] = {"models": stubs / span, "triton_frontend": (c1.get(pid, 0) - c0.get(pid, 0)) / span,
                                 "client": (own1 - own0) / span}
        mem = server_memory(pid)
        gpu = gpu_memory_mib()
        res["memory"] = {**mem, "gpu_mib": gpu}
        log(f"   saturation c={cfg.concurrency}/task: {sat['throughput_rps']:.1f} req/s, p50 {sat['p50_ms']:.0f} ms, "
            f"p99 {sat['p99_ms']:.0f} ms, failed {sat['failed']}; memory {mem['pss_mib']:.0f} MiB PSS in {mem['processes']} processes")
        log("   cores busy while saturated: " + ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_cores_busy"].items()))

        sweep = []
        for rate in loads:
            recs = driver.open_loop(poisson(rate, d, tasks, cfg.mix_weights, seed=int(rate)))
            s = summarize(recs, (0.0, d))
            s["offered_rps"] = rate
            sweep.append(s)
            log(f"   poisson {rate:6.1f} req/s: served {s['throughput_rps']:6.1f}, p50 {s['p50_ms']:7.1f} ms, p90 {s['p90_ms']:7.1f}, "
                f"p99 {s['p99_ms']:7.1f} ms, failed {s['failed']}")
        res["poisson_sweep"] = sweep

        recs = driver.open_loop(poisson(matched, d, tasks, cfg.mix_weights, seed=7))
        res["matched"] = {**summarize(recs, (0.0, d)), "offered_rps": matched, "mix": cfg.mix}
        recs = driver.open_loop(poisson(matched, d, tasks, seed=7))  # every task the same share
        res["matched_uniform"] = {**summarize(recs, (0.0, d)), "offered_rps": matched, "mix": "uniform"}
        recs = driver.open_loop(bursty(matched, d, tasks, cfg.mix_weights, seed=7))
        res["bursty"] = {**summarize(recs, (0.0, d)), "offered_rps": matched}
        replay = read_trace(trace, tasks)
        recs = driver.open_loop(replay)
        res["trace"] = {**summarize(recs, (0.0, replay[-1].at + 1e-3)), "requests": len(replay),
                        "rows": sum(a.size for a in replay), "span_s": replay[-1].at}
        for k in ("matched", "matched_uniform", "bursty", "trace"):
            s = res[k]
            log(f"   {k:<8} p50 {s['p50_ms']:7.1f} ms, p90 {s['p90_ms']:7.1f}, p99 {s['p99_ms']:7.1f} ms, served {s['throughput_rps']:.1f} req/s, failed {s['failed']}")

        fair_tasks = tasks[:3]
        weights = dict(zip(fair_tasks, FAIR_WEIGHTS))
        if set_weights is not None:
            set_weights(weights)
            time.sleep(0.5)
        # Weights only matter with a backlog: far more requests outstanding than
        # the batches in flight can hold (2 workers x 16 rows on this CPU).
        recs = driver.closed_loop({t: cfg.concurrency * 4 for t in fair_tasks}, d)
        if set_weights is not None:
            set_weights({t: 1.0 for t in fair_tasks})
        f = summarize(recs, (0.5, d))
        served = {t: f["per_task"][t]["rows_per_s"] for t in fair_tasks}  # type: ignore[index]
        res["fairness"] = {"weights": weights, "served_rows_per_s": served,
                           "jain": jain([served[t] / weights[t] for t in fair_tasks]),
                           "weights_applied": set_weights is not None}
        log(f"   fairness 1:2:4 served {', '.join(f'{t}={v:.1f}' for t, v in served.items())} rows/s -> Jain {res['fairness']['jain']:.3f}")
    finally:
        driver.close()
    data = text_input_file(Path(tempfile.mkdtemp(prefix="fmplex-pa-")) / "input.json", [texts[0]])
    pa_models = [target.models[t] for t in (tasks if cfg.pa_all else tasks[:1])]
    res["perf_analyzer"] = perf_analyzer_runs(target.grpc_url, pa_models, data, cfg.concurrency, cfg.pa_interval_ms, target.batch_dim)
    for m, r in res["perf_analyzer"].items():
        log(f"   perf_analyzer {m} c={cfg.concurrency}: " + (f"{r['throughput_rps']:.1f} infer/s, p99 {r['p99_ms']:.0f} ms" if "error" not in r else f"FAILED {r['error'][:200]}"))
    shutil.rmtree(data.parent, ignore_errors=True)
    return res


def run_deployment(name: str, work: Path, names: list[str], texts: list[str], cfg: argparse.Namespace, loads: list[float],
                   matched: float, trace: Path) -> dict[str, Any]:
    log(f"== {name}: {len(names)} tasks")
    ports = free_ports()
    t0 = time.perf_counter()
    weights_fn = None
    if name == "fmplex":
        repo = dep.fmplex_repo(work, names, device=cfg.device, workers=cfg.fmplex_workers, max_batch_rows=cfg.fmplex_batch_rows)
        proc = serving.start(repo, ports, log_path=work / f"{name}.log")
        weights_fn = lambda w: dep.set_weights(repo, w)  # noqa: E731
        target = Target(name, f"127.0.0.1:{ports.grpc}", {t: t for t in names})
    else:
        repo = dep.baseline_repo(work, names, name, cfg.device)
        proc = dep.start(repo, ports, names, work / f"{name}.log")
        target = Target(name, f"127.0.0.1:{ports.grpc}", {t: t for t in names}, batch_dim=True)
    up = time.perf_counter() - t0
    log(f"   up in {up:.1f} s")
    try:
        assert proc.proc is not None
        res = measure(name, target, texts, cfg, proc.proc.pid, loads, matched, trace, weights_fn)
        res["startup_s"] = up
        if name == "partitioned":
            res["partition"] = dep.partition_report(names)
            log(f"   partition: {next(iter(res['partition'].values()))}")
    finally:
        proc.stop()
        if name == "partitioned":
            dep.remove_partitions()
    return res


# --- tasks in a memory budget -----------------------------------------------------------


def budget_isolated(work: Path, budget_mib: float, limit: int) -> dict[str, Any]:
    """Load one-copy-per-task models one by one until the server's PSS passes the budget."""
    names = dep.task_names(limit, "b")
    repo = dep.baseline_repo(work / "budget-iso", names, "isolated")
    ports = free_ports()
    proc = dep.start(repo, ports, [], work / "budget-isolated.log")
    curve, fitted = [], 0
    try:
        assert proc.proc is not None
        curve.append((0, server_memory(proc.proc.pid)["pss_mib"]))
        with Triton(f"127.0.0.1:{ports.grpc}", timeout=300) as triton:
            for i, n in enumerate(names, start=1):
                triton.load(n)
                mem = server_memory(proc.proc.pid)["pss_mib"]
                curve.append((i, mem))
                log(f"   isolated: {i:3d} tasks, {mem:7.0f} MiB PSS")
                if mem > budget_mib:
                    break
                fitted = i
    finally:
        proc.stop()
    return {"tasks": fitted, "budget_reached": curve[-1][1] > budget_mib, "curve": curve}


def budget_fmplex(work: Path, budget_mib: float, limit: int, step: int) -> dict[str, Any]:
    """Deploy vFMs in steps of ``step`` (answering one request each) until the
    budget or the host's slot pool (``limit``) is reached; beyond the pool the
    count is projected from the measured per-task slope, and says so."""
    import numpy as np  # noqa: PLC0415
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    names = dep.task_names(limit, "v")
    wdir = work / "budget-fmplex"
    repo = dep.fmplex_repo(wdir, [], slots=limit)
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / "budget-fmplex.log")
    curve: list[tuple[int, float]] = []
    fitted, reached = 0, False
    url = f"127.0.0.1:{ports.grpc}"
    client = grpcclient.InferenceServerClient(url)
    try:
        assert proc.proc is not None
        curve.append((0, server_memory(proc.proc.pid)["pss_mib"]))
        for start in range(0, limit, step):
            chunk = names[start : start + step]
            dep.add_fmplex_tasks(repo, chunk, offset=start)
            subprocess.run([dep.FMPLEX, "deploy", "--repo", str(repo), "--url", url, *chunk], check=True, capture_output=True)
            for n in chunk:  # every task has answered (its extension is resident)
                inp = grpcclient.InferInput("TEXT", [1], "BYTES")
                inp.set_data_from_numpy(np.array([b"warm"], dtype=np.object_))
                client.infer(n, [inp], client_timeout=120)
            mem = server_memory(proc.proc.pid)["pss_mib"]
            curve.append((start + len(chunk), mem))
            log(f"   fmplex: {start + len(chunk):5d} tasks, {mem:7.0f} MiB PSS")
            if mem > budget_mib:
                reached = True
                break
            fitted = start + len(chunk)
    finally:
        client.close()
        proc.stop()
    out: dict[str, Any] = {"tasks_measured": fitted, "budget_reached": reached, "curve": curve}
    if not reached and len(curve) >= 2:
        (n0, m0), (n1, m1) = curve[1], curve[-1]
        slope = max((m1 - m0) / max(n1 - n0, 1), 1e-6)
        out["per_task_mib"] = slope
        out["tasks_projected"] = int(n1 + (budget_mib - m1) / slope)
    return out


# --- output ----------------------------------------------------------------------------


def write_outputs(summary: dict[str, Any], full: dict[str, Any]) -> None:
    write_results("summary.json", summary)
    write_results("baselines_bench.json", full)
    rows = ["| deployment | throughput (req/s) | p50 ms | p90 ms | p99 ms | p99 ms, uniform mix | memory MiB (PSS) | fairness Jain 1:2:4 |",
            "|---|---|---|---|---|---|---|---|"]
    for d in DEPLOYMENTS:
        s = summary.get(d)
        if s:
            rows.append(f"| {d} | {s['throughput_rps']:.1f} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                        f"{s['p99_ms_uniform_mix']:.1f} | {s['memory_mib']:.0f} | {s['fairness_jain']:.3f} |")
    tib = summary["tasks_in_budget"]
    md = [
        f"# fmplex vs baselines ({summary['when']})", "",
        f"Machine: {summary['machine']['cpus']} x {summary['machine']['cpu']}, device {summary['machine']['device']}"
        + (f" ({summary['machine'].get('gpu')})" if summary['machine'].get('gpu') else "") + f"; {summary['tasks']} tasks; "
        f"latency at matched offered load {summary['matched_load_rps']:.0f} req/s (open-loop Poisson, 1 sentence per request, "
        f"{summary['mix']} mix over tasks); "
        "throughput = closed-loop saturation.", "",
        *rows, "",
        f"- raw batched forward limit: **{summary['raw_limit_rps']:.1f}** sentences/s; fmplex saturation = "
        f"**{summary['ratios']['fmplex_vs_raw']:.2f}x** raw",
        f"- p99 at matched load: fmplex / isolated = **{summary['ratios']['p99_fmplex_vs_isolated']:.2f}**, "
        f"fmplex / partitioned = **{summary['ratios']['p99_fmplex_vs_partitioned']:.2f}**; with every task the same share: "
        f"{summary['ratios']['p99_uniform_fmplex_vs_isolated']:.2f} / {summary['ratios']['p99_uniform_fmplex_vs_partitioned']:.2f}",
        f"- fairness (weights 1:2:4, saturated): Jain **{summary['fairness_jain']:.3f}**",
        ("- tasks in a memory budget: skipped (--skip-budget)" if tib.get("skipped") else
         f"- tasks in a {summary['budget_mib'] / 1024:g} GiB budget: fmplex **{tib['fmplex']}**"
         f"{' (projected from ' + str(tib['fmplex_measured']) + ' deployed)' if tib.get('fmplex_projected') else ''}, "
         f"isolated **{tib['isolated']}** -> **{summary['ratios']['tasks_fmplex_vs_isolated']:.0f}x**"),
        "", "Plots: [latency vs load](latency_vs_load.png), [memory vs tasks](memory_vs_tasks.png). Full figures: baselines_bench.json.", "",
    ]
    (RESULTS / "summary.md").write_text("\n".join(md))
    log(f"== written {RESULTS / 'summary.md'}")
    plots(full)


def plots(full: dict[str, Any]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for d in DEPLOYMENTS:
        sweep = full["deployments"].get(d, {}).get("poisson_sweep")
        if not sweep:
            continue
        x = [s["offered_rps"] for s in sweep]
        ax[0].plot(x, [s["p50_ms"] for s in sweep], "o-", label=d)
        ax[1].plot(x, [s["p99_ms"] for s in sweep], "o-", label=d)
    for a, t in zip(ax, ("p50", "p99")):
        a.set_xlabel("offered load (requests/s, Poisson)")
        a.set_ylabel(f"{t} latency (ms)")
        a.set_yscale("log")
        a.axvline(full["raw_limit_rps"], color="grey", ls=":", label="raw forward limit")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"latency vs load, {full['tasks']} tasks ({full['machine']['device']}, {full['machine']['cpus']} cores)")
    fig.tight_layout()
    fig.savefig(RESULTS / "latency_vs_load.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for d in ("fmplex", "isolated"):
        curve = full["budget"].get(d, {}).get("curve")
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label=d)
    ax.axhline(full["budget_mib"], color="grey", ls=":", label="budget")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("tasks deployed")
    ax.set_ylabel("server memory, MiB PSS (tritonserver + stubs)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "memory_vs_tasks.png", dpi=110)
    plt.close(fig)
    log(f"== written {RESULTS / 'latency_vs_load.png'}, {RESULTS / 'memory_vs_tasks.png'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs, smaller budget (under 5 minutes)")
    ap.add_argument("--tasks", type=int, help="tasks per deployment (default 8; quick 4)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:n] on a GPU machine")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 8; quick 3)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight per task")
    ap.add_argument("--loads", help="comma-separated offered loads as fractions of the raw limit (default 0.15,0.3,0.45,0.6,0.75)")
    ap.add_argument("--matched", type=float, default=0.45, help="matched offered load for the summary, fraction of the raw limit")
    ap.add_argument("--mix", choices=("zipf", "uniform"), default="zipf",
                    help="how open-loop requests spread over tasks: zipf (task i gets 1/(i+1) of the weight: a few hot tasks, "
                         "as real multi-task traffic) or uniform; the matched load is also measured uniform")
    ap.add_argument("--budget-gib", type=float, help="memory budget for tasks_in_budget (default 8; quick 1)")
    ap.add_argument("--fmplex-max-tasks", type=int, help="vFMs deployed at most for the budget (host slot pool; default 1024; quick 128)")
    ap.add_argument("--trace", type=Path, help="replay this trace (timestamp_s,task,size) instead of a generated one")
    ap.add_argument("--only", help="comma-separated subset of deployments")
    ap.add_argument("--fmplex-workers", default="auto", help="the fmplex host's workers (default auto: one per core)")
    ap.add_argument("--fmplex-batch-rows", type=int, help="the fmplex host's max_batch_rows (default: fmplex's default, 16)")
    ap.add_argument("--skip-budget", action="store_true", help="skip the tasks-in-budget measurement")
    cfg = ap.parse_args()
    cfg.tasks = cfg.tasks or (4 if cfg.quick else 8)
    if cfg.tasks < 3:
        ap.error("--tasks must be >= 3 (the fairness run uses three tasks)")
    cfg.duration = cfg.duration or (3.0 if cfg.quick else 8.0)
    cfg.pa_all = not cfg.quick
    cfg.pa_interval_ms = 1500 if cfg.quick else 2500
    budget_mib = (cfg.budget_gib or (1.0 if cfg.quick else 8.0)) * 1024
    fmplex_max = cfg.fmplex_max_tasks or (128 if cfg.quick else 1024)
    fractions = [float(x) for x in (cfg.loads or ("0.2,0.45,0.7" if cfg.quick else "0.15,0.3,0.45,0.6,0.75")).split(",")]
    only = cfg.only.split(",") if cfg.only else list(DEPLOYMENTS)
    t_start = time.perf_counter()
    texts = sentences()
    names = dep.task_names(cfg.tasks)
    cfg.mix_weights = [1.0 / (i + 1) for i in range(cfg.tasks)] if cfg.mix == "zipf" else [1.0] * cfg.tasks

    log("== raw batched forward (this process, 1 torch thread)")
    raw = raw_limit(texts, 2.0 if cfg.quick else 5.0, cfg.device)
    raw_rps = max(raw.values())
    log("   " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items()) + " sentences/s")
    loads = [round(f * raw_rps, 1) for f in fractions]
    matched = round(cfg.matched * raw_rps, 1)

    work = Path(tempfile.mkdtemp(prefix="fmplex-baselines-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    trace = cfg.trace or write_trace(RESULTS / "baselines_trace.csv", [
        a.__class__(a.at, a.task, 1 + (i % 7 == 0) * 3) for i, a in enumerate(bursty(matched * 0.8, cfg.duration, names, cfg.mix_weights, seed=11))
    ])
    full: dict[str, Any] = {"machine": machine(cfg.device), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "tasks": cfg.tasks,
                            "raw": raw, "raw_limit_rps": raw_rps, "loads_rps": loads, "matched_load_rps": matched,
                            "budget_mib": budget_mib, "deployments": {}, "budget": {}, "quick": cfg.quick}
    try:
        for d in only:
            full["deployments"][d] = run_deployment(d, work, names, texts, cfg, loads, matched, trace)
        if cfg.skip_budget:
            full["budget"] = {"isolated": {"tasks": 0, "budget_reached": False, "curve": []},
                              "fmplex": {"tasks_measured": 0, "budget_reached": False, "curve": []}, "skipped": True}
        else:
            log(f"== tasks in a {budget_mib / 1024:g} GiB budget")
            full["budget"]["isolated"] = budget_isolated(work, budget_mib, limit=64)
            full["budget"]["fmplex"] = budget_fmplex(work, budget_mib, fmplex_max, step=max(16, fmplex_max // 8))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dep.remove_partitions()
    full["seconds"] = time.perf_counter() - t_start

    def brief(d: str) -> dict[str, Any] | None:
        r = full["deployments"].get(d)
        if not r:
            return None
        return {"throughput_rps": r["saturation"]["throughput_rps"], "p50_ms": r["matched"]["p50_ms"], "p90_ms": r["matched"]["p90_ms"],
                "p99_ms": r["matched"]["p99_ms"], "p99_ms_uniform_mix": r["matched_uniform"]["p99_ms"],
                "memory_mib": r["memory"]["pss_mib"], "gpu_memory_mib": r["memory"]["gpu_mib"],
                "fairness_jain": r["fairness"]["jain"], "failed": r["matched"]["failed"] + r["saturation"]["failed"]}

    bf, bi = full["budget"]["fmplex"], full["budget"]["isolated"]
    fm_tasks = bf["tasks_measured"] if bf["budget_reached"] else bf.get("tasks_projected", bf["tasks_measured"])
    summary: dict[str, Any] = {
        **{d: brief(d) for d in DEPLOYMENTS},
        "raw_limit_rps": raw_rps,
        "fairness_jain": (brief("fmplex") or {}).get("fairness_jain"),
        "tasks_in_budget": {"fmplex": fm_tasks, "isolated": bi["tasks"], "fmplex_measured": bf["tasks_measured"],
                            "fmplex_projected": not bf["budget_reached"], "skipped": bool(full["budget"].get("skipped"))},
        "budget_mib": budget_mib, "matched_load_rps": matched, "tasks": cfg.tasks, "mix": cfg.mix,
        "machine": full["machine"], "when": full["when"], "quick": cfg.quick, "seconds": full["seconds"],
    }

    def ratio(a: float | None, b: float | None) -> float:
        return float("nan") if not a or not b else a / b

    f, i, p = (summary.get(d) or {} for d in DEPLOYMENTS)
    summary["ratios"] = {
        "fmplex_vs_raw": ratio(f.get("throughput_rps"), raw_rps),
        "p99_fmplex_vs_isolated": ratio(f.get("p99_ms"), i.get("p99_ms")),
        "p99_fmplex_vs_partitioned": ratio(f.get("p99_ms"), p.get("p99_ms")),
        "p99_uniform_fmplex_vs_isolated": ratio(f.get("p99_ms_uniform_mix"), i.get("p99_ms_uniform_mix")),
        "p99_uniform_fmplex_vs_partitioned": ratio(f.get("p99_ms_uniform_mix"), p.get("p99_ms_uniform_mix")),
        "throughput_fmplex_vs_isolated": ratio(f.get("throughput_rps"), i.get("throughput_rps")),
        "tasks_fmplex_vs_isolated": ratio(fm_tasks, bi["tasks"]),
    }
    write_outputs(summary, full)
    log(f"== done in {full['seconds'] / 60:.1f} min: " + json.dumps(summary["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
