"""The baseline benchmark's summary (perf/report.py): medians over repetitions,
fairness only where weights exist, measured tasks-in-budget, target verdicts."""

from __future__ import annotations

import math

import pytest

from perf.deployments import BaselineSetting, isolated_settings, partitioned_settings
from perf.report import FIELDS, WORKLOADS, aggregate, build_summary, fairness, render_markdown, tasks_in_budget

SERVED = {"t00": 10.0, "t01": 20.0, "t02": 40.0}  # in proportion to 1:2:4


def _workload(p99: float, thr: float = 100.0, shed: float = 0.0) -> dict:
    return {"offered_rps": 100.0, "throughput_rps": thr, "goodput_rps": thr * 0.9, "shed_share": shed, "p50_ms": p99 / 4,
            "p90_ms": p99 / 2, "p99_ms": p99, "memory_mib": 500.0, "failed": int(shed * 100), "sent": 100}


def _deployment(p99: float, thr: float, weights_applied: bool, served: dict[str, float] = SERVED) -> dict:
    out = {w: _workload(p99, thr) for w in WORKLOADS}
    out["fairness"] = {"weights": {"t00": 1.0, "t01": 2.0, "t02": 4.0}, "served_rows_per_s": served, "weights_applied": weights_applied}
    out["cpu_cores_busy"] = {"models": 1.2, "triton_frontend": 0.3, "client": 0.4}
    return out


def _full(reps: int = 3, fm_p99: tuple = (100.0, 90.0, 300.0), iso_p99: float = 400.0, budget: dict | None = None) -> dict:
    runs = []
    for r in range(reps):
        runs.append({"order": ["fmplex", "isolated", "partitioned"][r:] + ["fmplex", "isolated", "partitioned"][:r], "raw_limit_rps": 500.0 + r,
                     "deployments": {"fmplex": _deployment(fm_p99[r], 460.0, True),
                                     "isolated": _deployment(iso_p99, 300.0, False, {"t00": 30.0, "t01": 30.0, "t02": 30.0}),
                                     "partitioned": _deployment(1000.0, 250.0, False)}})
    return {"runs": runs, "when": "now", "quick": reps == 1, "machine": {"cpus": 2, "cpu": "x", "device": "cpu"}, "tasks": 8,
            "matched_load_rps": 220.0, "timeout_ms": 10000.0, "slo_ms": 500.0,
            "baseline_settings": {"isolated": {"tried": {"1x1": {"setting": {"label": "1x1"}, "matched_uniform": _workload(400.0)},
                                                         "2instances": {"setting": {"label": "2i"}, "matched_uniform": _workload(500.0)}},
                                               "chosen": "1x1", "picked_by": "p99"}},
            "budget": budget if budget is not None else {
                "budget_mib": 8192.0, "wall_limit_s": 600.0,
                "fmplex": {"tasks": 3000, "budget_reached": False, "stopped_by": "wall-clock limit", "hosts": 1,
                           "mix": {"classifier": 750, "lora_r8": 750, "prompt": 750, "adapter": 750}},
                "isolated": {"tasks": 27, "budget_reached": True, "stopped_by": "budget", "mix": {"classifier": 7}}}}


def test_aggregate_takes_the_median_and_the_range_of_each_field():
    a = aggregate(_full()["runs"], "fmplex", "matched_uniform")
    assert a["repetitions"] == 3
    assert a["p99_ms"] == 100.0 and a["range"]["p99_ms"] == [90.0, 300.0]
    assert set(FIELDS) <= set(a)


def test_jain_only_where_weights_were_applied():
    runs = _full()["runs"]
    f = fairness(runs, "fmplex")
    assert f["jain"] == pytest.approx(1.0) and f["weights_applied"]
    i = fairness(runs, "isolated")
    assert i["jain"] is None and "no per-task weights" in i["note"]
    assert i["served_share"] == pytest.approx({"t00": 1 / 3, "t01": 1 / 3, "t02": 1 / 3})


def test_summary_holds_every_workload_deployment_and_field():
    s = build_summary(_full())
    for w in WORKLOADS:
        for d in ("fmplex", "isolated", "partitioned"):
            for f in FIELDS:
                assert f in s["workloads"][w][d]
    assert s["raw_limit_rps"] == 501.0 and s["raw_limit_range"] == [500.0, 502.0]
    assert s["repetitions"]["count"] == 3 and len(s["repetitions"]["orders"]) == 3
    assert s["baseline_settings"]["isolated"]["chosen"] == "1x1" and set(s["baseline_settings"]["isolated"]["tried"]) == {"1x1", "2instances"}
    assert s["tasks_in_budget"]["measured"] is True and s["tasks_in_budget"]["fmplex_mix"]["lora_r8"] == 750


