"""The autoscaling policy on recorded and simulated metric series; the collector
on Prometheus text as Triton 2.51 writes it; the loop with injected I/O.

Most series come from a small fluid model of one stage (arrivals, a service
time per request, a backlog that grows when arrivals exceed what the
instances can serve), run in closed loop with the policy: each decision takes
effect by the next sample, as ``fmplex autoscale`` applies it.
"""

from __future__ import annotations

import random
from typing import Callable

import pytest

from fmplex.control import autoscale as a
from fmplex.control.autoscale import Bounds, PolicyConfig, Sample, StagePolicy

DT = 5.0  # seconds between polls
S = 0.05  # service seconds per request


def simulate(
    rate: Callable[[float], float],
    seconds: float,
    bounds: Bounds,
    n0: int = 1,
    config: PolicyConfig = PolicyConfig(),
    service: float = S,
) -> tuple[list[Sample], list[a.Decision]]:
    policy = StagePolicy("stage", bounds, config)
    n, backlog, t = n0, 0.0, 0.0
    samples, decisions = [], []
    while t < seconds:
        t += DT
        lam = max(0.0, rate(t))
        capacity = n / service * DT
        served = min(lam * DT + backlog, capacity)
        backlog = backlog + lam * DT - served
        s = Sample(t, n, lam, service if served else None, backlog, served * service / DT)
        d = policy.observe(s)
        samples.append(s)
        decisions.append(d)
        n = d.desired
    return samples, decisions


def changes(decisions: list[a.Decision]) -> list[tuple[float, int, int]]:
    return [(i * DT + DT, d.current, d.desired) for i, d in enumerate(decisions) if d.change]


# --- policy ---------------------------------------------------------------------


def test_burst_scales_up_within_two_intervals_several_steps_at_once() -> None:
    burst_at = 120.0
    rate = lambda t: 8.0 if t <= burst_at else 60.0  # noqa: E731 - load 0.4 -> 3.0 instances of work
    _, ds = simulate(rate, 300, Bounds(1, 8))
    ups = [(t, cur, new) for t, cur, new in changes(ds) if new > cur]
    assert ups, "never scaled up"
    t, cur, new = ups[0]
    assert burst_at < t <= burst_at + 2 * DT  # within one or two intervals
    assert new - cur >= 3  # straight to what the load needs, not one step per poll
    final = ds[-1].desired
    assert final == 5  # 3.0 instances of work at the 0.6 target -> 5, reached and held
    assert all(new > cur for _, cur, new in changes(ds))  # no step down while the burst lasts


def test_a_single_deep_queue_sample_scales_up_at_once() -> None:
    policy = StagePolicy("stage", Bounds(1, 4))
    assert not policy.observe(Sample(5, 1, 5.0, S, 0.0, 0.25)).change
    d = policy.observe(Sample(10, 1, 5.0, S, 80.0, 1.0))  # 80 queued on one instance
    assert d.desired > 1 and "queue burst" in d.reason


def test_one_hot_sample_alone_does_not_scale_up() -> None:
    policy = StagePolicy("stage", Bounds(1, 4))
    calm, hot = (5.0, 0.0, 0.25), (24.0, 20.0, 1.0)  # arrivals/s, queue, busy: overloaded, 1 s of queue
    for t, (lam, q, busy), up in [(5, calm, 0), (10, hot, 0), (15, calm, 0), (20, hot, 0), (25, hot, 1)]:
        d = policy.observe(Sample(t, 1, lam, S, q, busy))
        assert (d.change > 0) == bool(up), (t, d)  # two hot samples in a row, not one


def test_hot_without_a_queue_must_last() -> None:
    """Running at 0.95 with no queue harms no latency yet: it must last about
    load_tau_s before it scales (noise cannot trigger it); an overload is
    answered within two intervals (see the burst test)."""
    policy = StagePolicy("stage", Bounds(1, 4))
    policy.observe(Sample(5, 1, 8.0, S, 0.0, 0.4))
    first_up = next(t for t in range(10, 200, 5) if policy.observe(Sample(t, 1, 19.0, S, 0.0, 0.95)).change)
    assert 15 <= first_up <= 10 + 3 * PolicyConfig().load_tau_s


