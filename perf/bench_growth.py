"""Saturation throughput of the MiniLM host with fixed batches and with batch growth, side by side.

The host keeps batches at ``max_batch_rows`` (16) while a light task may be
waiting and lets them grow to ``saturated_batch_rows`` (64) when none is
(docs/runtime.md, "Batch growth under saturation"). This measures what that
buys and what it costs, in one run on one machine:

- ``raw``: the bare batched forward in this process (perf/bench_baselines.py's
  ``raw_limit``), the physical limit;
- ``fixed``: fmplex with ``saturated_batch_rows 0`` (growth off: every batch
  at most 16 rows, the behaviour before growth was on by default);
- ``growth``: fmplex with the default settings;

each saturated by ``--concurrency`` closed-loop clients per task, and each
also with one light closed-loop client on a task of its own beside a flood
(``--flood`` clients) on another (the overload case growth must not worsen: the light task's p99
and the rows per batch). Repetitions rotate the order; medians with their
spread. Every sent request counts (a failed one counts as the timeout).

Writes perf/results/growth_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmplex.control import serving  # noqa: E402
from fmplex.control.server import free_ports  # noqa: E402
from perf import deployments as dep  # noqa: E402
from perf.bench_baselines import raw_limit, sentences  # noqa: E402
from perf.common import write_results  # noqa: E402
from perf.load import Driver, Target, rotations, summarize  # noqa: E402

SETTINGS = {"fixed": 0, "growth": None}  # saturated_batch_rows (None: the default)


def log(msg: str) -> None:
    print(msg, flush=True)


def batch_sizes(metrics_url: str) -> dict[int, float]:
    """Batches by rows, from the host's ``fmplex_batch_size_total{rows}``."""
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    out: dict[int, float] = {}
    for line in text.splitlines():
        if line.startswith("fmplex_batch_size_total{"):
            head, value = line.rsplit(" ", 1)
            rows = int(head.split('rows="', 1)[1].split('"', 1)[0])
            out[rows] = out.get(rows, 0.0) + float(value)
    return out


