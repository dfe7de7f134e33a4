"""Unit tests of the fmplex request scheduler, driven by a simulated clock."""
from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter

import pytest

from fmplex.runtime.scheduler import (BatchBudget, FIFOScheduler, Pending, QueueFull,
                                             Scheduler, TaskPolicy, WFQScheduler, default_cost,
                                             make_scheduler)

STEP = 0.001  # simulated seconds per batch


def rand_req(rng: random.Random, task: str, now: float, **kw) -> Pending:
    return Pending(task, rows=rng.randint(1, 4), tokens=rng.randint(8, 64), arrival=now, **kw)


def top_up(s: Scheduler, rng: random.Random, tasks, depth: int, now: float) -> None:
    for task in tasks:
        while s.queued(task) < depth:
            s.submit(rand_req(rng, task, now), now)


def run_saturated(s: Scheduler, rng: random.Random, tasks, batches: int, now: float = 0.0,
                  depth: int = 32) -> tuple[Counter, float]:
    """Keep every task in ``tasks`` backlogged; return served cost per task."""
    served: Counter = Counter()
    for _ in range(batches):
        top_up(s, rng, tasks, depth, now)
        for r in s.next_batch(now):
            served[r.task] += r.cost
        now += STEP
    return served, now


def assert_shares(served: Counter, weights: dict[str, float], rel: float = 0.05) -> None:
    total, wsum = sum(served.values()), sum(weights.values())
    for task, w in weights.items():
        want = w / wsum
        got = served[task] / total
        assert abs(got - want) <= rel * want, (task, got, want)


def check_budget(batch: list[Pending], budget: BatchBudget) -> None:
    rows = sum(r.rows for r in batch)
    if len(batch) > 1:
        assert rows <= budget.max_rows
        assert rows * max(r.tokens for r in batch) <= budget.max_tokens


# 1 ---------------------------------------------------------------------------
def test_weighted_shares_under_saturation():
    s = make_scheduler()
    weights = {"a": 1.0, "b": 2.0, "c": 4.0}
    for task, w in weights.items():
        s.set_policy(task, TaskPolicy(weight=w))
    served, _ = run_saturated(s, random.Random(1), weights, 2000)
    assert_shares(served, weights)
    st = s.stats()["tasks"]
    for task in weights:  # stats agree with what was returned
        assert st[task]["served_cost"] == pytest.approx(served[task])


# 2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["wfq", "fifo"])
def test_request_rate_does_not_buy_share(policy):
    s = make_scheduler(policy, max_rows=16)
    for task in ("greedy", "polite"):
        s.set_policy(task, TaskPolicy(queue_limit=100_000))
    rng, now, served = random.Random(2), 0.0, Counter()
    for _ in range(1000):  # ~6 requests fit a batch; both send more than their half
        for _ in range(40):
            s.submit(rand_req(rng, "greedy", now), now)
        for _ in range(4):
            s.submit(rand_req(rng, "polite", now), now)
        for r in s.next_batch(now):
            served[r.task] += r.cost
        now += STEP
    st = s.stats()["tasks"]
    assert st["greedy"]["submitted"] == 10 * st["polite"]["submitted"]
    if policy == "wfq":
        assert st["polite"]["queued"] > 0  # stayed backlogged throughout
        assert_shares(served, {"greedy": 1.0, "polite": 1.0})
    else:  # the baseline is what WFQ fixes: volume wins
        assert served["greedy"] / sum(served.values()) > 0.85


# 3 + 4 -----------------------------------------------------------------------
def test_idle_task_banks_no_credit():
    s = make_scheduler()
    rng = random.Random(3)
    _, now = run_saturated(s, rng, ["b"], 500)
    top_up(s, rng, ["a", "b"], 32, now)
    first = s.next_batch(now)
    assert any(r.task == "a" for r in first)  # served at once ...
    served = Counter(r.task for r in first)
    served_cost, _ = run_saturated(s, rng, ["a", "b"], 200, now + STEP)
    for r in first:
        served_cost[r.task] += r.cost
    # ... but no burst: the next 200 batches split evenly, not mostly to "a".
    assert abs(served_cost["a"] - served_cost["b"]) <= 0.05 * served_cost["b"]
    assert served["b"] > 0


