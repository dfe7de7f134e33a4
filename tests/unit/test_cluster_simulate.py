"""The cluster simulation: deterministic, conserves work, and obeys memory (pure; no Ray, no Triton)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fmplex.cluster.simulate import Costs, Workload, max_tasks, simulate

GB = 2**30


def test_throughput_interpolates_between_measured_batch_sizes() -> None:
    c = Costs(throughput=((1, 100.0), (16, 320.0)))
    assert c.seqs_per_s(1) == 100.0 and c.seqs_per_s(16) == 320.0 and c.seqs_per_s(64) == 320.0
    assert c.seqs_per_s(8) == pytest.approx(100 + 220 * 7 / 15)
    assert c.batch_seconds(16) == pytest.approx(0.05)


def test_the_same_seed_gives_the_same_run() -> None:
    w = Workload(tasks=40, rate_per_task=3.0, duration_s=8, seed=7)
    a, b = simulate("shared", 2, w), simulate("shared", 2, w)
    assert (a.p99_ms, a.completed, a.replica_load) == (b.p99_ms, b.completed, b.replica_load)
    assert simulate("shared", 2, Workload(tasks=40, rate_per_task=3.0, duration_s=8, seed=8)).completed != a.completed


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_under_capacity_every_offered_request_is_served(mode: str) -> None:
    w = Workload(tasks=30, rate_per_task=2.0, duration_s=30, warmup_s=0)
    r = simulate(mode, 3, w)  # 60 req/s offered, ~300+ seq/s per replica
    assert r.hosted and math.isfinite(r.p99_ms)
    assert sum(r.replica_load) == pytest.approx(60, rel=0.15)


def test_one_copy_per_task_runs_out_of_memory_where_sharing_does_not() -> None:
    big = Costs(device_bytes=80 * GB, backbone_bytes=14 * GB, task_bytes=50 * 2**20)  # 5 copies per GPU
    w = Workload(tasks=11, rate_per_task=0.5, duration_s=5)
    assert not simulate("per_task", 2, w, big).hosted  # 2 GPUs x 5 copies < 11 tasks
    assert simulate("shared", 2, w, big).hosted


def test_sharing_hosts_more_tasks_at_the_same_slo() -> None:
    base = Workload(tasks=1, rate_per_task=2.0, duration_s=8)
    shared = max_tasks("shared", 2, 200.0, base)
    per_task = max_tasks("per_task", 2, 200.0, base)
    assert shared > per_task > 0  # inter-task batching alone is worth more tasks
    big = Costs(device_bytes=80 * GB, backbone_bytes=14 * GB)
    assert max_tasks("per_task", 2, 200.0, base, big) == 10  # memory-bound: 5 copies per GPU


def test_a_trace_is_replayed_request_by_request() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)))  # batch 1: 10 ms
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    # two requests of task 0 at once: the first runs alone (10 ms), the second waits for it (done at 20 ms)
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.0, 0), (1.0, 1)])
    assert r.completed == 3
    assert r.p99_ms == pytest.approx(20.0) and r.p50_ms == pytest.approx(10.0)
    assert r.replica_load == [pytest.approx(2 / 5), pytest.approx(1 / 5)]
    # a per-request overhead outside the replica (the endpoint path) adds to latency, not to the replica's work
    slow = simulate("shared", 2, w, dataclasses.replace(costs, overhead_s=0.005), placement=[0, 1], trace=[(0.0, 0), (0.0, 0), (1.0, 1)])
    assert slow.p99_ms == pytest.approx(25.0) and slow.p50_ms == pytest.approx(15.0) and slow.replica_load == r.replica_load


def test_a_modelled_endpoint_queues_requests_before_the_replicas() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), path_in=(("endpoint", 0.004),))
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    # all arrive at 0; the endpoint passes them at 4, 8 and 12 ms; replicas take 10 ms per request:
    # task 0's first done at 14, task 1's at 18, task 0's second waits for the first: 14 + 10 = 24
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.0, 1), (0.0, 0)])
    assert r.completed == 3 and r.p50_ms == pytest.approx(18.0) and r.p99_ms == pytest.approx(24.0)


def test_servers_on_shared_cpus_slow_each_other_down() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)))  # batch 1: 10 ms of work
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    both = [(0.0, 0), (0.0, 1)]  # one request on each replica at once
    assert simulate("shared", 2, w, costs, placement=[0, 1], trace=both).p99_ms == pytest.approx(10.0)  # a processor each
    one_cpu = dataclasses.replace(costs, cpus=1.0)
    assert simulate("shared", 2, w, one_cpu, placement=[0, 1], trace=both).p99_ms == pytest.approx(20.0)  # half a CPU each
    two_cpus = dataclasses.replace(costs, cpus=2.0)
    assert simulate("shared", 2, w, two_cpus, placement=[0, 1], trace=both).p99_ms == pytest.approx(10.0)
    busy = dataclasses.replace(costs, cpus=2.0, background_cpus=1.0)  # other work takes one of the two
    assert simulate("shared", 2, w, busy, placement=[0, 1], trace=both).p99_ms == pytest.approx(20.0)
    # one request alone never runs faster than one CPU, however many there are
    assert simulate("shared", 2, w, dataclasses.replace(costs, cpus=4.0), placement=[0, 1], trace=[(0.0, 0)]).p99_ms == pytest.approx(10.0)


def test_a_stage_on_the_way_in_and_out_is_one_server() -> None:
    # the client does 2 ms on the way in and 2 ms on the way out, one request at a time
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), path_in=(("client", 0.002),), path_out=(("client", 0.002),))
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0)])
    assert r.p99_ms == pytest.approx(14.0)
    # two at once: in at 2 and 4 ms, replicas done at 12 and 14, out at 14 and 16; a third alone later: 14
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.0, 1), (1.0, 0)])
    assert r.p50_ms == pytest.approx(14.0) and r.p99_ms == pytest.approx(16.0)


def test_placing_by_load_spreads_a_zipf_mix_better_than_by_count() -> None:
    w = Workload(tasks=64, rate_per_task=4.0, duration_s=10)  # the hottest task: ~54 req/s
    by_rate = simulate("shared", 4, w, placing="rate")
    by_count = simulate("shared", 4, w, placing="count")
    assert sum(by_rate.replica_load) == pytest.approx(sum(by_count.replica_load), rel=0.05)
    assert max(by_rate.replica_load) - min(by_rate.replica_load) < max(by_count.replica_load) - min(by_count.replica_load)


def test_other_work_takes_the_cpus_it_took_then() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), cpus=2.0, background_trace=((0.0, 0.0), (0.005, 1.0)))
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    # both replicas run 5 ms of their 10 alone on a CPU each, then share the one CPU left: 5 ms of work in 10 ms
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.0, 1)])
    assert r.p99_ms == pytest.approx(15.0)
    # work off the requests' path takes its CPUs as well: 1.5 CPUs left (3.75 ms of work each by 5 ms),
    # then half a CPU (the other 6.25 ms at a quarter CPU each)
    r = simulate("shared", 2, w, dataclasses.replace(costs, background_cpus=0.5), placement=[0, 1], trace=[(0.0, 0), (0.0, 1)])
    assert r.p99_ms == pytest.approx(5.0 + 25.0)


def test_a_run_says_where_its_time_went_and_how_it_batched() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), path_in=(("client", 0.002),), path_out=(("client", 0.003),), overhead_s=0.001)
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (1.0, 1)])
    assert r.stages["before_replica"] == {"p50": 2.0, "p99": 2.0}
    assert r.stages["at_replica"] == {"p50": 10.0, "p99": 10.0}
    assert r.stages["after_replica"] == {"p50": 4.0, "p99": 4.0}  # the way out and the overhead
    assert r.rows_per_batch == [1.0, 1.0] and r.cpu_wait_s == {}  # dedicated processors: nobody waits for one
    # the work each server was given: a 10 ms batch per replica, and the client's 2 + 3 ms per request
    assert r.work_s == {"0": pytest.approx(0.010), "1": pytest.approx(0.010), "client": pytest.approx(0.010)}
    # three at once on replica 0: the first runs alone (10 ms), the other two queue and then run as one batch
    costs = Costs(throughput=((1, 100.0), (2, 100.0), (16, 320.0)))  # batch 2: 20 ms
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.0, 0), (0.0, 0)])
    assert r.rows_per_batch == [1.5, 0.0]
    # and when the slowest requests arrived: here the two that queued behind a batch a second later
    late = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (1.0, 0), (1.0, 0), (1.0, 0)])
    assert late.slowest_at == [1.0] and late.batch_ms[0] == pytest.approx((10.0 + 10.0 + 20.0) / 3, abs=0.01)
    assert r.stages["at_replica"]["p99"] == pytest.approx(30.0) and r.stages["before_replica"]["p99"] == 0.0


def test_on_shared_cpus_each_server_counts_its_wait_for_a_cpu() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), cpus=1.0)  # two replicas busy at once on one CPU
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.0, 1)])
    assert r.cpu_wait_s == {"0": pytest.approx(0.010), "1": pytest.approx(0.010)}  # 10 ms of work in 20 ms each



def test_a_replicas_workers_run_batches_side_by_side_within_its_cap() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), workers=2, replica_cpus=2.0)  # batch 1: 10 ms of work
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    two = [(0.0, 0), (0.0, 0)]  # two requests for replica 0, one after the other at the same instant
    # the first worker takes the first alone, the second worker the second, side by side, a processor each
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=two)
    assert r.rows_per_batch == [1.0, 0.0] and r.p99_ms == pytest.approx(10.0)
    # batches of one Python process share its interpreter lock (the default cap, one CPU): each takes twice as long
    capped = dataclasses.replace(costs, replica_cpus=1.0)
    r = simulate("shared", 2, w, capped, placement=[0, 1], trace=two)
    assert r.p50_ms == pytest.approx(20.0) and r.rows_per_batch == [1.0, 0.0]
    # on 2 shared CPUs, what a capped replica leaves goes to the other: replica 0's two batches run at half a
    # CPU each (20 ms), replica 1's batch at a whole one (10 ms), though three jobs share two CPUs
    shared = dataclasses.replace(capped, cpus=2.0)
    r = simulate("shared", 2, w, shared, placement=[0, 1], trace=[(0.0, 0), (0.0, 0), (0.0, 1)])
    assert r.p50_ms == pytest.approx(20.0) and sorted(r.cpu_wait_s.values())[0] == pytest.approx(0.0)


def test_a_measured_spread_of_service_times_stretches_batches_by_its_draws() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), service_spread=(2.0,))  # every batch twice its mean
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    assert simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0)]).p99_ms == pytest.approx(20.0)
    mixed = dataclasses.replace(costs, service_spread=(0.5, 1.5))
    r = simulate("shared", 2, w, mixed, placement=[0, 1], trace=[(t / 10, 0) for t in range(20)])
    assert {round(x) for x in (r.p50_ms, r.p99_ms)} <= {5, 15} and r.p99_ms == pytest.approx(15.0)


def test_work_as_bursts_in_one_run_queue() -> None:
    base = Costs(throughput=((1, 100.0), (16, 320.0)), cpus=1.0, bursts=(("replica", 0.0005),))  # 10 ms of work
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    # alone, the bursts add up to the work exactly
    assert simulate("shared", 2, w, base, placement=[0, 1], trace=[(0.0, 0)]).p99_ms == pytest.approx(10.0)
    # two replicas on one CPU: bursts of 0.5 ms take turns, so both end near 20 ms, as with processor sharing
    r = simulate("shared", 2, w, base, placement=[0, 1], trace=[(0.0, 0), (0.0, 1)])
    assert r.p50_ms == pytest.approx(20.0, abs=1.0) and r.p99_ms == pytest.approx(20.0, abs=0.01)
    # each burst joins the queue 0.1 ms after it is ready: about 20 bursts of 0.5 ms, so about 2 ms more
    woken = simulate("shared", 2, w, dataclasses.replace(base, wake_s=0.0001), placement=[0, 1], trace=[(0.0, 0)])
    assert 11.0 <= woken.p99_ms <= 13.5 and woken.cpu_wait_s["0"] == pytest.approx((woken.p99_ms - 10.0) / 1000)
    # other work's bursts take the CPUs they are said to: half of the one CPU, so the 10 ms take about 20
    busy = simulate("shared", 2, dataclasses.replace(w, seed=3), dataclasses.replace(base, background_cpus=0.5, bursts=(("replica", 0.0005), ("background", 0.0005))),
                    placement=[0, 1], trace=[(1.0, 0)])
    assert 14.0 <= busy.p99_ms <= 30.0


def test_an_interleaving_stage_serves_requests_side_by_side() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), path_in=(("proxy", 0.004),))
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    both = [(0.0, 0), (0.0, 1)]
    assert simulate("shared", 2, w, costs, placement=[0, 1], trace=both).p99_ms == pytest.approx(18.0)  # 4 + 4, then 10
    side = simulate("shared", 2, w, dataclasses.replace(costs, interleave_stages=True), placement=[0, 1], trace=both)
    assert side.p99_ms == pytest.approx(14.0)  # a processor each (none shared): both pass in 4 ms


def test_a_replicas_hand_offs_in_and_out_wait_for_the_interpreter_lock_a_batch_holds() -> None:
    costs = Costs(throughput=((1, 100.0), (16, 320.0)), workers=2, replica_cpus=2.0, handoff_s=0.001, gil_wait_s=0.005)
    w = Workload(tasks=2, duration_s=5, warmup_s=0)
    # alone: in (1 ms), its batch (10 ms), out (1 ms); no batch holds the lock on the way in or out
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0)])
    assert r.p99_ms == pytest.approx(12.0) and r.stages["at_replica"]["p99"] == pytest.approx(12.0)
    assert r.work_s["0/in"] == pytest.approx(0.001) and r.work_s["0/out"] == pytest.approx(0.001)
    # a second request 2 ms later finds the first's batch running: 5 ms for the lock, then in (7-8 ms) and its
    # batch (8-18 ms); the first's way out at 11 ms finds the second's batch running: 16-17 ms. Both take 17 ms.
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.002, 0)])
    assert r.p50_ms == pytest.approx(17.0) and r.p99_ms == pytest.approx(17.0)
    # another replica's batch does not hold this one's lock
    r = simulate("shared", 2, w, costs, placement=[0, 1], trace=[(0.0, 0), (0.002, 1)])
    assert r.p99_ms == pytest.approx(12.0)