def test_load_drop_scales_down_only_after_window_and_cooldown_one_step_at_a_time() -> None:
    cfg = PolicyConfig()
    drop_at = 600.0
    rate = lambda t: 60.0 if t <= drop_at else 4.0  # noqa: E731
    _, ds = simulate(rate, 1500, Bounds(1, 8), config=cfg)
    downs = [(t, cur, new) for t, cur, new in changes(ds) if new < cur]
    assert [cur - new for _, cur, new in downs] == [1] * len(downs)  # one step at a time
    assert downs[0][0] >= drop_at + cfg.down_window_s  # not before a sustained low period
    for (t1, _, _), (t2, _, _) in zip(downs, downs[1:]):
        assert t2 - t1 >= cfg.down_cooldown_s  # cooldown between steps
    assert ds[-1].desired == 1  # 0.2 instances of work: back to the minimum in the end
    assert [cur for _, cur, _ in downs] == [5, 4, 3, 2]


def test_bounds_are_respected() -> None:
    _, ds = simulate(lambda t: 500.0, 200, Bounds(1, 3))  # 25 instances of work
    assert max(d.desired for d in ds) == 3
    assert all(1 <= d.desired <= 3 for d in ds)
    _, ds = simulate(lambda t: 0.0, 400, Bounds(2, 5), n0=1)  # idle, but min 2
    assert ds[0].desired == 2 and all(d.desired == 2 for d in ds)
    _, ds = simulate(lambda t: 100.0, 60, Bounds(1, 3), n0=6)  # above max: back within bounds at once
    assert ds[0].desired == 3 and "bounds" in ds[0].reason


def test_idle_stage_drifts_to_its_minimum_without_service_times() -> None:
    _, ds = simulate(lambda t: 0.0, 600, Bounds(1, 4), n0=4)
    assert ds[-1].desired == 1
    assert [cur - new for _, cur, new in changes(ds)] == [1, 1, 1]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mean_rate,n0", [(12.0, 1), (24.0, 2), (36.0, 3), (60.0, 5)])
def test_noisy_flat_load_at_the_right_size_never_moves(seed: int, mean_rate: float, n0: int) -> None:
    """Utilisation 0.6 (the target) with +-20% noise on every 5-s sample: an hour, no change."""
    rng = random.Random(seed)
    rate = lambda t: mean_rate * (1 + 0.2 * rng.gauss(0, 1))  # noqa: E731
    _, ds = simulate(rate, 3600, Bounds(1, 8), n0=n0)
    assert changes(ds) == []


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("mean_rate,n0", [(12.0, 1), (16.0, 1), (36.0, 3), (40.0, 2), (60.0, 5)])
def test_very_noisy_or_missized_load_does_not_flap(seed: int, mean_rate: float, n0: int) -> None:
    """+-30% noise, some starting too small: it may settle (an overshoot is
    trimmed slowly), but never goes back up after going down, and holds each
    count for at least the cooldown."""
    rng = random.Random(seed)
    rate = lambda t: mean_rate * (1 + 0.3 * rng.gauss(0, 1))  # noqa: E731
    _, ds = simulate(rate, 3600, Bounds(1, 8), n0=n0)
    moves = changes(ds)
    assert len(moves) <= 4, moves
    ups = [t for t, cur, new in moves if new > cur]
    downs = [t for t, cur, new in moves if new < cur]
    assert not downs or not ups or max(ups) < min(downs), moves  # up..., then down...: no flapping
    for (t1, _, _), (t2, _, _) in zip(moves, moves[1:]):
        assert t2 - t1 >= PolicyConfig().down_cooldown_s


def test_recorded_series_replay() -> None:
    """A series as ``fmplex autoscale --dry-run`` records it (2-s polls, the
    instances as recorded): a ramp into overload, a plateau and a quiet tail."""
    recorded = [
        Sample(2, 1, 3.1, 0.012, 0, 0.04),
        Sample(4, 1, 40.5, 0.011, 0, 0.45),
        Sample(6, 1, 97.0, 0.010, 30, 1.0),  # overloaded: the queue grows
        Sample(8, 1, 99.2, 0.010, 62, 1.0),  # second hot sample, 0.6 s of queue: scale up
        Sample(10, 2, 98.4, 0.010, 0, 0.98),
        Sample(12, 2, 97.9, 0.010, 0, 0.98),
    ] + [Sample(12 + 2 * i, 2, 2.0, 0.012, 0, 0.02) for i in range(1, 60)]
    cfg = PolicyConfig(down_window_s=30.0, down_cooldown_s=30.0)
    ds = a.replay("fm.minilm", recorded, Bounds(1, 4), cfg, follow=False)
    assert [d.change for d in ds[:3]] == [0, 0, 0]
    assert ds[3].desired >= 2 and ds[3].needed is not None and ds[3].needed > 1.6  # ~1 instance of work at 0.6
    assert not any(d.change for d in ds[4:6])
    first_down = next(i for i, d in enumerate(ds) if d.change < 0)
    assert recorded[first_down].t - 12 >= 30.0  # after the quiet window
    assert ds[first_down].desired == 1