def delta(after: dict[int, float], before: dict[int, float]) -> dict[int, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def mean_rows(sizes: dict[int, float]) -> float:
    n = sum(sizes.values())
    return sum(k * v for k, v in sizes.items()) / n if n else float("nan")


def run_setting(label: str, saturated: int | None, work: Path, names: list[str], texts: list[str], cfg: argparse.Namespace) -> dict[str, Any]:
    repo = dep.fmplex_repo(work / label, names)
    if saturated is not None:
        config = repo / "fm.minilm" / "config.pbtxt"
        text = config.read_text()
        key = 'key: "saturated_batch_rows" value { string_value: "'
        assert key in text, "the host config has no saturated_batch_rows parameter"
        head, tail = text.split(key, 1)
        config.write_text(head + key + str(saturated) + tail[tail.index('"'):])
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / f"{label}.log")
    metrics = f"http://127.0.0.1:{ports.metrics}/metrics"
    driver = Driver(Target(label, f"127.0.0.1:{ports.grpc}", {t: t for t in names}), texts, timeout_s=cfg.timeout)
    d = cfg.duration
    try:
        driver.closed_loop({t: 1 for t in names}, 2.0)  # warm-up
        b0 = batch_sizes(metrics)
        recs = driver.closed_loop({t: cfg.concurrency for t in names}, d)
        sat = summarize(recs, (0.5, d), timeout_s=cfg.timeout)
        sat["batch_rows"] = delta(batch_sizes(metrics), b0)
        sat["mean_batch_rows"] = mean_rows(sat["batch_rows"])
        # Overload: a flood on one task, one light client on another.
        light, flood = names[0], names[1]
        b0 = batch_sizes(metrics)
        recs = driver.closed_loop({flood: cfg.flood, light: 1}, d)
        over = {"light": summarize([r for r in recs if r.task == light], (0.5, d), timeout_s=cfg.timeout),
                "flood": summarize([r for r in recs if r.task == flood], (0.5, d), timeout_s=cfg.timeout)}
        over["batch_rows"] = delta(batch_sizes(metrics), b0)
        over["mean_batch_rows"] = mean_rows(over["batch_rows"])
    finally:
        driver.close()
        proc.stop()
    return {"saturation": sat, "overload": over}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (1 repetition, 4 s)")
    ap.add_argument("--repetitions", type=int, help="repetitions (default 3; quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per workload (default 8; quick 4)")
    ap.add_argument("--tasks", type=int, default=4, help="classifier tasks (default 4)")
    ap.add_argument("--concurrency", type=int, default=48,
                    help="closed-loop clients per task while saturated (default 48: with 4 tasks, enough rows for two "
                         "workers to run 64-row batches and find another 64 waiting)")
    ap.add_argument("--flood", type=int, default=320, help="closed-loop clients of the flooding task in the overload case (default 320)")
    ap.add_argument("--timeout", type=float, default=30.0, help="client deadline, s: a failed request counts as this")
    ap.add_argument("--results", type=Path, default=None, help="results folder (default perf/results)")
    cfg = ap.parse_args()
    reps = cfg.repetitions or (1 if cfg.quick else 3)
    cfg.duration = cfg.duration or (4.0 if cfg.quick else 8.0)
    texts = sentences()
    names = dep.task_names(cfg.tasks)
    work = Path(tempfile.mkdtemp(prefix="fmplex-growth-"))
    runs: list[dict[str, Any]] = []
    for r, order in enumerate(rotations(list(SETTINGS), reps)):
        log(f"== repetition {r + 1}/{reps}: {' > '.join(order)}")
        raw = raw_limit(texts, 2.0 if cfg.quick else 4.0, "cpu")
        run: dict[str, Any] = {"raw": raw, "raw_limit_rps": max(raw.values())}
        log("   raw: " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items()) + " sentences/s")
        for label in order:
            res = run_setting(label, SETTINGS[label], work / f"r{r + 1}", names, texts, cfg)
            sat, over = res["saturation"], res["overload"]
            res["saturation_over_raw"] = sat["throughput_rps"] / run["raw_limit_rps"]
            run[label] = res
            log(f"   {label}: saturated {sat['throughput_rps']:.1f}/s = {res['saturation_over_raw']:.2f}x raw, "
                f"p99 {sat['p99_ms']:.0f} ms, failed {sat['shed_share']:.1%}, mean batch {sat['mean_batch_rows']:.1f} rows; "
                f"overload: light p99 {over['light']['p99_ms']:.0f} ms, mean batch {over['mean_batch_rows']:.1f} rows")
        runs.append(run)
    summary = {}
    for label in SETTINGS:
        summary[label] = {
            "saturation_over_raw": spread([r[label]["saturation_over_raw"] for r in runs]),
            "saturation_rps": spread([r[label]["saturation"]["throughput_rps"] for r in runs]),
            "saturation_p99_ms": spread([r[label]["saturation"]["p99_ms"] for r in runs]),
            "saturation_mean_batch_rows": spread([r[label]["saturation"]["mean_batch_rows"] for r in runs]),
            "overload_light_p99_ms": spread([r[label]["overload"]["light"]["p99_ms"] for r in runs]),
            "overload_mean_batch_rows": spread([r[label]["overload"]["mean_batch_rows"] for r in runs]),
        }
    summary["growth_over_fixed"] = spread([r["growth"]["saturation"]["throughput_rps"] / r["fixed"]["saturation"]["throughput_rps"] for r in runs])
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "repetitions": reps, "duration_s": cfg.duration, "tasks": cfg.tasks,
           "concurrency": cfg.concurrency, "flood": cfg.flood, "summary": summary, "runs": runs}
    path = write_results("growth_bench.json", out, cfg.results) if cfg.results else write_results("growth_bench.json", out)
    log(f"== medians of {reps} (min..max):")
    for label in SETTINGS:
        s = summary[label]
        log(f"   {label:6s} saturated {s['saturation_over_raw']['median']:.2f}x raw "
            f"({s['saturation_over_raw']['min']:.2f}..{s['saturation_over_raw']['max']:.2f}), "
            f"mean batch {s['saturation_mean_batch_rows']['median']:.1f} rows; overload light p99 "
            f"{s['overload_light_p99_ms']['median']:.0f} ms, mean batch {s['overload_mean_batch_rows']['median']:.1f} rows")
    g = summary["growth_over_fixed"]
    log(f"   growth / fixed saturation throughput: {g['median']:.2f}x ({g['min']:.2f}..{g['max']:.2f}); written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