def test_idle_system_does_not_penalise_the_last_served_task():
    s = make_scheduler(max_rows=4)
    s.submit(Pending("a", 4, 200, 0.0), 0.0)  # one big request, served alone
    assert len(s.next_batch(0.0)) == 1 and s.queued() == 0
    for _ in range(10):  # system was idle; both return together
        s.submit(Pending("a", 1, 8, 1.0), 1.0)
        s.submit(Pending("b", 1, 8, 1.0), 1.0)
    assert Counter(r.task for r in s.next_batch(1.0)) == {"a": 2, "b": 2}


def test_expired_work_is_not_charged_to_the_task():
    s = make_scheduler(max_rows=4)
    for _ in range(10):
        s.submit(Pending("a", 1, 8, 0.0, deadline=0.5), 0.0)
    assert len(s.expire(0.5)) == 10
    for _ in range(10):
        s.submit(Pending("a", 1, 8, 1.0), 1.0)
        s.submit(Pending("b", 1, 8, 1.0), 1.0)
    assert Counter(r.task for r in s.next_batch(1.0)) == {"a": 2, "b": 2}


@pytest.mark.parametrize("warm_batches", [0, 5])
def test_new_light_task_served_in_next_batch(warm_batches):
    s = make_scheduler()
    s.set_policy("heavy", TaskPolicy(queue_limit=2000))
    for _ in range(1000):
        s.submit(Pending("heavy", rows=4, tokens=64, arrival=0.0), 0.0)
    for i in range(warm_batches):
        assert s.next_batch(i * STEP)
    light = Pending("light", rows=1, tokens=8, arrival=0.01)
    s.submit(light, 0.01)
    assert light in s.next_batch(0.01)


# 5 ---------------------------------------------------------------------------
def test_queue_full_is_immediate():
    s = make_scheduler()
    s.set_policy("t", TaskPolicy(queue_limit=3))
    for _ in range(3):
        s.submit(Pending("t", 1, 8, 0.0), 0.0)
    with pytest.raises(QueueFull, match=r"^task 't' queue is full \(3 requests queued\)$") as e:
        s.submit(Pending("t", 1, 8, 0.0), 0.0)
    assert (e.value.task, e.value.limit) == ("t", 3)
    st = s.stats()["tasks"]["t"]
    assert (st["rejected_full"], st["submitted"], st["queued"]) == (1, 3, 3)
    s.next_batch(0.0)
    s.submit(Pending("t", 1, 8, 0.0), 0.0)  # room again once served


def test_invalid_requests_rejected():
    s = make_scheduler()
    for rows, tokens in [(0, 8), (1, 0)]:
        with pytest.raises(ValueError):
            s.submit(Pending("t", rows, tokens, 0.0), 0.0)
    with pytest.raises(ValueError):
        make_scheduler(cost_fn=lambda r: 0.0).submit(Pending("t", 1, 8, 0.0), 0.0)
    with pytest.raises(ValueError):
        make_scheduler("lottery")
    with pytest.raises(ValueError):
        TaskPolicy(weight=0)
    assert s.queued() == 0


# 6 ---------------------------------------------------------------------------
def test_deadlines_expire_and_are_never_served():
    s = make_scheduler()
    s.set_policy("p", TaskPolicy(deadline_s=1.0))
    r1 = Pending("a", 1, 8, arrival=0.0, deadline=0.5)
    r2 = Pending("a", 1, 8, arrival=0.0, deadline=2.0)
    r3 = Pending("p", 1, 8, arrival=0.2)  # task deadline -> 1.2
    r4 = Pending("p", 1, 8, arrival=0.1, deadline=0.8)  # own deadline is earlier
    r5 = Pending("b", 1, 8, arrival=0.0)  # no deadline
    for r in (r1, r2, r3, r4, r5):
        s.submit(r, r.arrival)
    assert s.next_wakeup(0.3) == 0.5
    assert s.expire(0.49) == []
    assert s.expire(0.5) == [r1]
    assert s.next_wakeup(0.5) == 0.8
    assert s.expire(1.0) == [r4]
    assert s.next_wakeup(1.0) == pytest.approx(1.2)
    batch = s.next_batch(1.3)  # r3 expired meanwhile: not served, reported later
    assert set(batch) == {r2, r5}
    assert s.next_wakeup(1.3) == 1.3  # an expired request awaits expire()
    assert s.expire(1.3) == [r3]
    assert s.next_wakeup(5.0) is None  # r2 was served: its deadline is gone
    st = s.stats()["tasks"]
    assert (st["a"]["expired"], st["p"]["expired"], st["b"]["expired"]) == (1, 2, 0)