def test_workers_per_instance_count_as_capacity() -> None:
    """An fmplex host runs one batch per worker at once: busy 1.6 s/s on one
    2-worker instance is 0.8 utilisation, not 1.6; sizing counts workers too."""
    policy = StagePolicy("stage", Bounds(1, 8))
    for t in (5, 10, 15):
        assert not policy.observe(Sample(t, 1, 32.0, S, 0.0, 1.6, workers=2)).change
    hot = [policy.observe(Sample(t, 1, 60.0, S, 30.0, 2.0, workers=2)) for t in (20, 25)]  # overloaded, 0.75 s queued per worker
    assert hot[0].utilization == pytest.approx(1.5) and hot[-1].desired >= 2
    # The same load on one-worker instances needs about twice the instances.
    single = StagePolicy("stage", Bounds(1, 8))
    for t in (5, 10, 15):
        single.observe(Sample(t, 1, 32.0, S, 0.0, 1.0))
    one = [single.observe(Sample(t, 1, 60.0, S, 60.0, 1.0)) for t in (20, 25)][-1]
    assert one.desired > hot[-1].desired


def test_workers_per_instance_from_the_host_config() -> None:
    from fmplex.control.scale import workers_per_instance

    def cfg(**params: str) -> dict:
        return {"parameters": {k: {"string_value": v} for k, v in params.items()}}

    assert workers_per_instance(cfg(workers="3")) == 3
    assert workers_per_instance(cfg()) == 1  # not an fmplex host: one execute at a time
    assert workers_per_instance(cfg(workers="auto", device="cuda:0")) == 1
    import os

    assert workers_per_instance(cfg(workers="auto")) == max(1, min(len(os.sched_getaffinity(0)), 4))


def test_policy_config_validation() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(down_utilization=0.7, target_utilization=0.6)
    with pytest.raises(ValueError):
        PolicyConfig(up_samples=0)
    with pytest.raises(ValueError):
        Bounds(0, 2)
    with pytest.raises(ValueError):
        Bounds(3, 2)


def test_parse_stages() -> None:
    stages = a.parse_stages(["fm.minilm:1:3", "fm.llava.encode"], Bounds(1, 2))
    assert stages == {"fm.minilm": Bounds(1, 3), "fm.llava.encode": Bounds(1, 2)}
    for bad in ["fm.minilm:1", ":1:2", "x:a:b", "x:0:2", "x:3:1"]:
        with pytest.raises(ValueError):
            a.parse_stages([bad])
    with pytest.raises(ValueError, match="twice"):
        a.parse_stages(["x", "x:1:2"])


# --- collector ---------------------------------------------------------------------

