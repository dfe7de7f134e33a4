"""The multimodal trace benchmark's own functions on a tiny trace (perf/bench_multimodal_trace.py).

Both deployments -- the staged one (encode + lm stage hosts, 2 vFMs, the
autoscaler running) and the monolithic one (one whole-pipeline model per task)
-- each in a real tritonserver, replay the same ~20 requests (text-only and
with images). Asserted: every request is answered, both deployments give the
same greedy tokens for every request (the same weights, split or whole), and
the timing the benchmark derives is sane (server timings ordered and inside
the client's latency, TTFT <= end-to-end, TPOT > 0), and the figures, the
table and the plot come out of it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from perf import bench_multimodal_trace as bench

pytestmark = pytest.mark.e2e


def test_tiny_trace_staged_and_monolithic_agree(tmp_path: Path) -> None:
    cfg = bench.BenchConfig(
        tasks=2, duration_s=4.0, calm_rate=4.0, burst_factor=2.0, mean_calm_s=2.0, mean_burst_s=1.0, seed=0,
        max_new_tokens=8, encode_bounds=(1, 1), lm_bounds=(1, 2), down_window_s=2.0, timeout_s=60.0,
    )  # fmt: skip
    items, _ = bench.plan(cfg)
    assert len(items) >= 10 and any(i.n_images == 0 for i in items) and any(i.n_images > 1 for i in items)
    assert {i.task for i in items} == {"mm0", "mm1"}
    again, _ = bench.plan(cfg)  # seeded: the same requests every time
    assert [(i.text, i.max_new_tokens, i.n_images) for i in again] == [(i.text, i.max_new_tokens, i.n_images) for i in items]

    deps = bench.prepare(tmp_path, cfg)
    results = {name: bench.run_deployment(deps[name], items, cfg, tmp_path) for name in bench.DEPLOYMENTS}

    for name, res in results.items():
        assert [r.index for r in res.records] == [i.index for i in items], name
        failed = [(r.index, r.error) for r in res.records if r.e2e_s is None]
        assert not failed, f"{name}: {failed}"
        multi = 0
        for r, item in zip(res.records, items):
            assert r.tokens and 1 <= len(r.tokens) <= item.max_new_tokens, (name, r)
            queue_ms, first_ms, total_ms = r.timing_ms  # type: ignore[misc]
            assert 0 <= queue_ms <= first_ms <= total_ms, (name, r.timing_ms)
            assert total_ms / 1e3 <= r.e2e_s + 1e-3, (name, r.timing_ms, r.e2e_s)  # the host's time lies inside the client's
            assert r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s, (name, r)
            if len(r.tokens) >= 2:
                multi += 1
                assert r.tpot_ms is not None and r.tpot_ms > 0, (name, r)
        assert multi >= len(items) // 2
        figs = bench.figures(res, items)
        assert figs["answered"] == len(items) and figs["failed"] == 0
        assert 0 < figs["ttft_p50_ms"] <= figs["e2e_p50_ms"] and figs["tpot_p50_ms"] > 0
        assert figs["pss_peak_mib"] > 0 and figs["instance_seconds"] > 0 and not figs["autoscale_errors"]
        assert figs["e2e_text_p50_ms"] is not None and figs["e2e_image_p50_ms"] is not None

    staged, mono = results["staged"], results["monolithic"]
    differ = [(a.index, a.tokens, b.tokens) for a, b in zip(staged.records, mono.records) if a.tokens != b.tokens]
    assert not differ, f"staged and monolithic answers differ: {differ[:3]}"
    # Instances: the two stage hosts (at least their minimum), one per task for the monolithic models.
    assert set(staged.instances[0][1]) == {"fm.llava-tiny.encode", "fm.llava-tiny.lm"}
    assert all(c["fm.llava-tiny.encode"] == 1 and 1 <= c["fm.llava-tiny.lm"] <= 2 for _, c in staged.instances)
    assert all(c == {"mm0": 1, "mm1": 1} for _, c in mono.instances)
    figs = {n: bench.figures(r, items) for n, r in results.items()}
    assert math.isclose(figs["monolithic"]["instances_mean"], 2.0, rel_tol=0.01)
    text = bench.table(figs)
    assert "staged/mono" in text and "TTFT p99 (ms)" in text
    png = bench.plot(results, items, cfg, tmp_path / "trace.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
