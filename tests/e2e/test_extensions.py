"""Every extension kind through the real server, alone and mixed in shared batches.

Each task is built from what the real library writes (peft for LoRA and prompt
tuning, transformers checkpoints for forks, onnx for ONNX heads, our adapter
file format checked against forward hooks on a plain transformers model), and
every answer is compared with the task run alone through that library
(tests/kinds/*), tolerance 1e-4 absolute unless a source states otherwise.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from fmplex.control.cli import main as fmplex_main

from ..kinds import TaskSource
from ..kinds import adapter as adapter_src
from ..kinds import fork as fork_src
from ..kinds import lora as lora_src
from ..kinds import onnx as onnx_src
from ..kinds import prompt as prompt_src
from .conftest import Server, text_input
from .fuzzing import Reference, fuzz, fuzz_settings, text_rows
from .reference import ATOL, EmbeddedReference

TEXTS = [
    "The match went to extra time before the home side scored.",
    "short",
    "A new laptop with a faster chip and a much better battery was announced today by the company.",
]


def _sources(tmp: Path) -> dict[str, TaskSource]:
    return {
        "x_lora4": lora_src.make(tmp, seed=1, rank=4),
        "x_lora16": lora_src.make(tmp, seed=2, rank=16, targets=("query", "key", "intermediate.dense", "output.dense")),
        "x_prompt": prompt_src.make(tmp, seed=3, virtual_tokens=8),
        "x_adapter": adapter_src.make(tmp, seed=4),
        "x_fork_cls": fork_src.make(tmp, seed=5, head="cls", layers=2),
        "x_fork_tok": fork_src.make(tmp, seed=6, head="token", layers=1),
        "x_onnx": onnx_src.make(tmp, seed=7, mode="pooled"),
        "x_onnx_tok": onnx_src.make(tmp, seed=8, mode="hidden"),
    }


def cli(server: Server, *args: str) -> str:
    result = CliRunner().invoke(fmplex_main, [*args, "--repo", str(server.repo)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def tasks(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskSource]:
    sources = _sources(tmp_path_factory.mktemp("kinds"))
    for name, src in sources.items():
        cli(server, "task", "create", name, *src.create_args)
    result = CliRunner().invoke(fmplex_main, ["deploy", *sources, "--repo", str(server.repo), "--url", server.grpc_url])
    assert result.exit_code == 0, result.output
    return sources


def check(result: Any, want: dict[str, np.ndarray], atol: float) -> None:
    for name, value in want.items():
        got = result.as_numpy(name)
        assert got is not None, f"no {name} in the response"
        if value.dtype == object:
            assert list(got) == list(value), name
        else:
            assert got.shape == value.shape, (name, got.shape, value.shape)
            np.testing.assert_allclose(got, value, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "name", ["x_lora4", "x_lora16", "x_prompt", "x_adapter", "x_fork_cls", "x_fork_tok", "x_onnx", "x_onnx_tok"]
)
def test_each_kind_matches_its_library_alone(server: Server, tasks: dict[str, TaskSource], name: str) -> None:
    src = tasks[name]
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        check(client.infer(name, [text_input(httpclient, TEXTS)]), src.reference(TEXTS), src.atol)
    finally:
        client.close()


def test_one_shared_batch_mixing_all_kinds_changes_no_answer(server: Server, tasks: dict[str, TaskSource]) -> None:
    """Requests of every kind (two LoRA ranks, prompt, adapter, two forks,
    two ONNX heads) plus plain tasks, sent at once so they share batches;
    every answer is checked against its task's reference."""
    names = [*tasks, "sentiment", "embed"]
    wants = {n: tasks[n].reference(TEXTS) for n in tasks}
    plain = EmbeddedReference(server.repo)  # the plain tasks' own reference (transformers + their head file)
    wants.update({n: plain.answer(n, TEXTS) for n in ("sentiment", "embed")})
    atol = {n: (tasks[n].atol if n in tasks else ATOL) for n in names}
    batches0 = server.metric("fmplex_batch_batches_total")
    rows0 = server.metric("fmplex_batch_rows_total")
    queued0, sends0 = server.metric("fmplex_host_queued_requests_total"), server.metric("fmplex_host_response_sends_total")
    send_s0 = server.metric("fmplex_host_response_send_seconds_total")

    def one(i: int) -> tuple[str, Any]:
        name = names[i % len(names)]
        texts = TEXTS[i % 3 :] + TEXTS[: i % 3]  # rotate so rows of one task land at different places
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return name, (texts, client.infer(name, [text_input(grpcclient, texts)], client_timeout=120))
        finally:
            client.close()

    with cf.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(one, range(4 * len(names))))
    assert sorted({name for name, _ in results}) == sorted(names)
    for name, (texts, result) in results:  # every task's answer, its rows in the order sent
        order = [TEXTS.index(t) for t in texts]
        check(result, {k: v[order] for k, v in wants[name].items()}, atol[name])
    rows = server.wait_metric("fmplex_batch_rows_total", rows0 + 3 * len(results)) - rows0
    batches = server.metric("fmplex_batch_batches_total") - batches0
    assert rows == 3 * len(results)
    assert rows / batches > 3.5, f"{rows:.0f} rows in {batches:.0f} batches: requests were not mixed into shared batches"
    # where the requests' time went inside the host: each left its queue once and got one response sent,
    # and the process's garbage collections (at least those of loading the backbone) are counted
    assert server.wait_metric("fmplex_host_response_sends_total", sends0 + len(results)) - sends0 == len(results)
    assert server.metric("fmplex_host_queued_requests_total") - queued0 == len(results)
    assert server.metric("fmplex_host_response_send_seconds_total") > send_s0
    assert server.metric("fmplex_host_gc_collections_total") > 0 and server.metric("fmplex_host_gc_seconds_total") > 0


