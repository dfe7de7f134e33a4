"""From the baseline benchmark's raw measurements to summary.json and summary.md.

Pure (no clock, no server, no plotting) so the arithmetic a reader relies on
is unit tested: medians over repetitions with their min and max, the best
baseline setting, the served shares and where a fairness score applies, and
whether each headline target is met.

``full`` (``baselines_bench.json``) holds every repetition; the summary keeps
the median of each figure and its ``[min, max]`` range.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from perf.load import jain, spread

DEPLOYMENTS = ("fmplex", "isolated", "partitioned")
WORKLOADS = ("saturation", "matched_uniform", "matched_zipf", "bursty", "trace")
FIELDS = ("offered_rps", "throughput_rps", "goodput_rps", "shed_share", "p50_ms", "p90_ms", "p99_ms", "memory_mib")
WORKLOAD_TITLES = {
    "saturation": "saturation (closed loop, every task, `--saturation-clients` requests in flight in all, split evenly)",
    "matched_uniform": "matched load, uniform mix (open-loop Poisson, every task the same share) - headline",
    "matched_zipf": "matched load, zipf mix (open-loop Poisson, task i gets weight 1/(i+1))",
    "bursty": "bursty (Markov-modulated Poisson, same mean rate as matched, zipf mix)",
    "trace": "trace replay (perf/results/baselines_trace.csv)",
}
NO_WEIGHTS = ("no per-task weights exist in this deployment (each task is its own Triton model with its own "
              "queue; Triton has no cross-model weighting), so a Jain score against weights it was never given "
              "would measure nothing it was asked to do; the served shares are shown instead")
TARGETS = {
    "throughput_vs_raw": ">= 0.9 (fmplex saturation throughput / raw batched forward limit)",
    "p99_uniform_vs_best_isolated": "<= 0.5 (fmplex / best isolated setting, p99 counting shed, matched load, uniform mix)",
    "p99_uniform_vs_best_partitioned": "<= 0.2 (fmplex / best partitioned setting, same)",
    "jain": ">= 0.95 (fmplex, weights 1:2:4, saturated)",
    "tasks_in_budget_vs_isolated": ">= 100 (measured tasks in the memory budget, fmplex / isolated, kind mix)",
}


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def aggregate(runs: Sequence[dict[str, Any]], deployment: str, workload: str) -> dict[str, Any]:
    """One deployment's workload over the repetitions: each field's median,
    and ``range`` [min, max]; ``repetitions`` says how many runs had it."""
    got = [r["deployments"][deployment][workload] for r in runs if workload in r.get("deployments", {}).get(deployment, {})]
    out: dict[str, Any] = {"repetitions": len(got), "range": {}}
    for f in FIELDS:
        s = spread([float(g.get(f, float("nan"))) if g.get(f) is not None else float("nan") for g in got])
        out[f] = s["median"]
        out["range"][f] = [s["min"], s["max"]]
    out["failed"] = sum(int(g.get("failed", 0)) for g in got)
    out["sent"] = sum(int(g.get("sent", 0)) for g in got)
    return out


def fairness(runs: Sequence[dict[str, Any]], deployment: str) -> dict[str, Any]:
    """Served shares (median over repetitions) for every deployment; Jain's
    index of served rows / weight only where the weights were applied."""
    got = [r["deployments"][deployment]["fairness"] for r in runs if "fairness" in r.get("deployments", {}).get(deployment, {})]
    if not got:
        return {}
    tasks = list(got[0]["served_rows_per_s"])
    shares = {t: spread([g["served_rows_per_s"][t] / max(sum(g["served_rows_per_s"].values()), 1e-9) for g in got])["median"] for t in tasks}
    applied = all(g.get("weights_applied") for g in got)
    out: dict[str, Any] = {"weights": got[0]["weights"], "weights_applied": applied, "served_share": shares}
    if applied:
        j = spread([jain([g["served_rows_per_s"][t] / g["weights"][t] for t in tasks]) for g in got])
        out["jain"], out["jain_range"] = j["median"], [j["min"], j["max"]]
    else:
        out["jain"], out["note"] = None, NO_WEIGHTS
    return out


def tasks_in_budget(budget: dict[str, Any]) -> dict[str, Any]:
    """Measured counts only; a count cut short by the wall-clock limit is a lower bound."""
    f, i = budget.get("fmplex", {}), budget.get("isolated", {})
    out = {
        "measured": True,
        "budget_mib": budget.get("budget_mib"),
        "fmplex": f.get("tasks"),
        "fmplex_lower_bound": not f.get("budget_reached", False),
        "fmplex_mix": f.get("mix", {}),
        "fmplex_hosts": f.get("hosts"),
        "fmplex_stopped_by": f.get("stopped_by"),
        "isolated": i.get("tasks"),
        "isolated_lower_bound": not i.get("budget_reached", False),
        "isolated_mix": i.get("mix", {}),
        "isolated_stopped_by": i.get("stopped_by"),
        "wall_limit_s": budget.get("wall_limit_s"),
    }
    if budget.get("source"):
        out["source"] = budget["source"]  # measured in another run (--budget-from)
    if budget.get("skipped"):
        out = {"measured": False, "skipped": True}
    return out


def verdicts(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each headline target: its value, the bound, met or not (None: not measured)."""
    r = summary["ratios"]
    tib = summary["tasks_in_budget"]
    jain_f = (summary["fairness"].get("fmplex") or {}).get("jain")

    def v(value: float | None, ok: bool | None, **extra: Any) -> dict[str, Any]:
        bad = value is None or (isinstance(value, float) and math.isnan(value))
        return {"value": value, "met": None if bad else ok, **extra}

    tasks_ratio = r.get("tasks_fmplex_vs_isolated")
    tasks_met = None
    if tasks_ratio is not None and not math.isnan(tasks_ratio) and not tib.get("isolated_lower_bound"):
        # fmplex's count may be a lower bound (clock): clearing the bar with it is met; falling short with
        # a lower bound settles nothing (None); an isolated count cut short would overstate the ratio (None)
        tasks_met = True if tasks_ratio >= 100 else (None if tib.get("fmplex_lower_bound") else False)
    return {
        "throughput_vs_raw": v(r["fmplex_vs_raw"], r["fmplex_vs_raw"] >= 0.9, target=TARGETS["throughput_vs_raw"]),
        "p99_uniform_vs_best_isolated": v(r["p99_uniform_fmplex_vs_isolated"], r["p99_uniform_fmplex_vs_isolated"] <= 0.5,
                                          target=TARGETS["p99_uniform_vs_best_isolated"]),
        "p99_uniform_vs_best_partitioned": v(r["p99_uniform_fmplex_vs_partitioned"], r["p99_uniform_fmplex_vs_partitioned"] <= 0.2,
                                             target=TARGETS["p99_uniform_vs_best_partitioned"]),
        "jain": v(jain_f, jain_f is not None and jain_f >= 0.95, target=TARGETS["jain"]),
        "tasks_in_budget_vs_isolated": v(tasks_ratio, tasks_met, target=TARGETS["tasks_in_budget_vs_isolated"],
                                         lower_bound=bool(tib.get("fmplex_lower_bound"))),
    }


