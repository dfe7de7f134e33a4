"""The multimodal trace benchmark's side-by-side table and spread (perf/bench_multimodal_trace.py), on made-up figures."""

from __future__ import annotations

from typing import Any

from perf import bench_multimodal_trace as bench


def _figs(p99: float, inst: float) -> dict[str, Any]:
    f: dict[str, Any] = {key: 1.0 for _, key, _ in bench.ROWS if key}
    f.update(e2e_p99_ms=p99, instance_seconds=inst, instances_mean=inst / 75, instances_max=3, scale_ups=1, scale_downs=1)
    return f


def test_table_puts_before_and_after_against_monolithic() -> None:
    figs = {bench.BEFORE: _figs(300.0, 150.0), "staged": _figs(90.0, 120.0), "monolithic": _figs(100.0, 300.0)}
    text = bench.table(figs)
    head, *rows = text.splitlines()
    assert head.split() == [bench.BEFORE, "staged", "monolithic", "before/mono", "staged/mono"]
    p99 = next(r for r in rows if r.startswith("e2e p99 (ms)"))
    assert p99.split()[-2:] == ["3.00x", "0.90x"]
    cost = next(r for r in rows if r.startswith("instance-seconds"))
    assert cost.split()[-2:] == ["0.50x", "0.40x"]
    two = bench.table({"staged": figs["staged"], "monolithic": figs["monolithic"]})
    assert "staged/mono" in two and "before/mono" not in two


def test_spread_is_the_range_over_repetitions() -> None:
    reps = [_figs(p, 100.0 + p) for p in (120.0, 80.0, 95.0)]
    out = bench.spread(reps)
    assert out["e2e_p99_ms"] == [80.0, 120.0] and out["instance_seconds"] == [180.0, 220.0]
    assert bench.median_figures(reps)["e2e_p99_ms"] == 95.0
