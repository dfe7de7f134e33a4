"""The calibration's replay with a run's own CPU costs (perf/bench_cluster.py): pure, no cluster."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from fmplex.cluster.simulate import Costs, Workload, simulate
from perf.bench_cluster import models_of, with_run_costs


@pytest.mark.parametrize("handoff_s", [0.0, 0.0005])
def test_a_replay_with_the_runs_costs_gives_each_server_the_cpu_time_it_took(handoff_s: float) -> None:
    costs = Costs(throughput=((1, 50.0), (4, 120.0), (16, 200.0)), path_in=(("proxy", 0.002), ("ingress", 0.002)),
                  path_out=(("ingress", 0.002), ("proxy", 0.002)), cpus=2.0, background_cpus=0.1, workers=2, replica_cpus=1.5,
                  handoff_s=handoff_s, gil_wait_s=0.005 if handoff_s else 0.0)
    work = Workload(tasks=6, rate_per_task=5.0, duration_s=20.0, warmup_s=0.0, seed=3)
    placement = [0, 1, 0, 1, 0, 1]

    def replay(c: Costs):  # noqa: ANN202
        return simulate("shared", 2, work, c, placement=placement)

    def replicas(work: dict[str, float], i: int) -> float:  # a replica's batches and its hand-offs in and out
        return sum(work.get(k, 0.0) for k in (str(i), f"{i}/in", f"{i}/out"))

    before = replay(costs).work_s
    # the run took 30% more CPU in the replicas than measured beforehand, 10% less in the proxy, the same in the ingress
    took = {"rA": 1.3 * replicas(before, 0) * 0.5, "rA/stub": 1.3 * replicas(before, 0) * 0.5, "rB/stub": 1.3 * replicas(before, 1),
            "proxy": 0.9 * before["proxy"], "ingress": before["ingress"]}
    mine = with_run_costs(costs, replay, took, ["rA", "rB"], background_cpus=0.25)
    after = replay(mine).work_s
    assert replicas(after, 0) + replicas(after, 1) == pytest.approx(1.3 * (replicas(before, 0) + replicas(before, 1)), rel=0.03)
    # the hand-offs are the replica's work too: scaled as its batches were
    assert mine.handoff_s == pytest.approx(costs.handoff_s * costs.seqs_per_s(1) / mine.seqs_per_s(1))
    assert after["proxy"] == pytest.approx(took["proxy"], rel=0.01) and after["ingress"] == pytest.approx(took["ingress"], rel=0.01)
    assert mine.background_cpus == 0.25
    # a stage in both directions keeps one cost per pass, both scaled alike; the replicas' costs grew
    assert dict(mine.path_in)["proxy"] == pytest.approx(0.9 * 0.002, rel=0.01) == dict(mine.path_out)["proxy"]
    assert mine.seqs_per_s(1) < costs.seqs_per_s(1) / 1.2
    assert dataclasses.replace(mine, throughput=costs.throughput, path_in=costs.path_in, path_out=costs.path_out, background_cpus=0.1,
                               handoff_s=costs.handoff_s) == costs


def test_a_saved_run_gives_the_same_models_whichever_model_it_stored() -> None:
    """A results file holds the chosen model's costs; the others are rebuilt from them, also when the chosen
    one is the hand-offs model, whose batches gave up the hand-offs' work."""
    run = Path(__file__).resolve().parents[2] / "perf" / "results" / "cluster_calibration_runs" / "2026-11-30-0504.json.gz"
    got = json.loads(gzip.decompress(run.read_bytes()))
    models = models_of(got)
    assert models["bursts, hand-offs"].handoff_s > 0 and models["bursts"].handoff_s == 0
    again = json.loads(json.dumps(got))
    again["replay_input"]["costs"] = dataclasses.asdict(models["bursts, hand-offs"])
    for name, costs in models_of(again).items():
        assert [t for _, t in costs.throughput] == pytest.approx([t for _, t in models[name].throughput], rel=1e-9)
        assert dataclasses.replace(costs, throughput=models[name].throughput) == models[name]