def causes(summary: dict[str, Any], full: dict[str, Any]) -> dict[str, str]:
    """For each missed target, the measured figures that explain it (no guesses)."""
    out: dict[str, str] = {}
    vd = summary["targets"]
    w = summary["workloads"]
    if vd["throughput_vs_raw"]["met"] is False:
        busy = [r["deployments"]["fmplex"].get("cpu_cores_busy", {}) for r in full["runs"] if "fmplex" in r["deployments"]]
        parts = {k: spread([b.get(k, float("nan")) for b in busy])["median"] for k in ("models", "triton_frontend", "client")}
        out["throughput_vs_raw"] = (
            f"while saturated, cores busy (median): host processes {parts['models']:.2f}, Triton front end "
            f"{parts['triton_frontend']:.2f}, benchmark client {parts['client']:.2f} of {full['machine']['cpus']}; the raw limit "
            "runs the forward with no server, no client and no other work on the cores")
    def cores(d: str) -> float:
        return spread([r["deployments"][d].get("cpu_cores_busy", {}).get("models", float("nan")) for r in full["runs"] if d in r["deployments"]])["median"]

    for key, other in (("p99_uniform_vs_best_isolated", "isolated"), ("p99_uniform_vs_best_partitioned", "partitioned")):
        if vd[key]["met"] is False:
            f, o = w["matched_uniform"].get("fmplex", {}), w["matched_uniform"].get(other, {})
            out[key] = (
                f"cores the model processes got while saturated (median): fmplex {cores('fmplex'):.2f}, {other} {cores(other):.2f} of "
                f"{full['machine']['cpus']}; "
                f"uniform mix at {summary['matched_load_rps']:.0f} req/s: fmplex p50 {f.get('p50_ms', float('nan')):.0f} ms, "
                f"p99 {f.get('p99_ms', float('nan')):.0f} ms, shed {100 * f.get('shed_share', 0):.1f}%; {other} p50 "
                f"{o.get('p50_ms', float('nan')):.0f} ms, p99 {o.get('p99_ms', float('nan')):.0f} ms, shed "
                f"{100 * o.get('shed_share', 0):.1f}%")
    if vd["jain"]["met"] is False:
        out["jain"] = f"fmplex served shares {summary['fairness']['fmplex'].get('served_share')} for weights 1:2:4"
    if vd["tasks_in_budget_vs_isolated"]["met"] is not True and not summary["tasks_in_budget"].get("skipped"):
        tib = summary["tasks_in_budget"]
        out["tasks_in_budget_vs_isolated"] = (
            f"fmplex {tib['fmplex']} tasks ({'lower bound: stopped by ' + str(tib['fmplex_stopped_by']) if tib['fmplex_lower_bound'] else 'budget reached'}), "
            f"isolated {tib['isolated']}")
    return out


