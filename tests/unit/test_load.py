"""The benchmark's arrival processes and statistics (perf/load.py), no server."""

from __future__ import annotations

import math
import statistics

import pytest

from perf.load import Arrival, Record, bursty, jain, percentiles, pick_best, poisson, read_trace, rotations, spread, summarize, write_trace

TASKS = ["a", "b", "c"]


def _counts(arrivals: list[Arrival], duration: float, bin_s: float) -> list[int]:
    bins = [0] * int(duration / bin_s)
    for a in arrivals:
        bins[min(int(a.at / bin_s), len(bins) - 1)] += 1
    return bins


def test_poisson_rate_weights_and_seed():
    arr = poisson(200.0, 50.0, TASKS, [1, 2, 4], seed=3)
    assert abs(len(arr) / 50.0 - 200.0) < 200.0 * 0.05
    assert all(0 <= a.at < 50.0 for a in arr) and [a.at for a in arr] == sorted(a.at for a in arr)
    share = {t: sum(a.task == t for a in arr) / len(arr) for t in TASKS}
    for t, w in zip(TASKS, [1, 2, 4]):
        assert abs(share[t] - w / 7) < 0.02
    assert arr == poisson(200.0, 50.0, TASKS, [1, 2, 4], seed=3)
    assert arr != poisson(200.0, 50.0, TASKS, [1, 2, 4], seed=4)
    # Poisson counts: variance ~ mean (index of dispersion ~1)
    c = _counts(arr, 50.0, 0.5)
    assert 0.7 < statistics.variance(c) / statistics.mean(c) < 1.3


def test_bursty_same_mean_rate_but_overdispersed():
    arr = bursty(200.0, 100.0, TASKS, burst_factor=5.0, burst_share=0.2, mean_burst_s=0.5, seed=1)
    assert abs(len(arr) / 100.0 - 200.0) < 200.0 * 0.12
    c = _counts(arr, 100.0, 0.25)
    assert statistics.variance(c) / statistics.mean(c) > 3.0  # bursts: far more variable than Poisson
    assert max(c) > 3 * statistics.mean(c)


@pytest.mark.parametrize("kw", [{"burst_share": 0.0}, {"burst_share": 1.0}, {"burst_factor": 0.5}])
def test_bursty_refuses_bad_parameters(kw):
    with pytest.raises(ValueError):
        bursty(10.0, 1.0, TASKS, **kw)


def test_poisson_refuses_bad_rate():
    with pytest.raises(ValueError):
        poisson(0.0, 1.0, TASKS)


def test_trace_roundtrip_sorted_and_rebased(tmp_path):
    arr = [Arrival(5.5, "b", 2), Arrival(5.0, "a", 1), Arrival(7.25, "c", 4)]
    path = write_trace(tmp_path / "t.csv", arr)
    back = read_trace(path, TASKS)
    assert [(a.at, a.task, a.size) for a in back] == [(0.0, "a", 1), (0.5, "b", 2), (2.25, "c", 4)]


@pytest.mark.parametrize(
    "body, message",
    [
        ("timestamp_s,task,size\n0.1,zzz,1\n", "unknown task 'zzz'"),
        ("timestamp_s,task,size\nsoon,a,1\n", ":2: need timestamp_s,task,size"),
        ("timestamp_s,task,size\n0.1,a,0\n", "size must be >= 1"),
        ("time,task\n0.1,a\n", "need timestamp_s,task,size"),
    ],
)
def test_trace_errors_name_the_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        read_trace(path, TASKS)


def test_jain_index():
    assert jain([1, 1, 1, 1]) == pytest.approx(1.0)
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    # served in proportion to weights 1:2:4 -> per-weight shares equal -> 1.0
    assert jain([10 / 1, 20 / 2, 40 / 4]) == pytest.approx(1.0)
    # equal service under weights 1:2:4 is unfair
    assert jain([30 / 1, 30 / 2, 30 / 4]) == pytest.approx(7 / 9)  # (1+1/2+1/4)^2 / (3 (1+1/4+1/16))
    assert math.isnan(jain([]))