# 7 ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["wfq", "fifo"])
def test_batches_respect_budget(policy):
    budget = dict(max_rows=32, max_tokens=2048, max_lag=500.0)
    s = make_scheduler(policy, **budget)
    rng, now, sizes = random.Random(7), 0.0, Counter()
    for _ in range(1500):
        for task in "abcd":
            while s.queued(task) < 8:
                s.submit(Pending(task, rng.randint(1, 8), rng.choice([16, 32, 64, 128]), now,
                                 batch_key=rng.choice("xy")), now)
        batch = s.next_batch(now)
        assert batch
        check_budget(batch, s.budget)
        sizes[len(batch)] += 1
        now += STEP
    assert len(sizes) > 3  # the property ran over varied batches


def test_oversized_request_served_alone():
    s = make_scheduler(max_rows=16, max_tokens=1024)
    rng = random.Random(8)
    huge = [Pending("big", rows=20, tokens=8, arrival=0.0),  # too many rows
            Pending("big", rows=2, tokens=1000, arrival=0.0)]  # too much volume
    for r in huge:
        s.submit(r, 0.0)
    seen = []
    for i in range(200):
        top_up(s, rng, ["small"], 16, i * STEP)
        batch = s.next_batch(i * STEP)
        check_budget(batch, s.budget)
        seen += [(r, len(batch)) for r in batch if r in huge]
    assert [r for r, _ in seen] == huge and all(n == 1 for _, n in seen)


def keyed_setup(max_lag: float) -> Scheduler:
    """Two tasks, each its own length bucket, submitted interleaved."""
    s = make_scheduler(max_rows=16, max_tokens=100_000, max_lag=max_lag)
    for _ in range(100):
        s.submit(Pending("a", 1, 16, 0.0, batch_key="short"), 0.0)  # cost 24
        s.submit(Pending("b", 1, 64, 0.0, batch_key="long"), 0.0)  # cost 72
    return s


def test_batch_key_preference_within_lag():
    s = keyed_setup(max_lag=10_000.0)
    cost = Counter()
    for i in range(8):
        batch = s.next_batch(i * STEP)
        assert len(batch) == 16
        assert len({r.batch_key for r in batch}) == 1  # homogeneous
        for r in batch:
            cost[r.task] += r.cost
        # ... yet fair: the tasks stay within about one batch of each other.
        assert abs(cost["a"] - cost["b"]) <= 16 * 72 + 16 * 24
    assert cost["a"] and cost["b"]


def test_zero_lag_is_strict_finish_order():
    s = keyed_setup(max_lag=0.0)
    queued = sorted((r for t in ("a", "b") for r in s._tasks[t].queue),
                    key=lambda r: r.finish_tag)
    batch = s.next_batch(0.0)
    assert batch == queued[:16]
    assert len({r.batch_key for r in batch}) == 2  # mixed: no reordering for batching


def test_blocked_task_keeps_fifo_and_others_fill():
    s = make_scheduler(max_rows=8, max_tokens=10_000)
    r_a1, r_a2 = Pending("a", 4, 8, 0.0), Pending("a", 6, 8, 0.0)
    smalls = [Pending("b", 1, 8, 0.0) for _ in range(4)]
    s.submit(r_a1, 0.0)
    s.submit(r_a2, 0.0)
    for r in smalls:
        s.submit(r, 0.0)
    batch = s.next_batch(0.0)
    assert r_a1 in batch and r_a2 not in batch  # a2 does not fit after a1 ...
    assert sum(r.rows for r in batch) == 8  # ... but b's requests fill the room


