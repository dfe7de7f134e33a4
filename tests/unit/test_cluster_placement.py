"""The cluster's placement and routing policy (pure: no Ray, no Triton)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmplex.cluster.placement import (
    Placement,
    PlacementError,
    PlacementPolicy,
    ReplicaState,
    Release,
    TaskInfo,
    spread,
)

MB = 1 << 20
POLICY = PlacementPolicy(hot_load=8, cool_load=2, max_replicas_per_task=3)


def replica(rid: str, backbone: str = "minilm", budget: int = 100 * MB, slots: int = 16, **kw: object) -> ReplicaState:
    return ReplicaState(rid, backbone, budget, slots, **kw)  # type: ignore[arg-type]


def task(name: str, size: int = MB, backbone: str = "minilm", pinned: bool = False) -> TaskInfo:
    return TaskInfo(name, backbone, size, pinned)


def hold(r: ReplicaState, *names: str, size: int = MB) -> ReplicaState:
    return dataclasses.replace(r, tasks={**r.tasks, **{n: size for n in names}})


def place_all(names: list[str], replicas: list[ReplicaState], policy: PlacementPolicy = POLICY) -> list[ReplicaState]:
    """Place tasks one after the other, applying each decision (what the placement actor does)."""
    by_id = {r.replica: r for r in replicas}
    for name in names:
        decision = policy.place(task(name), list(by_id.values()))
        r = by_id[decision.replica]
        kept = {t: b for t, b in r.tasks.items() if t not in decision.evict}
        by_id[r.replica] = dataclasses.replace(r, tasks={**kept, name: MB})
    return list(by_id.values())


# --- routing -------------------------------------------------------------------


def test_route_prefers_a_replica_that_holds_the_task_over_an_idle_one() -> None:
    replicas = [replica("a", load=0), hold(replica("b", load=5), "t")]
    assert POLICY.route(task("t"), replicas) == "b"


def test_route_picks_the_least_loaded_holder_then_the_lowest_id() -> None:
    replicas = [hold(replica("a", load=3), "t"), hold(replica("b", load=1), "t"), hold(replica("c", load=1), "t")]
    assert POLICY.route(task("t"), replicas) == "b"


def test_route_skips_unhealthy_holders_and_other_backbones() -> None:
    replicas = [hold(replica("a", healthy=False), "t"), hold(replica("b", backbone="smollm"), "t")]
    assert POLICY.route(task("t"), replicas) is None
    assert POLICY.route(task("t"), replicas + [hold(replica("c", load=9), "t")]) == "c"


# --- first placement -------------------------------------------------------------


def test_a_task_goes_only_to_replicas_of_its_backbone() -> None:
    replicas = [replica("a", backbone="smollm"), replica("b", backbone="minilm", load=50)]
    assert POLICY.place(task("t"), replicas).replica == "b"
    with pytest.raises(PlacementError, match="no healthy replica of backbone 'vit'"):
        POLICY.place(task("t", backbone="vit"), replicas)


def test_placing_a_held_task_keeps_it_where_it_is() -> None:
    replicas = [replica("a"), hold(replica("b", load=7), "t", "u", "v")]
    assert POLICY.place(task("t"), replicas) == Placement("t", "b")


def test_first_placement_is_deterministic_whatever_the_order_of_the_snapshot() -> None:
    replicas = [hold(replica("a"), "x"), replica("b"), replica("c"), hold(replica("d"), "y")]
    answers = set()
    for seed in range(20):
        shuffled = replicas[:]
        random.Random(seed).shuffle(shuffled)
        answers.add(POLICY.place(task("new"), shuffled).replica)
    assert answers == {"b"}


def test_first_placement_prefers_fewest_tasks_then_fewest_bytes_then_load() -> None:
    a = hold(replica("a"), "x", size=5 * MB)
    b = hold(replica("b", load=9), "y", size=2 * MB)
    c = hold(replica("c", load=1), "z", size=2 * MB)
    assert POLICY.place(task("t"), [a, b, c]).replica == "c"  # b and c hold fewer bytes than a; c is less loaded
    assert POLICY.place(task("t"), [a, b, hold(c, "w")]).replica == "b"  # c now holds two tasks


def test_twelve_tasks_on_three_replicas_spread_evenly() -> None:
    placed = place_all([f"task{i:02d}" for i in range(12)], [replica("r1"), replica("r2"), replica("r3")])
    assert spread(len(r.tasks) for r in placed) == 0
    assert sorted(t for r in placed for t in r.tasks) == [f"task{i:02d}" for i in range(12)]


@settings(max_examples=60, deadline=None)
@given(n_replicas=st.integers(1, 6), n_tasks=st.integers(0, 40))
def test_tasks_spread_within_one_of_even(n_replicas: int, n_tasks: int) -> None:
    placed = place_all([f"t{i}" for i in range(n_tasks)], [replica(f"r{i}", slots=64) for i in range(n_replicas)])
    assert spread(len(r.tasks) for r in placed) <= 1
    assert sum(len(r.tasks) for r in placed) == n_tasks  # each task exactly once


def test_capacity_is_bytes_not_a_model_count() -> None:
    small = replica("a", budget=10 * MB, load=0)  # fewest tasks, but a 6 MB task does not fit next to 5 MB
    small = hold(small, "x", size=5 * MB)
    roomy = hold(replica("b", budget=100 * MB, load=5), "y", "z", size=MB)
    assert POLICY.place(task("big", size=6 * MB), [small, roomy]) == Placement("big", "b")
    # many small tasks fit where one big one does not
    assert POLICY.place(task("tiny", size=MB), [small, roomy]).replica == "a"


def test_capacity_is_bounded_by_slots() -> None:
    full = hold(replica("a", slots=2), "x", "y")
    other = hold(replica("b", slots=8, load=20), "p", "q", "r")
    assert POLICY.place(task("t"), [full, other]).replica == "b"


def test_full_replicas_evict_their_least_recently_used_tasks() -> None:
    a = hold(replica("a", budget=3 * MB), "old", "mid", "new", size=MB)
    a = dataclasses.replace(a, last_used={"old": 1, "mid": 5, "new": 9})
    assert POLICY.place(task("t", size=2 * MB), [a]) == Placement("t", "a", ("old", "mid"))


def test_eviction_picks_the_replica_that_evicts_fewest_and_never_a_pinned_task() -> None:
    a = dataclasses.replace(hold(replica("a", budget=2 * MB), "p1", "p2"), pinned=frozenset({"p1", "p2"}))
    b = dataclasses.replace(hold(replica("b", budget=2 * MB, load=3), "q1", "q2"), last_used={"q1": 4, "q2": 2})
    assert POLICY.place(task("t"), [a, b]) == Placement("t", "b", ("q2",))
    with pytest.raises(PlacementError, match="pinned"):
        POLICY.place(task("t"), [a])


def test_a_task_larger_than_any_budget_is_refused_with_a_clear_error() -> None:
    with pytest.raises(PlacementError, match="fits on no replica"):
        POLICY.place(task("huge", size=500 * MB), [replica("a"), replica("b")])


def test_unhealthy_replicas_get_no_new_tasks_and_their_tasks_move() -> None:
    dead = hold(replica("a", healthy=False), "t")
    alive = replica("b", load=30)
    assert POLICY.route(task("t"), [dead, alive]) is None
    assert POLICY.place(task("t"), [dead, alive]) == Placement("t", "b")


# --- hot tasks ----------------------------------------------------------------------


def test_wanted_replicas_has_hysteresis_and_a_cap() -> None:
    p = POLICY
    assert p.wanted_replicas(8, 1) == 1  # at the threshold: not yet hot
    assert p.wanted_replicas(8.5, 1) == 2
    assert p.wanted_replicas(10, 2) == 2  # below 2 * hot_load, above cool_load: stays
    assert p.wanted_replicas(17, 2) == 3
    assert p.wanted_replicas(100, 3) == 3  # capped
    assert p.wanted_replicas(3, 2) == 2  # between cool and hot: no flapping
    assert p.wanted_replicas(1.5, 2) == 1
    assert p.wanted_replicas(4, 3) == 3 and p.wanted_replicas(3.9, 3) == 2  # cool below cool_load per remaining copy
    assert p.wanted_replicas(0, 0) == 1


def test_a_hot_task_gains_a_second_and_third_replica_then_loses_them() -> None:
    tasks = {"hot": task("hot"), "cold": task("cold")}
    replicas = [hold(replica("r1"), "hot"), hold(replica("r2"), "cold"), replica("r3")]

    def apply(actions: list[Placement | Release]) -> None:
        for act in actions:
            i = next(k for k, r in enumerate(replicas) if r.replica == act.replica)
            r = replicas[i]
            if isinstance(act, Placement):
                replicas[i] = hold(r, act.task)
            else:
                replicas[i] = dataclasses.replace(r, tasks={t: b for t, b in r.tasks.items() if t != act.task})

    def holders() -> list[str]:
        return sorted(r.replica for r in replicas if "hot" in r.tasks)

    apply(POLICY.rebalance(tasks, {"hot": 20, "cold": 0}, replicas))
    assert holders() == ["r1", "r3"]  # the idle replica, not the one busy with another task... both idle: fewest tasks
    apply(POLICY.rebalance(tasks, {"hot": 20, "cold": 0}, replicas))
    assert holders() == ["r1", "r2", "r3"]
    apply(POLICY.rebalance(tasks, {"hot": 40, "cold": 0}, replicas))
    assert holders() == ["r1", "r2", "r3"]  # capped at three
    apply(POLICY.rebalance(tasks, {"hot": 3, "cold": 0}, replicas))
    assert holders() == ["r1", "r2"]
    apply(POLICY.rebalance(tasks, {"hot": 0, "cold": 0}, replicas))
    assert holders() == ["r1"]  # the first placement stays
    assert POLICY.rebalance(tasks, {"hot": 0, "cold": 0}, replicas) == []


def test_a_hot_task_never_evicts_another_task_for_an_extra_copy() -> None:
    tasks = {"hot": task("hot")}
    replicas = [hold(replica("r1", slots=1), "hot"), hold(replica("r2", slots=1), "other")]
    assert POLICY.rebalance(tasks, {"hot": 100}, replicas) == []


def test_a_pinned_task_keeps_its_extra_replicas() -> None:
    tasks = {"p": task("p", pinned=True)}
    replicas = [hold(replica("r1"), "p"), hold(replica("r2"), "p")]
    assert POLICY.rebalance(tasks, {"p": 0}, replicas) == []
    assert POLICY.rebalance({"p": task("p")}, {"p": 0}, replicas) == [Release("p", "r2")]


def test_bad_policy_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="cool_load < hot_load"):
        PlacementPolicy(hot_load=2, cool_load=2)
    with pytest.raises(ValueError, match="max_replicas_per_task"):
        PlacementPolicy(max_replicas_per_task=0)


# --- placement by measured load ----------------------------------------------------


def loaded(name: str, load: float, size: int = MB) -> TaskInfo:
    return TaskInfo(name, "minilm", size, load=load)


def test_copies_follow_the_load_up_to_the_cap() -> None:
    policy = PlacementPolicy(copy_load=0.5, max_replicas_per_task=3)
    assert [policy.copies_for(x) for x in (0.0, 0.2, 0.5, 0.51, 1.0, 1.2, 9.0)] == [1, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        PlacementPolicy(copy_load=0)


def test_plan_gives_a_hot_task_replicas_and_packs_cold_tasks_around_it() -> None:
    policy = PlacementPolicy(copy_load=0.5, max_replicas_per_task=3)
    replicas = [replica(r) for r in "abcd"]
    tasks = [loaded("hot", 1.2)] + [loaded(f"c{i}", 0.05) for i in range(12)]
    plan = policy.plan(tasks, replicas)
    holders: dict[str, list[str]] = {}
    for p in plan:
        holders.setdefault(p.task, []).append(p.replica)
    assert len(holders["hot"]) == 3 and len(set(holders["hot"])) == 3  # distinct replicas, 0.4 each
    assert all(len(h) == 1 for t, h in holders.items() if t != "hot")
    planned = {r: 0.0 for r in "abcd"}
    for t, hs in holders.items():
        for h in hs:
            planned[h] += (1.2 if t == "hot" else 0.05) / len(hs)
    # the replica without a hot copy takes most cold tasks: the load evens out (one task's load of slack)
    assert max(planned.values()) - min(planned.values()) <= 0.05 + 1e-9
    spare = next(r for r in "abcd" if r not in holders["hot"])
    assert sum(1 for t, hs in holders.items() if spare in hs) == 9  # 0.45 on every replica
    assert policy.plan(list(reversed(tasks)), replicas) == plan  # deterministic: heaviest first, then by name


def test_plan_respects_bytes_and_slots_and_says_when_a_task_fits_nowhere() -> None:
    policy = PlacementPolicy()
    replicas = [replica("a", budget=3 * MB, slots=16), replica("b", budget=100 * MB, slots=2)]
    plan = policy.plan([loaded(f"t{i}", 0.01) for i in range(5)], replicas)
    per = {r: sum(1 for p in plan if p.replica == r) for r in "ab"}
    assert per == {"a": 3, "b": 2}
    with pytest.raises(PlacementError):
        policy.plan([loaded(f"t{i}", 0.01) for i in range(6)], replicas)


def test_place_prefers_the_replica_with_less_measured_load_over_fewer_tasks() -> None:
    busy = dataclasses.replace(hold(replica("a"), "x"), task_load={"x": 0.9})
    quiet = dataclasses.replace(hold(replica("b"), "y", "z"), task_load={"y": 0.1, "z": 0.1})
    assert POLICY.place(task("new"), [busy, quiet]).replica == "b"
    # no measured load anywhere: fewest tasks, as before
    assert POLICY.place(task("new"), [hold(replica("a"), "x"), hold(replica("b"), "y", "z")]).replica == "a"


def test_rebalance_keeps_the_copies_a_task_s_measured_load_calls_for() -> None:
    policy = PlacementPolicy(hot_load=8, cool_load=2, copy_load=0.5, max_replicas_per_task=3)
    replicas = [hold(replica(r), "t") for r in "ab"] + [replica("c")]
    quiet = {"t": 0.0}  # nothing in flight: the in-flight rule alone would drop a copy
    assert policy.rebalance({"t": loaded("t", 0.0)}, quiet, replicas) == [Release("t", "b")]
    assert policy.rebalance({"t": loaded("t", 0.8)}, quiet, replicas) == []  # its load calls for 2