def build_summary(full: dict[str, Any]) -> dict[str, Any]:
    runs = full["runs"]
    deployments = [d for d in DEPLOYMENTS if any(d in r["deployments"] for r in runs)]
    workloads = {w: {d: aggregate(runs, d, w) for d in deployments} for w in WORKLOADS}
    raw = spread([r["raw_limit_rps"] for r in runs])
    fair = {d: fairness(runs, d) for d in deployments}
    tib = tasks_in_budget(full["budget"])

    def med(w: str, d: str, f: str) -> float | None:
        return workloads[w].get(d, {}).get(f)

    summary: dict[str, Any] = {
        "when": full["when"],
        "quick": full["quick"],
        "repetitions": {"count": len(runs), "orders": [r["order"] for r in runs],
                        "note": "each figure is the median of the repetitions, range = [min, max]"
                        + ("; QUICK run: 1 repetition, no spread" if len(runs) == 1 else "")},
        "machine": full["machine"],
        "tasks": full["tasks"],
        "matched_load_rps": full["matched_load_rps"],
        "timeout_ms": full["timeout_ms"],
        "slo_ms": full["slo_ms"],
        "raw_limit_rps": raw["median"],
        "raw_limit_range": [raw["min"], raw["max"]],
        "workloads": workloads,
        "fairness": fair,
        "baseline_settings": {k: {"tried": {n: {"setting": s["setting"], **{f: s["matched_uniform"].get(f) for f in FIELDS}}
                                            for n, s in v["tried"].items()},
                                  "chosen": v["chosen"], "picked_by": v["picked_by"]}
                              for k, v in full.get("baseline_settings", {}).items()},
        "tasks_in_budget": tib,
        "seconds": full.get("seconds"),
    }
    tasks_ratio = float("nan")
    if tib.get("measured") and tib.get("isolated"):
        tasks_ratio = _ratio(tib.get("fmplex"), tib.get("isolated"))
    summary["ratios"] = {
        "fmplex_vs_raw": _ratio(med("saturation", "fmplex", "throughput_rps"), raw["median"]),
        "p99_uniform_fmplex_vs_isolated": _ratio(med("matched_uniform", "fmplex", "p99_ms"), med("matched_uniform", "isolated", "p99_ms")),
        "p99_uniform_fmplex_vs_partitioned": _ratio(med("matched_uniform", "fmplex", "p99_ms"), med("matched_uniform", "partitioned", "p99_ms")),
        "p99_zipf_fmplex_vs_isolated": _ratio(med("matched_zipf", "fmplex", "p99_ms"), med("matched_zipf", "isolated", "p99_ms")),
        "p99_zipf_fmplex_vs_partitioned": _ratio(med("matched_zipf", "fmplex", "p99_ms"), med("matched_zipf", "partitioned", "p99_ms")),
        "throughput_fmplex_vs_isolated": _ratio(med("saturation", "fmplex", "throughput_rps"), med("saturation", "isolated", "throughput_rps")),
        "tasks_fmplex_vs_isolated": tasks_ratio,
        "tasks_ratio_is_lower_bound": bool(tib.get("fmplex_lower_bound")),
    }
    summary["targets"] = verdicts(summary)
    summary["causes"] = causes(summary, full)
    return summary