# 8 ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["wfq", "fifo"])
def test_every_request_answered_exactly_once(policy):
    s = make_scheduler(policy, max_rows=16, max_tokens=1024, max_queue_delay_s=0.002)
    rng, now = random.Random(11), 0.0
    submitted, answered = [], Counter()
    for task in "abcde":
        s.set_policy(task, TaskPolicy(weight=rng.choice([1, 2, 3]), queue_limit=20,
                                      deadline_s=rng.choice([None, 0.01, 0.05])))
    for step in range(3000):
        op = rng.random()
        task = rng.choice("abcdef")
        if op < 0.6:
            r = rand_req(rng, task, now, deadline=rng.choice([None, now + rng.random() * 0.03]))
            try:
                s.submit(r, now)
                submitted.append(r)
            except QueueFull:
                pass
        elif op < 0.85:
            batch = s.next_batch(now)
            check_budget(batch, s.budget)
            answered.update(id(r) for r in batch)
        elif op < 0.97:
            answered.update(id(r) for r in s.expire(now))
        else:
            answered.update(id(r) for r in s.remove_task(task))
        if step % 500 == 0:  # counters conserved per task
            for st in s.stats()["tasks"].values():
                assert st["submitted"] == (st["served_requests"] + st["expired"]
                                           + st["removed"] + st["queued"])
        now += rng.random() * 0.002
    answered.update(id(r) for r in s.drain())
    assert s.queued() == 0 and s.next_batch(now) == [] and s.expire(now + 10) == []
    assert set(answered) == {id(r) for r in submitted}
    assert all(n == 1 for n in answered.values())


# 9 ---------------------------------------------------------------------------
def test_weight_change_applies_to_new_submissions():
    s = make_scheduler()
    rng = random.Random(9)
    _, now = run_saturated(s, rng, ["a", "b"], 200)
    queued_before = [(r, r.finish_tag) for r in s._tasks["a"].queue]
    s.set_policy("a", TaskPolicy(weight=3.0))
    assert all(r.finish_tag == tag for r, tag in queued_before)  # queued keep their tags
    new = Pending("a", 2, 16, now)
    s.submit(new, now)
    assert new.finish_tag - new.start_tag == pytest.approx(new.cost / 3.0)
    _, now = run_saturated(s, rng, ["a", "b"], 100, now)  # old tags drain out
    served, _ = run_saturated(s, rng, ["a", "b"], 1500, now)
    assert_shares(served, {"a": 3.0, "b": 1.0})
    assert s.stats()["tasks"]["a"]["weight"] == 3.0


# 10 --------------------------------------------------------------------------
def test_fifo_serves_in_arrival_order_regardless_of_weights():
    s = make_scheduler("fifo", max_rows=8)
    assert isinstance(s, FIFOScheduler)
    s.set_policy("heavy", TaskPolicy(weight=100.0))
    rng = random.Random(10)
    order = []
    for i in range(300):
        r = Pending(rng.choice(["light", "heavy", "other"]), rng.randint(1, 3), 16, i * 1e-4)
        s.submit(r, r.arrival)
        order.append(r)
    served = []
    while s.queued():
        served += s.next_batch(1.0)
    assert served == order
    assert isinstance(make_scheduler(), WFQScheduler)


# 11 --------------------------------------------------------------------------
def test_max_queue_delay_waits_for_a_fuller_batch():
    s = make_scheduler(max_rows=8, max_queue_delay_s=0.005)
    r1 = Pending("a", 2, 16, arrival=1.0)
    s.submit(r1, 1.0)
    assert s.next_batch(1.0) == []
    assert s.next_wakeup(1.0) == pytest.approx(1.005)
    r2 = Pending("b", 2, 16, arrival=1.003)
    s.submit(r2, 1.003)
    assert s.next_batch(1.004) == []  # oldest still younger than the delay
    assert s.next_wakeup(1.004) == pytest.approx(1.005)  # measured from the oldest
    assert s.next_batch(1.005) == [r1, r2]
    assert s.next_wakeup(1.005) is None
    # A full batch goes at once, without waiting.
    for _ in range(5):
        s.submit(Pending("a", 2, 16, arrival=2.0), 2.0)
    assert sum(r.rows for r in s.next_batch(2.0)) == 8


def test_default_cost_model():
    assert default_cost(Pending("t", rows=3, tokens=10, arrival=0.0)) == 3 * (10 + 8)
    s = make_scheduler(cost_fn=lambda r: 5.0)
    r = Pending("t", 1, 8, 0.0)
    s.submit(r, 0.0)
    assert (r.cost, r.finish_tag) == (5.0, 5.0)


# share cap ---------------------------------------------------------------------
def _flood_and_light(share_cap: bool):
    s = make_scheduler(max_rows=64, max_tokens=1 << 20, share_cap=share_cap)
    for task in ("flood", "light"):
        s.set_policy(task, TaskPolicy(queue_limit=10_000))
    for _ in range(50):
        s.submit(Pending("flood", rows=8, tokens=16, arrival=0.0), 0.0)
    first = s.next_batch(0.0)  # only the flood is queued: a full batch
    s.submit(Pending("light", rows=1, tokens=16, arrival=0.0), 0.0)
    second = s.next_batch(0.0)
    return first, second


