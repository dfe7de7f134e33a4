"""perf/bench_overload.py's counting of the flood's errors (no server)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_overload", ROOT / "perf" / "bench_overload.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # type: ignore[union-attr]

NAN = math.nan


def test_flood_counts_are_counter_increases():
    before = {"failed": 3.0, "rejected_queue_full": NAN, "expired": 1.0}
    after = {"failed": 10.0, "rejected_queue_full": 5.0, "expired": NAN}
    # a counter first exposed during the flood counts from 0; one that vanished was never bumped
    assert bench.flood_counts(before, after, "intent") == {"failed": 7, "rejected_queue_full": 5, "expired": 0}


def test_flood_counts_refuse_a_missing_failure_counter():
    with pytest.raises(RuntimeError, match="nv_inference_request_failure"):
        bench.flood_counts({"failed": NAN}, {"failed": NAN}, "intent")


def test_flood_error_lines_keep_the_errors():
    out = "Request concurrency: 10\n  Client: \nThread [0] had error: queue full\nFailed to obtain stable measurement\nok\n"
    assert bench.flood_error_lines(out) == ["Thread [0] had error: queue full", "Failed to obtain stable measurement"]