def test_verdicts_follow_the_figures():
    s = build_summary(_full())
    t = s["targets"]
    assert s["ratios"]["fmplex_vs_raw"] == pytest.approx(460.0 / 501.0)
    assert t["throughput_vs_raw"]["met"] is True
    assert s["ratios"]["p99_uniform_fmplex_vs_isolated"] == pytest.approx(0.25)
    assert t["p99_uniform_vs_best_isolated"]["met"] is True
    assert t["p99_uniform_vs_best_partitioned"]["met"] is True  # 100 / 1000
    assert t["jain"]["met"] is True
    assert t["tasks_in_budget_vs_isolated"]["met"] is True and t["tasks_in_budget_vs_isolated"]["lower_bound"] is True
    assert s["ratios"]["tasks_ratio_is_lower_bound"] is True
    assert s["causes"] == {}

    worse = build_summary(_full(fm_p99=(300.0, 350.0, 320.0), iso_p99=400.0))
    assert worse["targets"]["p99_uniform_vs_best_isolated"]["met"] is False
    assert "p99_uniform_vs_best_isolated" in worse["causes"] and "p50" in worse["causes"]["p99_uniform_vs_best_isolated"]


def test_tasks_in_budget_is_never_projected():
    b = {"budget_mib": 1024.0, "wall_limit_s": 90.0,
         "fmplex": {"tasks": 500, "budget_reached": False, "stopped_by": "wall-clock limit", "hosts": 1, "mix": {}},
         "isolated": {"tasks": 2, "budget_reached": True, "stopped_by": "budget", "mix": {}}}
    s = build_summary(_full(budget=b))
    assert s["tasks_in_budget"]["fmplex"] == 500 and s["ratios"]["tasks_fmplex_vs_isolated"] == 250.0
    assert s["tasks_in_budget"]["fmplex_lower_bound"] is True
    skipped = build_summary(_full(budget={"skipped": True}))
    assert skipped["tasks_in_budget"] == {"measured": False, "skipped": True}
    assert math.isnan(skipped["ratios"]["tasks_fmplex_vs_isolated"]) and skipped["targets"]["tasks_in_budget_vs_isolated"]["met"] is None
    assert tasks_in_budget({"skipped": True})["measured"] is False


def test_markdown_has_one_table_per_workload_and_says_quick():
    md = render_markdown(build_summary(_full()))
    assert md.count("| deployment | offered req/s |") == len(WORKLOADS)
    assert "not scored" in md and "100 (90-300)" in md
    quick = render_markdown(build_summary(_full(reps=1)))
    assert "QUICK" in quick and "1 repetition" in quick


def test_baseline_candidate_settings():
    s = isolated_settings(4)
    assert s == {"1x1": BaselineSetting(1, 1), "1x4threads": BaselineSetting(1, 4), "4instances": BaselineSetting(4, 1)}
    assert isolated_settings(1) == {"1x1": BaselineSetting(1, 1)}  # one core: the three settings are one
    assert {v.max_batch for v in partitioned_settings((4, 16)).values()} == {4, 16}


def test_no_tasks_verdict_when_the_isolated_count_was_cut_short():
    b = {"budget_mib": 8192.0, "wall_limit_s": {"fmplex": 600.0, "isolated": 1200.0},
         "fmplex": {"tasks": 5000, "budget_reached": True, "stopped_by": "budget", "hosts": 2, "mix": {}},
         "isolated": {"tasks": 10, "budget_reached": False, "stopped_by": "wall-clock limit", "mix": {}}}
    s = build_summary(_full(budget=b))
    assert s["ratios"]["tasks_fmplex_vs_isolated"] == 500.0
    assert s["targets"]["tasks_in_budget_vs_isolated"]["met"] is None  # 10 is a lower bound: the ratio would be overstated
    assert "isolated 600 s" not in render_markdown(s) and "isolated 1200 s" in render_markdown(s)


def test_a_budget_only_run_summarizes_without_workloads():
    full = _full()
    full["runs"] = []
    s = build_summary(full)
    assert all(v == {} for v in s["workloads"].values()) and s["fairness"] == {}
    assert s["targets"]["throughput_vs_raw"]["met"] is None
    assert s["targets"]["tasks_in_budget_vs_isolated"]["met"] is True
    assert "tasks in the memory budget" in render_markdown(s)


def test_a_lower_bound_below_the_bar_settles_nothing():
    b = {"budget_mib": 1024.0, "wall_limit_s": 90.0,
         "fmplex": {"tasks": 150, "budget_reached": False, "stopped_by": "wall-clock limit", "hosts": 1, "mix": {}},
         "isolated": {"tasks": 2, "budget_reached": True, "stopped_by": "budget", "mix": {}}}
    s = build_summary(_full(budget=b))
    assert s["ratios"]["tasks_fmplex_vs_isolated"] == 75.0
    assert s["targets"]["tasks_in_budget_vs_isolated"]["met"] is None
    assert "lower bound" in s["causes"]["tasks_in_budget_vs_isolated"]
    b["fmplex"]["budget_reached"] = True  # the same count with the budget reached is a miss
    assert build_summary(_full(budget=b))["targets"]["tasks_in_budget_vs_isolated"]["met"] is False
