"""fmplex side by side with the deployments a user would pick instead.

Deployments are measured one after another with the same clients and tasks,
in an order rotated every repetition (the machine's noise favours none):

- ``raw``: the backbone's batched forward in a tight loop in this process
  (1 torch thread per forward): the physical limit, ``raw_limit_rps``.
- ``fmplex``: N classifier tasks as vFMs on one shared host.
- ``isolated``: one model per task, own backbone copy, Triton's dynamic
  batcher; run with its best setting (1 instance x 1 thread, 1 instance x
  cores threads, cores instances), picked by its own p99 at the matched load.
- ``partitioned``: the same, each confined to 1/N of the machine (CFS quota);
  its best batch size picked the same way.

Workloads per deployment: saturation (closed loop), matched load with the
uniform mix and with the zipf mix, bursty arrivals, a trace replay, a load
sweep (first repetition), perf_analyzer (first repetition), fairness under
saturation with weights 1:2:4 (scored only where weights exist). Every sent
request counts: a shed or failed one counts as the client timeout in the
percentiles. Then tasks that fit a memory budget, measured (perf/budget.py).

Writes perf/results/summary.json, summary.md (perf/report.py), baselines_bench.json
(every repetition and setting), latency_vs_load.png, memory_vs_tasks.png and
baselines_trace.csv (the replayed trace).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fmplex.control.server import free_ports, perf_analyzer_command  # noqa: E402
from fmplex.control.train import read_labelled_csv  # noqa: E402
from perf import budget  # noqa: E402
from perf import deployments as dep  # noqa: E402
from perf.common import RESULTS, cpu_seconds, process_tree, server_memory, text_input_file, write_results  # noqa: E402
from perf.load import Driver, Target, bursty, jain, pick_best, poisson, read_trace, rotations, summarize, write_trace  # noqa: E402
from perf.report import DEPLOYMENTS, build_summary, render_markdown  # noqa: E402

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
                ex.encode([ids[(k + i) % len(ids)] for i in range(64)])  # noqa: F821 - bound above; deleted after the threads join
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


def workload(driver: Driver, arrivals: list, span: float, cfg: argparse.Namespace, pid: int) -> dict[str, Any]:
    """One open-loop workload: its summary (every request counted) and the server's memory after it."""
    s = summarize(driver.open_loop(arrivals), (0.0, span), timeout_s=cfg.timeout, slo_s=cfg.slo_ms / 1e3)
    s["memory_mib"] = server_memory(pid)["pss_mib"]
    return s


def line(k: str, s: dict[str, Any]) -> str:
    return (f"   {k:<15} offered {s['offered_rps']:6.1f}, served {s['throughput_rps']:6.1f}, goodput {s['goodput_rps']:6.1f} req/s, "
            f"shed {100 * s['shed_share']:4.1f}%, p50 {s['p50_ms']:7.1f} p90 {s['p90_ms']:7.1f} p99 {s['p99_ms']:7.1f} ms")