def test_status_reports_extension_memory_per_task(server: Server, tasks: dict[str, TaskSource]) -> None:
    for name in tasks:  # make every extension resident
        c = httpclient.InferenceServerClient(server.http_url)
        c.infer(name, [text_input(httpclient, ["warm"])])
        c.close()
    server.wait_metric("fmplex_task_extension_bytes", 1, task="x_onnx_tok")
    result = CliRunner().invoke(
        fmplex_main,
        ["status", "--repo", str(server.repo), "--url", server.grpc_url, "--metrics-url", f"http://127.0.0.1:{server.ports.metrics}/metrics"],
    )
    assert result.exit_code == 0, result.output
    rows = {ln.split()[0]: ln.split() for ln in result.output.splitlines() if ln.strip()}
    kib = {n: float(rows[n][10]) for n in tasks}
    assert kib["x_lora16"] > kib["x_lora4"] > 0
    assert kib["x_fork_cls"] > 1024 * 2  # two BERT layers of fp32 weights: megabytes
    assert server.metric("fmplex_task_extension_bytes", task="x_fork_cls") > 2 * 2**20


@pytest.fixture(scope="module")
def verdicts(server: Server) -> Reference:
    return Reference(server.repo)


@fuzz
@fuzz_settings(6)
@given(
    name=st.sampled_from(["x_lora4", "x_lora16", "x_prompt", "x_adapter", "x_fork_cls", "x_fork_tok", "x_onnx", "x_onnx_tok"]),
    rows=text_rows(max_rows=3),
    protocol=st.sampled_from(["http", "grpc"]),
)
def test_fuzz_every_kind_answers_its_library_or_refuses_clearly(
    server: Server, tasks: dict[str, TaskSource], verdicts: Reference, name: str, rows: list[str], protocol: str
) -> None:
    """Odd texts (emoji, RTL, control characters, 10k-character strings) to every
    extension kind: the kind's own library answer, or a clear client error
    where the MiniLM host's limits refuse the rows (the same for every kind)."""
    verdict = verdicts.texts("embed", [r.encode() for r in rows])
    mod = grpcclient if protocol == "grpc" else httpclient
    client = grpcclient.InferenceServerClient(server.grpc_url) if protocol == "grpc" else httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        kwargs = {"client_timeout": 120} if protocol == "grpc" else {}
        try:
            result = client.infer(name, [text_input(mod, rows)], **kwargs)
        except InferenceServerException as exc:
            assert verdict[0] == "error", f"{name} refused valid rows: {exc}"
            assert verdict[1].lower() in str(exc).lower() and "Traceback" not in str(exc), (verdict[1], str(exc))
            assert exc.status() in ("400", "StatusCode.INVALID_ARGUMENT"), exc.status()
        else:
            assert verdict[0] == "ok", f"{name} answered rows the host must refuse ({verdict[1]})"
            check(result, tasks[name].reference(rows), tasks[name].atol)
        check(client.infer(name, [text_input(mod, TEXTS)], **kwargs), tasks[name].reference(TEXTS), tasks[name].atol)  # still right
    finally:
        client.close()
