"""A host with a small extension budget: LRU eviction, reload on demand, pinning.

Its own server, on a repository whose host keeps at most 5 MiB of task
extensions while three 2-MiB LoRA tasks take turns: extensions are evicted and
reloaded, every request is answered exactly, and the pinned task never leaves.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner

from fmplex.control import serving
from fmplex.control.cli import main as fmplex_main
from fmplex.control.server import free_ports

from ..kinds import lora as lora_src
from .conftest import Server, text_input

TARGETS = ("query", "key", "intermediate.dense", "output.dense")  # rank 16: ~2 MiB of fp32 per task


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, object]]]:
    work = tmp_path_factory.mktemp("evict")
    repo = work / "repo"
    run = CliRunner()
    assert run.invoke(fmplex_main, ["init", str(repo), "--extension-budget-mb", "5"]).exit_code == 0
    sources = {f"ev{i}": lora_src.make(work, seed=10 + i, rank=16, targets=TARGETS) for i in range(3)}
    for name, src in sources.items():
        out = run.invoke(fmplex_main, ["task", "create", name, *src.create_args, "--repo", str(repo)])  # type: ignore[attr-defined]
        assert out.exit_code == 0, out.output
    assert run.invoke(fmplex_main, ["task", "pin", "ev0", "--repo", str(repo)]).exit_code == 0
    assert run.invoke(fmplex_main, ["deploy", *sources, "--offline", "--repo", str(repo)]).exit_code == 0
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / "server.log")
    try:
        yield Server(proc, repo, ports, work / "server.log"), sources
    finally:
        proc.stop()


def test_evicted_extensions_reload_on_demand_and_pins_stay(small: tuple[Server, dict[str, object]]) -> None:
    server, sources = small
    texts = ["an evicted task must still answer", "exactly"]
    wants = {n: s.reference(texts)["EMBEDDING"] for n, s in sources.items()}  # type: ignore[attr-defined]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for _ in range(3):
            for name in ("ev0", "ev1", "ev2"):
                got = client.infer(name, [text_input(grpcclient, texts)], client_timeout=120).as_numpy("EMBEDDING")
                np.testing.assert_allclose(got, wants[name], atol=1e-4, rtol=0)
    finally:
        client.close()

    assert server.wait_metric("fmplex_extension_evictions_total", 2) >= 2
    assert server.metric("fmplex_extension_reloads_total") >= 2
    assert server.metric("fmplex_extension_reload_seconds_total") > 0
    assert server.metric("fmplex_extension_resident_bytes") <= 5 * 2**20
    assert server.metric("fmplex_task_extension_bytes", task="ev0") > 2**20, "the pinned task was evicted"