def _walls(w: Any) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in w.items()) if isinstance(w, dict) else f"{w:.0f} s"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _cell(agg: dict[str, Any], f: str, spec: str, scale: float = 1.0) -> str:
    v = agg.get(f)
    lo, hi = agg.get("range", {}).get(f, [None, None])
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if agg.get("repetitions", 1) > 1 and lo is not None and not math.isnan(lo) and (lo != hi):
        return f"{format(v * scale, spec)} ({format(lo * scale, spec)}-{format(hi * scale, spec)})"
    return format(v * scale, spec)


def render_markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    reps = summary["repetitions"]["count"]
    md = [
        f"# fmplex vs baselines ({summary['when']}{', QUICK run' if summary['quick'] else ''})", "",
        f"Machine: {m['cpus']} x {m['cpu']}, device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; {summary['tasks']} tasks; matched offered load {summary['matched_load_rps']:.0f} req/s; "
        f"client timeout {summary['timeout_ms'] / 1e3:g} s, SLO {summary['slo_ms']:g} ms.",
        "",
        f"Repetitions: **{reps}** ({summary['repetitions']['note']}); deployment order per repetition: "
        + "; ".join(" > ".join(o) for o in summary["repetitions"]["orders"]) + ".",
        "",
        "Latency percentiles count every sent request: a shed or failed request counts as the client timeout. "
        "Goodput = answers within the SLO per second. Baselines run with their best setting (below).",
        "",
    ]
    for w in WORKLOADS:
        per = summary["workloads"][w]
        if not per:
            continue
        md += [f"## {WORKLOAD_TITLES[w]}", "",
               "| deployment | offered req/s | throughput req/s | goodput req/s | shed | p50 ms | p90 ms | p99 ms | memory MiB (PSS) |",
               "|---|---|---|---|---|---|---|---|---|"]
        for d, a in per.items():
            md.append(f"| {d} | {_cell(a, 'offered_rps', '.1f')} | {_cell(a, 'throughput_rps', '.1f')} | {_cell(a, 'goodput_rps', '.1f')} | "
                      f"{_cell(a, 'shed_share', '.1f', 100)}% | {_cell(a, 'p50_ms', '.0f')} | {_cell(a, 'p90_ms', '.0f')} | "
                      f"{_cell(a, 'p99_ms', '.0f')} | {_cell(a, 'memory_mib', '.0f')} |")
        md.append("")
    md += ["## fairness (weights 1:2:4 on three tasks, saturated with a backlog)", "",
           "| deployment | weights applied | served shares | Jain (served / weight) |", "|---|---|---|---|"]
    for d, f in summary["fairness"].items():
        if not f:
            continue
        shares = ", ".join(f"{t} {100 * s:.0f}%" for t, s in f["served_share"].items())
        md.append(f"| {d} | {'yes' if f['weights_applied'] else 'no'} | {shares} | "
                  + (_fmt(f["jain"], ".3f") if f["weights_applied"] else "not scored (see note)") + " |")
    if any(f and not f["weights_applied"] for f in summary["fairness"].values()):
        md += ["", f"Note: {NO_WEIGHTS}."]
    md += ["", "## baseline settings (each tried at the matched load, uniform mix; best = lowest p99 counting shed)", "",
           "| baseline | setting | p50 ms | p99 ms | shed | goodput req/s | chosen |", "|---|---|---|---|---|---|---|"]
    for b, s in summary["baseline_settings"].items():
        for n, t in s["tried"].items():
            md.append(f"| {b} | {n} | {_fmt(t['p50_ms'], '.0f')} | {_fmt(t['p99_ms'], '.0f')} | {_fmt(100 * t['shed_share'], '.1f')}% | "
                      f"{_fmt(t['goodput_rps'], '.1f')} | {'**yes**' if n == s['chosen'] else ''} |")
    tib = summary["tasks_in_budget"]
    md += ["", "## tasks in the memory budget (measured)", ""]
    if tib.get("skipped"):
        md.append("Skipped (--skip-budget).")
    else:
        mix = ", ".join(f"{k} {v}" for k, v in (tib.get("fmplex_mix") or {}).items())
        if tib.get("source"):
            md.append(f"- measured in a separate run: {tib['source']}")
        md += [f"- budget {tib['budget_mib'] / 1024:g} GiB (PSS of every server process), wall-clock limits {_walls(tib['wall_limit_s'])}",
               f"- fmplex: **{'>= ' if tib['fmplex_lower_bound'] else ''}{tib['fmplex']}** tasks on {tib['fmplex_hosts']} host(s) "
               f"({mix}); stopped by {tib['fmplex_stopped_by']}",
               f"- isolated: **{'>= ' if tib['isolated_lower_bound'] else ''}{tib['isolated']}** tasks "
               f"({', '.join(f'{k} {v}' for k, v in (tib.get('isolated_mix') or {}).items())}); stopped by {tib['isolated_stopped_by']}"]
    r = summary["ratios"]
    md += ["", "## headline targets (uniform mix; zipf beside it)", "",
           f"- raw batched forward limit: {_fmt(summary['raw_limit_rps'], '.1f')} sentences/s "
           f"(range {_fmt(summary['raw_limit_range'][0], '.1f')}-{_fmt(summary['raw_limit_range'][1], '.1f')})",
           f"- p99 zipf mix: fmplex / isolated {_fmt(r['p99_zipf_fmplex_vs_isolated'], '.2f')}, "
           f"fmplex / partitioned {_fmt(r['p99_zipf_fmplex_vs_partitioned'], '.2f')}", "",
           "| target | bound | value | met |", "|---|---|---|---|"]
    for k, t in summary["targets"].items():
        val = _fmt(t["value"], ".3f" if isinstance(t["value"], float) else "")
        if t.get("lower_bound"):
            val = f">= {val}"
        md.append(f"| {k} | {t['target']} | {val} | {'not settled' if t['met'] is None else ('met' if t['met'] else '**missed**')} |")
    if summary["causes"]:
        md += ["", "Measured causes of the misses (and of what is not settled):", ""]
        md += [f"- {k}: {c}" for k, c in summary["causes"].items()]
    md += ["", "Plots: [latency vs load](latency_vs_load.png) (with the shed share), [memory vs tasks](memory_vs_tasks.png). "
           "Every repetition and setting: baselines_bench.json.", ""]
    return "\n".join(md)
