"""The ingress's load meter (pure: fed made-up times) and how placement uses its figures."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fmplex.cluster.loads import LOAD_STEP, LoadMeter, quantize, task_totals
from fmplex.cluster.placement import Placement, PlacementPolicy, ReplicaState, TaskInfo

TAU = 10.0
POLICY = PlacementPolicy(hot_load=8, cool_load=2, max_replicas_per_task=3)


def drive(meter: LoadMeter, task: str, replica: str, start: float, stop: float, period: float, service: float) -> None:
    """One request every ``period`` seconds from ``start`` to ``stop``, each taking ``service`` seconds."""
    drive_many(meter, [(task, replica, start, stop, period, service)])


def drive_many(meter: LoadMeter, schedules: list[tuple[str, str, float, float, float, float]]) -> None:
    """Several schedules of :func:`drive` together, their starts and ends fed in time order."""
    events = []
    for task, replica, start, stop, period, service in schedules:
        for i in range(int(round((stop - start) / period))):
            t = start + i * period
            events += [(t, 1, task, replica), (t + service, 0, task, replica)]
    for t, is_start, task, replica in sorted(events):
        (meter.started if is_start else meter.finished)(task, replica, t)


def test_a_steady_rate_and_cost_are_measured_after_a_few_time_constants() -> None:
    meter = LoadMeter(TAU)
    drive(meter, "t", "r1", 0.0, 100.0, 0.1, 0.02)  # 10 req/s, 20 ms each: 20% of the replica
    now = 100.0
    assert meter.rates(now)["t"] == pytest.approx(10.0, rel=0.02)
    assert meter.costs(now)["r1"] == pytest.approx(0.02, rel=0.02)
    assert meter.shares(now) == {"r1": {"t": pytest.approx(0.2)}}


def test_a_replica_s_busy_time_is_split_between_its_tasks_by_their_requests() -> None:
    meter = LoadMeter(TAU)
    # 20 and 5 req/s, 20 ms each, never overlapping: 40% and 10% of the replica
    drive_many(meter, [("heavy", "r1", 0.0, 100.0, 0.05, 0.02), ("light", "r1", 0.03, 100.03, 0.2, 0.02)])
    shares = meter.shares(100.05)["r1"]
    assert shares["heavy"] == pytest.approx(0.4, abs=LOAD_STEP)
    assert shares["light"] == pytest.approx(0.1, abs=LOAD_STEP)
    assert shares["heavy"] > shares["light"]


def test_overlapping_requests_count_the_replica_busy_once() -> None:
    meter = LoadMeter(TAU)
    for i in range(1000):  # two requests at a time, each 50 ms, one pair every 100 ms: busy half the time
        t = i * 0.1
        meter.started("a", "r1", t)
        meter.started("b", "r1", t)
        meter.finished("a", "r1", t + 0.05)
        meter.finished("b", "r1", t + 0.05)
    shares = meter.shares(100.0)["r1"]
    assert sum(shares.values()) == pytest.approx(0.5, abs=LOAD_STEP)
    assert meter.costs(100.0)["r1"] == pytest.approx(0.025, rel=0.05)


def test_a_task_that_stops_fades_with_the_time_constant() -> None:
    meter = LoadMeter(TAU)
    drive(meter, "t", "r1", 0.0, 100.0, 0.1, 0.02)
    before = meter.rates(100.0)["t"]
    after = meter.rates(100.0 + TAU)["t"]
    assert after == pytest.approx(before / math.e, rel=1e-6)
    assert meter.shares(100.0 + 5 * TAU) == {}  # below half a LOAD_STEP: reads as no load


def test_a_request_still_in_flight_keeps_its_replica_busy() -> None:
    meter = LoadMeter(TAU)
    drive(meter, "t", "r1", 0.0, 50.0, 1.0, 0.5)  # busy half the time
    meter.started("t", "r1", 50.0)  # then one long request, still running
    before = meter.costs(50.0)["r1"]
    assert meter.costs(60.0)["r1"] > before


def test_forgetting_a_replica_drops_its_figures_only() -> None:
    meter = LoadMeter(TAU)
    drive(meter, "t", "r1", 0.0, 10.0, 0.1, 0.02)
    drive(meter, "t", "r2", 0.0, 10.0, 0.1, 0.02)
    meter.forget("r1")
    assert meter.replicas() == ["r2"] and set(meter.shares(10.0)) == {"r2"}
    meter.finished("t", "r1", 11.0)  # a request that ends after its replica left: ignored
    assert meter.replicas() == ["r2"]


def test_quantize_and_totals() -> None:
    assert quantize(0.04) == 0.0 and quantize(0.07) == LOAD_STEP and quantize(0.51) == 0.5
    assert task_totals({"r1": {"a": 0.3, "b": 0.1}, "r2": {"a": 0.25}}) == {"a": 0.55, "b": 0.1}
    with pytest.raises(ValueError):
        LoadMeter(0)


# --- placement fed with these figures ----------------------------------------------------

MB = 1 << 20


def state(rid: str, shares: dict[str, float], load: float = 0.0) -> ReplicaState:
    return ReplicaState(rid, "minilm", 100 * MB, 16, {t: MB for t in shares}, load, task_load=shares)


def test_a_new_task_goes_to_the_replica_with_least_measured_load_not_fewest_tasks() -> None:
    meter = LoadMeter(TAU)
    drive(meter, "hot", "a", 0.0, 100.0, 0.02, 0.01)  # half of replica a
    drive_many(meter, [(name, "b", start, 100.0 + start, 1.0, 0.01) for name, start in (("c1", 0.1), ("c2", 0.3), ("c3", 0.5))])
    shares = meter.shares(100.01)
    replicas = [state("a", shares["a"]), state("b", {t: shares.get("b", {}).get(t, 0.0) for t in ("c1", "c2", "c3")})]
    assert len(replicas[1].tasks) > len(replicas[0].tasks)
    assert POLICY.place(TaskInfo("new", "minilm", MB), replicas) == Placement("new", "b")


def test_equal_measured_loads_fall_back_to_task_counts() -> None:
    replicas = [state("a", {"x": 0.0, "y": 0.0}), state("b", {"z": 0.0})]
    assert POLICY.place(TaskInfo("new", "minilm", MB), replicas) == Placement("new", "b")


def test_a_hot_task_s_extra_copy_goes_where_measured_load_is_least() -> None:
    holder = state("a", {"hot": 0.9}, load=20)
    busy = state("b", {"x": 0.6}, load=0)  # no requests in flight this tick, but measured busy
    quiet = dataclasses.replace(state("c", {"y": 0.1, "z": 0.1}), load=1)
    tasks = {"hot": TaskInfo("hot", "minilm", MB, load=0.9)}
    assert POLICY.rebalance(tasks, {"hot": 20}, [holder, busy, quiet]) == [Placement("hot", "c")]