def test_percentiles_and_summary_count_failures():
    recs = [Record("a", 0.1 * i, 0.010 * (i + 1)) for i in range(10)]
    recs += [Record("b", 0.5, None, error="boom"), Record("b", 0.6, 0.2, size=3), Record("a", 5.0, 0.001)]  # last one outside
    s = summarize(recs, (0.0, 1.0))
    assert s["sent"] == 12 and s["answered"] == 11 and s["failed"] == 1
    assert s["throughput_rps"] == pytest.approx(11.0)
    assert s["rows_per_s"] == pytest.approx(13.0)
    assert s["per_task"]["b"]["failed"] == 1 and s["per_task"]["b"]["rows_per_s"] == pytest.approx(3.0)
    assert s["errors"] == ["boom"]
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p["p50_ms"] == pytest.approx(50.5) and p["p99_ms"] == pytest.approx(99.01)
    assert math.isnan(percentiles([])["p99_ms"])


def test_served_rate_of_an_overloaded_server_is_its_capacity_not_the_offer():
    # 100 requests offered in 1 s, answered one per 20 ms: the last answer comes at ~2 s.
    recs = [Record("a", 0.01 * i, 0.02 * (i + 1) - 0.01 * i) for i in range(100)]
    s = summarize(recs, (0.0, 1.0))
    assert s["answered"] == 100
    assert s["throughput_rps"] == pytest.approx(50.0, rel=0.01)


def test_shed_requests_count_in_the_percentiles_as_the_timeout():
    # 95 answered at 10 ms, 5 shed: answered-only p99 would be 10 ms; counting the shed as the 2 s timeout it is 2 s
    recs = [Record("a", 0.01 * i, 0.010) for i in range(95)] + [Record("a", 0.5 + 0.01 * i, None, error="queue full") for i in range(5)]
    s = summarize(recs, (0.0, 1.0), timeout_s=2.0, slo_s=0.5)
    assert s["shed_share"] == pytest.approx(0.05)
    assert s["answered_p99_ms"] == pytest.approx(10.0)
    assert s["p99_ms"] == pytest.approx(2000.0)
    assert s["p50_ms"] == pytest.approx(10.0)
    assert s["offered_rps"] == pytest.approx(100.0)
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"])  # all answers within the SLO
    # without a timeout a shed request counts as infinity, never as a NaN
    s_inf = summarize(recs, (0.0, 1.0))
    assert math.isinf(s_inf["p99_ms"]) and s_inf["p50_ms"] == pytest.approx(10.0)


def test_goodput_counts_only_answers_within_the_slo():
    recs = [Record("a", 0.1 * i, 0.1 if i % 2 else 0.9) for i in range(10)]  # half at 100 ms, half at 900 ms
    s = summarize(recs, (0.0, 1.0), slo_s=0.5)
    assert s["answered"] == 10
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"] / 2)
    assert s["per_task"]["a"]["goodput_rps"] == pytest.approx(s["goodput_rps"])


def test_percentiles_match_numpy_on_finite_values_and_handle_infinity():
    import numpy as np

    vals = [0.003, 0.001, 0.2, 0.05, 0.07, 0.011]
    p = percentiles(vals, (10, 50, 90, 99))
    for q in (10, 50, 90, 99):
        assert p[f"p{q}_ms"] == pytest.approx(float(np.percentile(np.array(vals) * 1e3, q)))
    p = percentiles([0.001, math.inf, math.inf], (50, 99))
    assert math.isinf(p["p50_ms"]) and math.isinf(p["p99_ms"])
    assert percentiles([0.001, 0.002, math.inf], (0,))["p0_ms"] == pytest.approx(1.0)


def test_spread_is_median_min_max_and_skips_nan():
    s = spread([3.0, 1.0, float("nan"), 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert len(s["values"]) == 4
    assert math.isnan(spread([float("nan")])["median"])


def test_rotations_put_every_deployment_in_every_position():
    orders = rotations(["f", "i", "p"], 3)
    assert orders == [["f", "i", "p"], ["i", "p", "f"], ["p", "f", "i"]]
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == ["f", "i", "p"]
    assert rotations(["f", "i"], 1) == [["f", "i"]]


def test_pick_best_by_p99_ties_by_goodput_nan_never_wins():
    res = {"a": {"p99_ms": 300.0, "goodput_rps": 10.0}, "b": {"p99_ms": 200.0, "goodput_rps": 5.0},
           "c": {"p99_ms": float("nan"), "goodput_rps": 99.0}, "d": {"p99_ms": 200.0, "goodput_rps": 7.0}}
    assert pick_best(res) == "d"
    assert pick_best({"c": res["c"], "a": res["a"]}) == "a"
    with pytest.raises(ValueError):
        pick_best({})