def test_light_task_batch_is_not_stretched_by_a_flood():
    first, second = _flood_and_light(share_cap=True)
    assert sum(r.rows for r in first) == 64  # work-conserving while alone
    assert [r.task for r in second].count("light") == 1
    flood_rows = sum(r.rows for r in second if r.task == "flood")
    assert flood_rows <= 32, f"the flood took {flood_rows} rows of the light task's batch"


def test_share_cap_can_be_switched_off():
    _, second = _flood_and_light(share_cap=False)
    assert sum(r.rows for r in second if r.task == "flood") == 56  # fills the batch


# --- batch growth under saturation --------------------------------------------------

def _one_row(task: str, now: float = 0.0) -> Pending:
    return Pending(task, rows=1, tokens=16, arrival=now)


@pytest.mark.parametrize("cls", [WFQScheduler, FIFOScheduler])
def test_batches_grow_under_saturation_split_over_workers(cls) -> None:
    s = cls(BatchBudget(max_rows=16, max_tokens=16 * 64, saturated_rows=64, parallel=2))
    for i in range(200):  # four equal tasks, each far beyond its share of a 16-row batch
        s.submit(_one_row(f"t{i % 4}"), 0.0)
    sizes = []
    for _ in range(3):  # each batch runs and is reported back before the next is taken
        batch = s.next_batch(0.0)
        sizes.append(len(batch))
        s.finished(batch)
    # rows = min(64, (queued + in flight) // 2): 64 while 128+ rows wait, then half of what is left
    assert sizes == [64, 64, 36]
    assert s.stats()["global"]["queued_rows"] == 200 - 164
    assert s.stats()["global"]["inflight_rows"] == 0


@pytest.mark.parametrize("cls", [WFQScheduler, FIFOScheduler])
def test_a_worker_whose_peer_is_busy_takes_what_waits(cls) -> None:
    s = cls(BatchBudget(max_rows=16, max_tokens=16 * 64, saturated_rows=64, parallel=2))
    for i in range(96):
        s.submit(_one_row(f"t{i % 4}"), 0.0)
    first = s.next_batch(0.0)  # 96 in the system, 2 workers: 48 each
    assert len(first) == 48
    # the peer still runs its 48: this worker takes all 48 that wait, not
    # half of them (queued // workers would leave it 24 and the rest waiting)
    second = s.next_batch(0.0)
    assert len(second) == 48
    assert s.stats()["global"]["inflight_rows"] == 96
    s.finished(first)
    s.finished(second)
    for i in range(40):  # both workers idle again: 40 rows are split, one share each
        s.submit(_one_row(f"t{i % 4}"), 1.0)
    assert len(s.next_batch(1.0)) == 20


def test_growth_stops_while_a_light_task_waits() -> None:
    s = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64, saturated_rows=64, parallel=1))
    for _ in range(100):
        s.submit(_one_row("heavy"), 0.0)
    s.submit(_one_row("light"), 0.0)  # one row: less than its share (8) of a 16-row batch
    batch = s.next_batch(0.0)
    assert len(batch) <= 16 and "light" in {r.task for r in batch}  # small, and it carries the light request
    # light served and nothing of it queued: a closed-loop client between two
    # requests, so batches stay small for light_window_s (1 s by default) ...
    assert len(s.next_batch(0.5)) == 16
    s.submit(_one_row("light", 0.6), 0.6)  # ... and its next request rides the next small batch
    assert "light" in {r.task for r in s.next_batch(0.6)}
    assert len(s.next_batch(1.7)) == 64  # quiet for the window: only the heavy task is left, the batch grows again


def test_a_heavy_task_that_emptied_its_queue_does_not_stop_growth() -> None:
    s = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64, saturated_rows=64, parallel=1))
    for i in range(60):  # "a" gets its whole queue (30 rows, far over its share) into one batch
        s.submit(_one_row("a" if i < 30 else "b"), 0.0)
    assert len(s.next_batch(0.0)) == 60  # 60 // 1 worker; both tasks heavy
    for _ in range(100):
        s.submit(_one_row("b"), 0.1)
    assert len(s.next_batch(0.1)) == 64  # "a" is served and quiet, but it was heavy: growth goes on