# Trimmed from Triton 2.51's /metrics while an fmplex MiniLM host served one vFM.
METRICS_0 = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="sentiment",version="1"} 100
nv_inference_request_success{model="fm.minilm",version="1"} 100
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="fm.minilm",version="1"} 100
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="fm.minilm",version="1"} 9000
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="fm.minilm",version="1"} 30000
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="fm.minilm",version="1"} 0
# HELP fmplex_task_received_total requests that reached the host, per task ('-': slot unresolved)
# TYPE fmplex_task_received_total counter
fmplex_task_received_total{host="fm.minilm",task="sentiment"} 90
fmplex_task_received_total{host="fm.minilm",task="topic"} 10
# TYPE fmplex_task_served_requests_total counter
fmplex_task_served_requests_total{host="fm.minilm",task="sentiment"} 88
fmplex_task_served_requests_total{host="fm.minilm",task="topic"} 10
# TYPE fmplex_task_queue_depth gauge
fmplex_task_queue_depth{host="fm.minilm",task="sentiment"} 2
fmplex_task_queue_depth{host="fm.minilm",task="topic"} 0
# TYPE fmplex_batch_seconds_total counter
fmplex_batch_seconds_total{host="fm.minilm"} 1.5
"""


def test_collector_prefers_the_host_metrics() -> None:
    prev = a.Snapshot(10.0, a.parse_prometheus(METRICS_0))
    text = METRICS_0.replace('task="sentiment"} 90', 'task="sentiment"} 290').replace('task="topic"} 10\n# TYPE fmplex_task_served', 'task="topic"} 30\n# TYPE fmplex_task_served')
    text = text.replace('served_requests_total{host="fm.minilm",task="sentiment"} 88', 'served_requests_total{host="fm.minilm",task="sentiment"} 280')
    text = text.replace('queue_depth{host="fm.minilm",task="sentiment"} 2', 'queue_depth{host="fm.minilm",task="sentiment"} 7')
    text = text.replace("fmplex_batch_seconds_total{host=\"fm.minilm\"} 1.5", "fmplex_batch_seconds_total{host=\"fm.minilm\"} 3.5")
    cur = a.Snapshot(20.0, a.parse_prometheus(text))
    s = a.stage_sample("fm.minilm", prev, cur, instances=2)
    assert s is not None
    assert s.arrivals_per_s == pytest.approx((290 + 30 - 100) / 10)  # fmplex_task_received_total
    assert s.service_s == pytest.approx(2.0 / (280 - 88))  # batch seconds per served request
    assert s.busy_s_per_s == pytest.approx(0.2)
    assert s.queue_depth == 7 and s.instances == 2 and s.t == 20.0


def test_collector_falls_back_to_triton_metrics() -> None:
    plain = "\n".join(ln for ln in METRICS_0.splitlines() if not ln.startswith("fmplex_"))
    later = plain.replace('nv_inference_request_success{model="fm.minilm",version="1"} 100', 'nv_inference_request_success{model="fm.minilm",version="1"} 300')
    later = later.replace("compute_infer_duration_us{model=\"fm.minilm\",version=\"1\"} 30000", "compute_infer_duration_us{model=\"fm.minilm\",version=\"1\"} 2030000")
    later = later.replace("queue_duration_us{model=\"fm.minilm\",version=\"1\"} 9000", "queue_duration_us{model=\"fm.minilm\",version=\"1\"} 409000")
    s = a.stage_sample("fm.minilm", a.Snapshot(0, a.parse_prometheus(plain)), a.Snapshot(4, a.parse_prometheus(later)), 1)
    assert s is not None
    assert s.arrivals_per_s == pytest.approx(50.0)
    assert s.service_s == pytest.approx(0.01)  # 2 s compute over 200 requests
    assert s.queue_depth == pytest.approx(50.0 * 0.002)  # Little's law: 2 ms mean queue time
    assert s.busy_s_per_s is None


def test_collector_unknown_stage_and_counter_reset() -> None:
    snap = a.Snapshot(0, a.parse_prometheus(METRICS_0))
    assert a.stage_sample("fm.other", snap, a.Snapshot(5, snap.series), 1) is None
    # The host reloaded: its counters restarted below the previous scrape.
    reset = METRICS_0.replace('task="sentiment"} 90', 'task="sentiment"} 5').replace('task="topic"} 10\n# TYPE fmplex_task_served', 'task="topic"} 0\n# TYPE fmplex_task_served')
    s = a.stage_sample("fm.minilm", snap, a.Snapshot(5, a.parse_prometheus(reset)), 1)
    assert s is not None and s.arrivals_per_s == pytest.approx(1.0)  # 5 new requests in 5 s, not negative


def test_collector_reads_multimodal_stage_hosts() -> None:
    """The encoder stage (Triton's dynamic batcher) and the LM stage publish
    fmplex_mm_* metrics labelled host=<stage>."""
    def text(n_enc: int, enc_s: float, n_lm: int, ok: int, pre: float, dec: float) -> str:
        return "\n".join([
            f'nv_inference_request_success{{model="fm.llava-tiny.encode",version="1"}} {n_enc}',
            f'fmplex_mm_encode_seconds_total{{host="fm.llava-tiny.encode"}} {enc_s}',
            f'nv_inference_request_success{{model="fm.llava-tiny.lm",version="1"}} {n_lm}',
            f'fmplex_task_responses_total{{host="fm.llava-tiny.lm",task="vqa",outcome="ok"}} {ok}',
            'fmplex_task_responses_total{host="fm.llava-tiny.lm",task="vqa",outcome="invalid"} 3',
            f'fmplex_mm_prefill_seconds_total{{host="fm.llava-tiny.lm",task="vqa"}} {pre}',
            f'fmplex_mm_decode_seconds_total{{host="fm.llava-tiny.lm",task="vqa"}} {dec}',
        ])

    prev = a.Snapshot(0, a.parse_prometheus(text(10, 0.5, 10, 7, 1.0, 4.0)))
    cur = a.Snapshot(10, a.parse_prometheus(text(110, 2.5, 30, 27, 2.0, 9.0)))
    enc = a.stage_sample("fm.llava-tiny.encode", prev, cur, 1)
    lm = a.stage_sample("fm.llava-tiny.lm", prev, cur, 2)
    assert enc is not None and lm is not None
    assert enc.arrivals_per_s == pytest.approx(10.0) and enc.service_s == pytest.approx(0.02)
    assert enc.busy_s_per_s == pytest.approx(0.2)
    assert lm.arrivals_per_s == pytest.approx(2.0)
    assert lm.service_s == pytest.approx(6.0 / 20)  # prefill + decode seconds per ok response
    assert lm.busy_s_per_s == pytest.approx(0.6) and lm.instances == 2


# --- the loop ----------------------------------------------------------------------


class FakeServer:
    """Counters that grow at a set rate; instances that change when applied."""

    def __init__(self, rate: float, service: float) -> None:
        self.t, self.rate, self.service = 0.0, rate, service
        self.instances = {"fm.minilm": 1}
        self.received = 0.0
        self.applied: list[tuple[str, int]] = []
        self.fail = False

    def advance(self, dt: float) -> None:
        self.t += dt
        self.received += self.rate * dt

    def scrape(self) -> a.Series:
        busy = self.received * self.service
        text = (
            f'fmplex_task_received_total{{host="fm.minilm",task="t"}} {self.received}\n'
            f'fmplex_task_served_requests_total{{host="fm.minilm",task="t"}} {self.received}\n'
            f'fmplex_task_queue_depth{{host="fm.minilm",task="t"}} 0\n'
            f'fmplex_batch_seconds_total{{host="fm.minilm"}} {busy}\n'
        )
        return a.parse_prometheus(text)

    def apply(self, stage: str, n: int) -> str:
        if self.fail:
            raise RuntimeError("server refused")
        self.applied.append((stage, n))
        self.instances[stage] = n
        return f"{stage} now {n}"


def _loop(server: FakeServer, dry_run: bool, out: list[str]) -> a.Autoscaler:
    return a.Autoscaler(
        {"fm.minilm": Bounds(1, 4)},
        scrape_fn=server.scrape,
        instances_of=lambda s: server.instances[s],
        apply=server.apply,
        dry_run=dry_run,
        echo=out.append,
        clock=lambda: server.t,
    )


def test_loop_applies_decisions_and_reports_progress() -> None:
    server, out = FakeServer(rate=60.0, service=0.02), []  # 1.2 instances of work
    scaler = _loop(server, False, out)
    scaler.run(DT, once=True, sleep=server.advance)
    scaler.run(DT, once=True, sleep=server.advance)
    assert server.applied == [("fm.minilm", 2)]
    assert any("fm.minilm: n=1 rate=60.0/s" in line and "-> 2" in line for line in out)
    assert "  fm.minilm now 2" in out


def test_dry_run_changes_nothing_and_failures_do_not_stop_the_loop() -> None:
    server, out = FakeServer(rate=60.0, service=0.02), []
    scaler = _loop(server, True, out)
    for _ in range(4):
        server.advance(DT)
        scaler.step()
    assert server.applied == [] and server.instances["fm.minilm"] == 1
    assert sum("-> 2" in line for line in out) >= 2  # the same advice every poll, no cooldown
    server.fail, out2 = True, []
    scaler = _loop(server, False, out2)
    for _ in range(4):
        server.advance(DT)
        scaler.step()
    assert any("failed: server refused" in line for line in out2)
    assert sum("failed" in line for line in out2) >= 2  # tried again at the next poll


def test_loop_reports_a_stage_without_metrics() -> None:
    server, out = FakeServer(rate=1.0, service=0.01), []
    scaler = a.Autoscaler({"fm.nothing": Bounds()}, server.scrape, lambda s: 1, server.apply, echo=out.append, clock=lambda: server.t)
    scaler.run(DT, once=True, sleep=server.advance)
    assert out == ["fm.nothing: no metrics for this stage"]