def measure(name: str, target: Target, texts: list[str], cfg: argparse.Namespace, pid: int, loads: list[float],
            matched: float, trace: Path, set_weights: Callable[[dict[str, float]], None] | None, first: bool) -> dict[str, Any]:
    """Every workload on one running deployment. ``first``: also the load sweep
    and perf_analyzer (run once: they feed the plot and a cross-check, not a headline)."""
    tasks = list(target.models)
    zipf = [1.0 / (i + 1) for i in range(len(tasks))]
    driver = Driver(target, texts, timeout_s=cfg.timeout)
    d = cfg.duration
    res: dict[str, Any] = {}
    try:
        log(f"   warm-up ({name})")
        driver.closed_loop({t: 1 for t in tasks}, 2.0)

        pids = process_tree(pid)
        c0, own0, w0 = cpu_seconds(pids), time.process_time(), time.perf_counter()
        sat_c = max(cfg.concurrency, cfg.saturation_clients // len(tasks))
        recs = driver.closed_loop({t: sat_c for t in tasks}, d)
        c1, own1, w1 = cpu_seconds(pids), time.process_time(), time.perf_counter()
        sat = summarize(recs, (0.5, d), timeout_s=cfg.timeout, slo_s=cfg.slo_ms / 1e3)
        mem = server_memory(pid)
        sat["memory_mib"] = mem["pss_mib"]
        res["saturation"] = sat
        # Where the cores went while saturated: the model processes (stubs), Triton's
        # front end (tritonserver itself) and this client; in cores (1.0 = one core busy).
        span = w1 - w0
        stubs = sum(c1.get(p, 0) - c0.get(p, 0) for p in pids if p != pid and p in c0)
        res["cpu_cores_busy"] = {"models": stubs / span, "triton_frontend": (c1.get(pid, 0) - c0.get(pid, 0)) / span,
                                 "client": (own1 - own0) / span}
        res["memory"] = {**mem, "gpu_mib": gpu_memory_mib()}
        log(line("saturation", sat) + f"; memory {mem['pss_mib']:.0f} MiB PSS in {mem['processes']} processes")
        log("   cores busy while saturated: " + ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_cores_busy"].items()))

        if first:
            sweep = []
            for rate in loads:
                s = workload(driver, poisson(rate, d, tasks, seed=int(rate)), d, cfg, pid)
                sweep.append(s)
                log(line(f"poisson {rate:.0f}", s))
            res["poisson_sweep"] = sweep

        res["matched_uniform"] = {**workload(driver, poisson(matched, d, tasks, seed=7), d, cfg, pid), "mix": "uniform"}
        res["matched_zipf"] = {**workload(driver, poisson(matched, d, tasks, zipf, seed=7), d, cfg, pid), "mix": "zipf"}
        res["bursty"] = {**workload(driver, bursty(matched, d, tasks, zipf, seed=7), d, cfg, pid), "mix": "zipf"}
        replay = read_trace(trace, tasks)
        res["trace"] = {**workload(driver, replay, replay[-1].at + 1e-3, cfg, pid), "requests": len(replay),
                        "rows": sum(a.size for a in replay), "span_s": replay[-1].at}
        for k in ("matched_uniform", "matched_zipf", "bursty", "trace"):
            log(line(k, res[k]))

        fair_tasks = tasks[:3]
        weights = dict(zip(fair_tasks, FAIR_WEIGHTS))
        if set_weights is not None:
            set_weights(weights)
            time.sleep(0.5)
        # Weights only matter with a backlog: far more requests outstanding than
        # the batches in flight can hold.
        recs = driver.closed_loop({t: cfg.concurrency * 4 for t in fair_tasks}, d)
        if set_weights is not None:
            set_weights({t: 1.0 for t in fair_tasks})
        f = summarize(recs, (0.5, d), timeout_s=cfg.timeout)
        served = {t: f["per_task"][t]["rows_per_s"] for t in fair_tasks}  # type: ignore[index]
        res["fairness"] = {"weights": weights, "served_rows_per_s": served, "weights_applied": set_weights is not None,
                           "failed": f["failed"]}
        total = sum(served.values()) or 1.0
        log(f"   fairness 1:2:4 served shares {', '.join(f'{t}={v / total:.2f}' for t, v in served.items())}"
            + (f" -> Jain {jain([served[t] / weights[t] for t in fair_tasks]):.3f}" if set_weights else " (no weights in this deployment: not scored)"))
    finally:
        driver.close()
    if first and cfg.perf_analyzer:
        data = text_input_file(Path(tempfile.mkdtemp(prefix="fmplex-pa-")) / "input.json", [texts[0]])
        pa_models = [target.models[t] for t in (tasks if cfg.pa_all else tasks[:1])]
        res["perf_analyzer"] = perf_analyzer_runs(target.grpc_url, pa_models, data, cfg.concurrency, cfg.pa_interval_ms, target.batch_dim)
        for m, r in res["perf_analyzer"].items():
            log(f"   perf_analyzer {m} c={cfg.concurrency}: " + (f"{r['throughput_rps']:.1f} infer/s, p99 {r['p99_ms']:.0f} ms" if "error" not in r else f"FAILED {r['error'][:200]}"))
        shutil.rmtree(data.parent, ignore_errors=True)
    return res


def start_deployment(name: str, work: Path, names: list[str], cfg: argparse.Namespace,
                     setting: dep.BaselineSetting | None) -> tuple[Any, Target, Callable[[dict[str, float]], None] | None]:
    """A running server for one deployment (in a fresh folder under ``work``)."""
    ports = free_ports()
    work.mkdir(parents=True, exist_ok=True)
    if name == "fmplex":
        repo = dep.fmplex_repo(work, names, device=cfg.device, workers=cfg.fmplex_workers, max_batch_rows=cfg.fmplex_batch_rows)
        proc = serving.start(repo, ports, log_path=work / f"{name}.log")
        return proc, Target(name, f"127.0.0.1:{ports.grpc}", {t: t for t in names}), lambda w: dep.set_weights(repo, w)
    repo = dep.baseline_repo(work, names, name, cfg.device, setting=setting or dep.BaselineSetting())
    proc = dep.start(repo, ports, names, work / f"{name}.log")
    return proc, Target(name, f"127.0.0.1:{ports.grpc}", {t: t for t in names}, batch_dim=True), None


def run_deployment(name: str, work: Path, names: list[str], texts: list[str], cfg: argparse.Namespace, loads: list[float],
                   matched: float, trace: Path, setting: dep.BaselineSetting | None, first: bool) -> dict[str, Any]:
    log(f"== {name}: {len(names)} tasks" + (f", {setting.label}" if setting else ""))
    t0 = time.perf_counter()
    proc, target, weights_fn = start_deployment(name, work, names, cfg, setting)
    up = time.perf_counter() - t0
    log(f"   up in {up:.1f} s")
    try:
        assert proc.proc is not None
        res = measure(name, target, texts, cfg, proc.proc.pid, loads, matched, trace, weights_fn, first)
        res["startup_s"] = up
        if setting is not None:
            res["setting"] = {**dataclasses.asdict(setting), "label": setting.label}
        if name == "partitioned":
            res["partition"] = dep.partition_report(names)
            log(f"   partition: {next(iter(res['partition'].values()))}")
    finally:
        proc.stop()
        if name == "partitioned":
            dep.remove_partitions()
    return res


def tune(name: str, settings: dict[str, dep.BaselineSetting], work: Path, names: list[str], texts: list[str],
         cfg: argparse.Namespace, matched: float) -> dict[str, Any]:
    """Each candidate setting of a baseline at the matched load (uniform mix);
    the best is the lowest p99 counting shed requests (ties: more goodput)."""
    tried: dict[str, Any] = {}
    tasks = list(names)
    for label, setting in settings.items():
        log(f"== tuning {name}: {label} ({setting.label})")
        t0 = time.perf_counter()
        proc, target, _ = start_deployment(name, work / f"tune-{name}-{label}", names, cfg, setting)
        up = time.perf_counter() - t0
        try:
            assert proc.proc is not None
            driver = Driver(target, texts, timeout_s=cfg.timeout)
            try:
                driver.closed_loop({t: 1 for t in tasks}, 2.0)
                s = workload(driver, poisson(matched, cfg.duration, tasks, seed=7), cfg.duration, cfg, proc.proc.pid)
            finally:
                driver.close()
        finally:
            proc.stop()
            if name == "partitioned":
                dep.remove_partitions()
        log(line(label, s) + f" (up in {up:.0f} s)")
        tried[label] = {"setting": {**dataclasses.asdict(setting), "label": setting.label}, "matched_uniform": s, "startup_s": up}
    chosen = pick_best({k: v["matched_uniform"] for k, v in tried.items()}, "p99_ms")
    log(f"   {name}: best setting {chosen}")
    return {"tried": tried, "chosen": chosen,
            "picked_by": f"lowest p99 counting shed requests (ties: more goodput), open-loop Poisson at {matched:.0f} req/s, uniform mix"}

# --- output ----------------------------------------------------------------------------


def write_outputs(full: dict[str, Any], results: Path) -> dict[str, Any]:
    summary = build_summary(full)
    write_results("summary.json", summary, results)
    write_results("baselines_bench.json", full, results)
    (results / "summary.md").write_text(render_markdown(summary))
    log(f"== written {results / 'summary.md'}")
    plots(full, results)
    return summary


def plots(full: dict[str, Any], results: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    first = full["runs"][0]["deployments"] if full["runs"] else {}
    for d in DEPLOYMENTS:
        sweep = first.get(d, {}).get("poisson_sweep")
        if not sweep:
            continue
        x = [s["offered_rps"] for s in sweep]
        ax[0].plot(x, [s["p50_ms"] for s in sweep], "o-", label=d)
        ax[1].plot(x, [s["p99_ms"] for s in sweep], "o-", label=d)
        ax[2].plot(x, [100 * s["shed_share"] for s in sweep], "o-", label=d)
    for a, t in zip(ax, ("p50 latency (ms)", "p99 latency (ms), shed = timeout", "shed / failed share (%)")):
        a.set_xlabel("offered load (requests/s, Poisson, uniform mix)")
        a.set_ylabel(t)
        if "latency" in t:
            a.set_yscale("log")
        else:
            a.set_ylim(0, 100)
        if full["runs"]:
            a.axvline(full["runs"][0]["raw_limit_rps"], color="grey", ls=":", label="raw forward limit")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"latency vs load, {full['tasks']} tasks ({full['machine']['device']}, {full['machine']['cpus']} cores; "
                 f"a shed request counts as the {full['timeout_ms'] / 1e3:g} s timeout)")
    fig.tight_layout()
    fig.savefig(results / "latency_vs_load.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for d in ("fmplex", "isolated"):
        curve = full["budget"].get(d, {}).get("curve")
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label=d)
    if full["budget"].get("budget_mib"):
        ax.axhline(full["budget"]["budget_mib"], color="grey", ls=":", label="budget")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("tasks deployed (kind mix), measured")
    ax.set_ylabel("server memory, MiB PSS (every server + stubs)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results / "memory_vs_tasks.png", dpi=110)
    plt.close(fig)
    log(f"== written {results / 'latency_vs_load.png'}, {results / 'memory_vs_tasks.png'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, shorter runs, 1 GiB budget (says so in the summary)")
    ap.add_argument("--repetitions", type=int, help="repetitions of every deployment, order rotated each time (default 3; quick 1)")
    ap.add_argument("--tasks", type=int, help="tasks per deployment (default 8; quick 4)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:n] on a GPU machine")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 8; quick 3)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight per task")
    ap.add_argument("--saturation-clients", type=int, default=192,
                    help="closed-loop clients in all while saturated, split over the tasks (at least --concurrency each; "
                         "default 192: enough rows for two workers to run 64-row batches with more waiting, for every deployment)")
    ap.add_argument("--loads", help="comma-separated offered loads as fractions of the raw limit (default 0.15,0.3,0.45,0.6,0.75)")
    ap.add_argument("--matched", type=float, default=0.45, help="matched offered load for the summary, fraction of the raw limit")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="client timeout per request, s; a shed or failed request counts as this in the percentiles")
    ap.add_argument("--slo-ms", type=float, default=500.0, help="latency objective for goodput (answers within it per second)")
    ap.add_argument("--tune", choices=("all", "none"), default="all",
                    help="try each baseline setting first and keep the best (none: 1 instance x 1 thread, batch 16)")
    ap.add_argument("--max-instances", type=int, help="cap on the isolated baseline's instances per task (default: the cores)")
    ap.add_argument("--partition-batches", default="4,16,64", help="the partitioned baseline's batch sizes to try")
    ap.add_argument("--budget-gib", type=float, help="memory budget for tasks_in_budget (default 8; quick 1)")
    ap.add_argument("--budget-wall-s", type=float, help="wall-clock limit of fmplex's budget run, s (default 600; quick 90)")
    ap.add_argument("--budget-isolated-wall-s", type=float,
                    help="wall-clock limit of the isolated budget run, s (default 1200; quick 300): long enough to reach the budget")
    ap.add_argument("--trace", type=Path, help="replay this trace (timestamp_s,task,size) instead of a generated one")
    ap.add_argument("--only", help="comma-separated subset of deployments")
    ap.add_argument("--fmplex-workers", default="auto", help="the fmplex host's workers (default auto: one per core)")
    ap.add_argument("--fmplex-batch-rows", type=int, help="the fmplex host's max_batch_rows (default: fmplex's default, 16)")
    ap.add_argument("--skip-budget", action="store_true", help="skip the tasks-in-budget measurement")
    ap.add_argument("--budget-from", type=Path, default=None, metavar="JSON",
                    help="take tasks_in_budget from an earlier run's baselines_bench.json (a --budget-only run: the budget "
                         "measurement alone takes ~30 min) instead of measuring it; the summary names that run")  # fmt: skip
    ap.add_argument("--budget-only", action="store_true", help="only the tasks-in-budget measurement (use with --results DIR)")
    ap.add_argument("--no-perf-analyzer", dest="perf_analyzer", action="store_false", help="skip the perf_analyzer cross-check")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the results go (default perf/results)")
    cfg = ap.parse_args()
    cfg.tasks = cfg.tasks or (4 if cfg.quick else 8)
    if cfg.tasks < 3:
        ap.error("--tasks must be >= 3 (the fairness run uses three tasks)")
    reps = cfg.repetitions or (1 if cfg.quick else 3)
    cfg.duration = cfg.duration or (3.0 if cfg.quick else 8.0)
    cfg.pa_all = not cfg.quick
    cfg.pa_interval_ms = 1500 if cfg.quick else 2500
    budget_mib = (cfg.budget_gib or (1.0 if cfg.quick else 8.0)) * 1024
    budget_wall = cfg.budget_wall_s or (90.0 if cfg.quick else 600.0)
    budget_iso_wall = cfg.budget_isolated_wall_s or (300.0 if cfg.quick else 1200.0)
    fractions = [float(x) for x in (cfg.loads or ("0.2,0.45,0.7" if cfg.quick else "0.15,0.3,0.45,0.6,0.75")).split(",")]
    only = [] if cfg.budget_only else [d for d in (cfg.only.split(",") if cfg.only else DEPLOYMENTS)]
    unknown = set(only) - set(DEPLOYMENTS)
    if unknown:
        ap.error(f"unknown deployment(s) {', '.join(sorted(unknown))} (known: {', '.join(DEPLOYMENTS)})")
    results: Path = cfg.results
    results.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    texts = sentences()
    names = dep.task_names(cfg.tasks)
    zipf = [1.0 / (i + 1) for i in range(cfg.tasks)]
    if cfg.budget_only:
        reps, raw0, loads, matched, trace = 0, {}, [], float("nan"), Path()
    else:
        log(f"== {reps} repetition(s)" + (" (QUICK run: 1 repetition, no spread; make bench without QUICK for the median of 3)" if reps == 1 else ""))
        log("== raw batched forward (this process, 1 torch thread)")
        raw0 = raw_limit(texts, 2.0 if cfg.quick else 5.0, cfg.device)
        raw_rps = max(raw0.values())
        log("   " + ", ".join(f"{k} {v:.1f}" for k, v in raw0.items()) + " sentences/s")
        loads = [round(f * raw_rps, 1) for f in fractions]
        matched = round(cfg.matched * raw_rps, 1)
        trace = cfg.trace or write_trace(results / "baselines_trace.csv", [
            a.__class__(a.at, a.task, 1 + (i % 7 == 0) * 3) for i, a in enumerate(bursty(matched * 0.8, cfg.duration, names, zipf, seed=11))
        ])
    work = Path(tempfile.mkdtemp(prefix="fmplex-baselines-"))
    cores = len(os.sched_getaffinity(0))
    full: dict[str, Any] = {"machine": machine(cfg.device), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "tasks": cfg.tasks,
                            "quick": cfg.quick, "repetitions": reps, "duration_s": cfg.duration, "loads_rps": loads,
                            "matched_load_rps": matched, "timeout_ms": cfg.timeout * 1e3, "slo_ms": cfg.slo_ms,
                            "baseline_settings": {}, "runs": [], "budget": {}}
    chosen: dict[str, dep.BaselineSetting | None] = {"fmplex": None}
    try:
        candidates = {"isolated": dep.isolated_settings(min(cores, cfg.max_instances or cores)),
                      "partitioned": dep.partitioned_settings(tuple(int(b) for b in cfg.partition_batches.split(",")))}
        for b in ("isolated", "partitioned"):
            if b not in only:
                continue
            cands = candidates[b] if cfg.tune == "all" else {"1x1" if b == "isolated" else "batch16": dep.BaselineSetting()}
            if len(cands) > 1:
                full["baseline_settings"][b] = tune(b, cands, work, names, texts, cfg, matched)
                chosen[b] = cands[full["baseline_settings"][b]["chosen"]]
            else:
                label, setting = next(iter(cands.items()))
                full["baseline_settings"][b] = {"tried": {}, "chosen": label, "picked_by": "not tuned (--tune none)"}
                chosen[b] = setting
        for r, order in enumerate(rotations(only, reps)):
            log(f"== repetition {r + 1}/{reps}: {' > '.join(order)}")
            raw = raw0 if r == 0 else raw_limit(texts, 2.0 if cfg.quick else 5.0, cfg.device)
            if r:
                log("   raw: " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items()) + " sentences/s")
            run: dict[str, Any] = {"repetition": r + 1, "order": order, "raw": raw, "raw_limit_rps": max(raw.values()), "deployments": {}}
            for d in order:
                run["deployments"][d] = run_deployment(d, work / f"{d}-r{r + 1}", names, texts, cfg, loads, matched, trace,
                                                       chosen.get(d), first=(r == 0))
            full["runs"].append(run)
        if cfg.budget_from is not None:
            earlier = json.loads(cfg.budget_from.read_text(encoding="utf-8"))
            full["budget"] = {**earlier["budget"], "source": f"{cfg.budget_from} ({earlier.get('when', 'undated')})"}
        elif cfg.skip_budget:
            full["budget"] = {"skipped": True}
        else:
            log(f"== tasks in a {budget_mib / 1024:g} GiB budget (measured; wall-clock limit fmplex {budget_wall:.0f} s, isolated {budget_iso_wall:.0f} s)")
            kinds = budget.kind_sources(work / "kinds", log)
            full["budget"] = {"budget_mib": budget_mib, "wall_limit_s": {"fmplex": budget_wall, "isolated": budget_iso_wall},
                              "isolated": budget.budget_isolated(work, kinds, budget_mib, budget_iso_wall, limit=64, log=log),
                              "fmplex": budget.budget_fmplex(work, kinds, budget_mib, budget_wall, step=64 if cfg.quick else 256, log=log)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dep.remove_partitions()
    full["seconds"] = time.perf_counter() - t_start
    summary = write_outputs(full, results)
    log(f"== done in {full['seconds'] / 60:.1f} min: " + json.dumps(summary["ratios"]))
    for k, t in summary["targets"].items():
        log(f"   {k}: {t['value']} {t['target']} -> {'not measured' if t['met'] is None else ('met' if t['met'] else 'MISSED')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