def test_no_growth_without_saturation_or_when_off() -> None:
    on = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64, saturated_rows=64, parallel=2))
    off = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64))
    for s in (on, off):
        for i in range(100):
            s.submit(_one_row(f"t{i % 2}"), 0.0)
    assert len(off.next_batch(0.0)) == 16  # saturated_rows 0: fixed batches
    assert len(on.next_batch(0.0)) == 50  # 100 queued // 2 workers
    light = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64, saturated_rows=64, parallel=2))
    for _ in range(20):
        light.submit(_one_row("t"), 0.0)
    assert len(light.next_batch(0.0)) == 16  # 20 // 2 = 10 < max_rows: never below max_rows, never above what waits


def test_growth_keeps_weighted_shares() -> None:
    rng = random.Random(7)
    s = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64 * 4, saturated_rows=64, parallel=2))
    weights = {"a": 1.0, "b": 2.0, "c": 4.0}
    for t, w in weights.items():
        s.set_policy(t, TaskPolicy(weight=w, queue_limit=10_000))
    served, _ = run_saturated(s, rng, list(weights), batches=600, depth=64)
    assert_shares(served, weights)
    assert max(s.batch_rows) <= 16  # unequal weights: no growth
    equal = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64 * 4, saturated_rows=64, parallel=2))
    served, _ = run_saturated(equal, rng, ["a", "b", "c"], batches=200, depth=64)
    assert_shares(served, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert max(equal.batch_rows) > 16  # equal weights: batches grow


def closed_loop(s: Scheduler, clients: dict[str, int], workers: int = 2, seconds: float = 60.0,
                batch_s: tuple[float, float] = (0.004, 0.0045), think_s: float = 0.002) -> Counter:
    """Rows served per task with ``clients[task]`` closed-loop one-row clients and
    ``workers`` workers, a batch taking ``fixed + per_row * rows`` seconds and a
    client resubmitting ``think_s`` after its answer: the shape of the
    benchmarks' saturated runs, where every answer brings the next request."""
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    for task, n in clients.items():
        for _ in range(n):
            heapq.heappush(events, (0.0, next(seq), "submit", task))
    idle = workers
    served: Counter = Counter()
    while events:
        now, _, kind, what = heapq.heappop(events)
        if now > seconds:
            break
        if kind == "submit":
            s.submit(_one_row(str(what), now), now)
        else:  # a batch finished: answers go out, the worker is free
            s.finished(what)  # type: ignore[arg-type]
            idle += 1
            for r in what:  # type: ignore[attr-defined]
                if now > seconds / 4:  # after the start-up
                    served[r.task] += 1
                heapq.heappush(events, (now + think_s, next(seq), "submit", r.task))
        while idle:
            batch = s.next_batch(now)
            if not batch:
                break
            idle -= 1
            heapq.heappush(events, (now + batch_s[0] + batch_s[1] * len(batch), next(seq), "done", batch))
    return served


def test_growth_keeps_weighted_shares_with_closed_loop_clients() -> None:
    """Grown batches large enough to take every queued request would serve each
    task as fast as its clients send, so weights would stop mattering: 32
    clients per task at 1:2:4 were served 31/34/34% with growth. Unequal
    weights keep max_rows batches, so shares follow the weights."""
    s = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64 * 4, saturated_rows=64, parallel=2))
    weights = {"a": 1.0, "b": 2.0, "c": 4.0}
    for t, w in weights.items():
        s.set_policy(t, TaskPolicy(weight=w, queue_limit=10_000))
    served = closed_loop(s, {t: 32 for t in weights})
    assert_shares(served, weights, rel=0.05)


def test_growth_with_closed_loop_equal_tasks_runs_large_batches() -> None:
    s = WFQScheduler(BatchBudget(max_rows=16, max_tokens=16 * 64 * 4, saturated_rows=64, parallel=2))
    served = closed_loop(s, {f"t{i}": 48 for i in range(4)})
    assert_shares(served, {f"t{i}": 1.0 for i in range(4)}, rel=0.05)
    rows = sum(k * n for k, n in s.batch_rows.items()) / sum(s.batch_rows.values())
    assert rows >= 40, rows  # 192 clients, 2 workers: about 64 rows in each batch and 64 waiting
