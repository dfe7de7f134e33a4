"""The vision/series benchmark's pure parts: the rows its driver sends, the baseline configs
it writes (parsed with Triton's schema), and its summary table (medians with their range)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from perf import bench_vision_series as bench
from perf.load import Target

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def _workload(p99: float, thr: float, mem: float) -> dict:
    return {"offered_rps": 4.0, "throughput_rps": thr, "goodput_rps": thr, "shed_share": 0.0, "p50_ms": p99 / 2,
            "p90_ms": p99, "p99_ms": p99, "memory_mib": mem, "failed": 0, "sent": 10}


@pytest.mark.parametrize("batch_dim", [False, True])
def test_the_driver_sends_one_row_per_request_in_each_deployments_shape(batch_dim: bool) -> None:
    target = Target("x", "127.0.0.1:1", {"t": "t"}, batch_dim=batch_dim, output="LOGITS")
    image = bench.FamilyDriver(target, bench.VISION, [b"png-0", b"png-1"], timeout_s=1.0)
    series = bench.FamilyDriver(target, bench.SERIES, [np.arange(240, dtype=np.float32)], timeout_s=1.0)
    try:
        (inp,) = image._request(1, 1)
        assert inp.name() == "IMAGE" and inp.shape() == ([1, 1] if batch_dim else [1])
        (inp,) = series._request(1, 0)
        assert inp.name() == "SERIES" and inp.shape() == [1, 240] and inp.datatype() == "FP32"
    finally:
        image.close()
        series.close()


@pytest.mark.parametrize("fam", [bench.VISION, bench.SERIES], ids=lambda f: f.name)
def test_baseline_configs_parse_and_partition_the_machine(fam: bench.FamilyBench, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    repo = bench.baseline_repo(fam, tmp_path, ["t00", "t01"], src, partitioned=True)
    for name in ("t00", "t01"):
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.backend == "python" and cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
        assert [i.name for i in cfg.input] == [fam.input] and cfg.input[0].allow_ragged_batch
        assert fam.output in [o.name for o in cfg.output]
        assert cfg.parameters["cpu_quota"].string_value  # a share of the machine
        assert Path(cfg.parameters["artifact"].string_value, "manifest.json").exists()
        assert "single_family_task" in (repo / name / "1" / "model.py").read_text()


def test_summary_is_the_median_over_repetitions_with_its_range() -> None:
    runs = [{"raw_limit_rps": raw, "deployments": {"fmplex": {"saturation": _workload(100, thr, 500), "matched_uniform": _workload(p99, 4, 500)},
                                                    "isolated": {"saturation": _workload(300, thr / 2, 900), "matched_uniform": _workload(3 * p99, 4, 900)}}}
            for raw, thr, p99 in ((10.0, 8.0, 200.0), (12.0, 9.0, 260.0), (11.0, 7.0, 240.0))]
    s = bench.summarize_runs(runs, ["fmplex", "isolated"])
    assert s["raw_limit_rps"] == {"median": 11.0, "range": [10.0, 12.0]}
    assert s["fmplex"]["matched_uniform"]["p99_ms"] == 240.0 and s["fmplex"]["matched_uniform"]["range"]["p99_ms"] == [200.0, 260.0]
    assert s["isolated"]["saturation"]["throughput_rps"] == 4.0
    res = {"tasks": 4, "kind": "classifier", "runs": runs, "summary": s,
           "budget": {"budget_mib": 2048.0, "fmplex": {"tasks": 512, "budget_reached": False, "stopped_by": "wall-clock limit", "curve": [(0, 400.0)]},
                      "isolated": {"tasks": 6, "budget_reached": True, "stopped_by": "budget", "curve": [(0, 100.0)]}}}
    md = bench.render_markdown("vision", res, {"load_average_at_start": [9.0, 8.0, 7.0]})
    assert "| fmplex | 8.0 [7.0..9.0] | nan | 4.0 | 120 [100..130] | 240 [200..260] | 0 | 500 [500..500] |" in md
    assert "fmplex: **512** (lower bound: wall-clock limit)" in md and "isolated: **6**;" in md
    assert "contended" in md


def test_the_budget_loop_counts_only_what_fit_and_says_why_it_stopped() -> None:
    """perf/budget.py's loop, which both tasks-in-budget benchmarks use: memory grows 100 MiB per task."""
    from perf.budget import grow_until_budget

    def run(budget: float, limit: int) -> dict:
        state = {"n": 0}

        def add(n: int) -> int | str:
            if n >= limit:
                return f"task limit {limit}"
            state["n"] = n + 2  # a chunk of two
            return state["n"]

        return grow_until_budget(add, lambda: 50.0 + 100.0 * state["n"], budget, 60.0, lambda _: None, lambda n, m: f"{n} {m}")

    over = run(budget=480.0, limit=100)  # 4 tasks = 450 MiB fit, 6 = 650 do not
    assert (over["tasks"], over["budget_reached"], over["stopped_by"]) == (4, True, "budget")
    assert over["curve"] == [(0, 50.0), (2, 250.0), (4, 450.0), (6, 650.0)]
    short = run(budget=10_000.0, limit=4)
    assert (short["tasks"], short["budget_reached"], short["stopped_by"]) == (4, False, "task limit 4")
    assert run(budget=10.0, limit=4)["stopped_by"].startswith("budget") and run(budget=10.0, limit=4)["tasks"] == 0
