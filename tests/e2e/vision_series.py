"""One tritonserver with the image and series hosts, shared by the e2e modules that need them.

tests/e2e/test_vision_series.py (every kind, shared batches, lifecycle, perf)
and tests/e2e/test_fuzz_vision_series.py (hostile input) need the same two
backbones, ``fm.efficientnet`` and ``fm.fracast``; starting the server once
for both (the package-scoped ``vision_series`` fixture of conftest.py) saves
one backbone load of each. The repository holds the union of the tasks both
modules send to; this module builds it, starts the server, and holds the way
both send requests (concurrently, alternating HTTP and gRPC, errors as text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from safetensors.torch import save_file
from tritonclient.utils import InferenceServerException

from fmplex.control import serving, workflows
from fmplex.control.server import free_ports
from fmplex.families.timeseries import demo_data as dd
from fmplex.families.timeseries.model import base_state, reference_model

from ..unit import test_vision_kinds as vk
from ..unit.vision_data import write_digits_folder
from .conftest import FMPLEX, Server

VISION = ("v_emb", "v_clf", "v_fork", "v_onnx", "v_lora")
SERIES = ("s_fc", "s_ft", "s_cls", "s_emb")
ONNX_LABELS, FORK_LABELS, LORA_LABELS = list("abcde"), ["c0", "c1", "c2", "c3"], ["x", "y", "z"]
CALL_TIMEOUT_S = 120.0  # a hang shows as a failure, not as a stuck run


@dataclasses.dataclass
class VisionSeries:
    """The running server and what the references need to know of its tasks."""

    server: Server
    fork_state: dict[str, torch.Tensor]  # v_fork's weights (fork at block 13, 4 classes)
    onnx_path: Path  # v_onnx's head
    peft_model: Any  # v_lora's adapter as PEFT's own model
    clf_task: Any  # v_clf as the vision family loads it (its trained head)
    base: Any  # fracast's own model: the reference of s_fc, s_cls, s_emb
    fine_tuned: Any  # fracast's own model with s_ft's weights


def cli(*args: str) -> str:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _build(repo: Path, work: Path) -> dict[str, Any]:
    """Every task, deployed offline: the cheap kinds through the CLI, the rest in-process (one backbone load for all)."""
    cli("init", str(repo), "--backbone", "efficientnet", "--backbone", "fracast", "--slots", "8")
    cli("task", "create", "v_emb", "--backbone", "efficientnet", "--kind", "embedding", "--repo", str(repo))
    cli("task", "create", "s_fc", "--backbone", "fracast", "--kind", "forecast", "--horizon", "24", "--max-horizon", "120",
        "--quantiles", "0.1,0.5,0.9", "--repo", str(repo))
    data = write_digits_folder(work / "digits", 30, (0, 1, 2))
    workflows.create_task(repo, "v_clf", "efficientnet", "classifier", {"train_csv": data})
    fork_state = vk.fine_tuned_state(13, 4, 1)
    save_file(fork_state, str(work / "fork.safetensors"))
    workflows.create_task(repo, "v_fork", "efficientnet", "fork", {"source": work / "fork.safetensors", "image_labels": ",".join(FORK_LABELS)})
    g = np.random.default_rng(0)
    vk.onnx_head(work / "head.onnx", *[g.standard_normal(s).astype(np.float32) * 0.05 for s in ((64, 1280), (64,), (5, 64), (5,))])
    workflows.create_task(repo, "v_onnx", "efficientnet", "onnx", {"source": work / "head.onnx", "image_labels": ",".join(ONNX_LABELS)})
    peft_model = vk.peft_adapter(work / "adapter", 3)
    workflows.create_task(repo, "v_lora", "efficientnet", "lora", {"source": work / "adapter", "image_labels": ",".join(LORA_LABELS)})

    state = base_state("fp32")
    gen = torch.Generator().manual_seed(1)
    for k in ("head.out_proj.weight", "head.queries", "head.summary_proj.bias"):
        state[k] = state[k] + 0.05 * torch.randn(state[k].shape, generator=gen)
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "ft.safetensors"))
    workflows.create_task(repo, "s_ft", "fracast", "fork", {"source": work / "ft.safetensors", "horizon": 48, "max_horizon": 96})
    rows, labels = dd.labelled_windows(per_label=30, seed=0)
    csv = dd.write_labelled_csv(work / "train.csv", rows, labels)
    workflows.create_task(repo, "s_cls", "fracast", "classifier", {"train_csv": csv})
    # min_context 32 (above the default 8): the fuzz tests probe a task that needs a longer context
    workflows.create_task(repo, "s_emb", "fracast", "embedding", {"missing": "reject", "min_context": 32})
    cli("deploy", *VISION, *SERIES, "--offline", "--repo", str(repo))

    fine_tuned = reference_model("fp32")
    fine_tuned.core.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("core.")}, strict=True)
    fine_tuned.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")}, strict=True)
    return {"fork_state": fork_state, "onnx_path": work / "head.onnx", "peft_model": peft_model,
            "base": reference_model("fp32"), "fine_tuned": fine_tuned}


def _loaded(repo: Path, name: str) -> Any:
    from fmplex.families.vision.family import VisionFamily  # noqa: PLC0415

    return VisionFamily().load_task(repo / name / "1")


@contextlib.contextmanager
def started(work: Path) -> Iterator[VisionSeries]:
    """Build the repository under ``work``, start the server on free ports, stop it on leaving."""
    torch.set_num_threads(1)
    repo = work / "repo"
    built = _build(repo, work)
    log = work / "tritonserver.log"
    t0 = time.monotonic()
    proc = serving.start(repo, free_ports(), log_path=log)
    print(f"\nserver with efficientnet and fracast hosts ready in {time.monotonic() - t0:.1f}s")
    try:
        yield VisionSeries(Server(proc, repo, proc.ports, log), clf_task=_loaded(repo, "v_clf"), **built)
    finally:
        proc.stop()


# --- requests ------------------------------------------------------------------------------------

TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64",
         np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8", np.dtype(object): "BYTES"}

Call = tuple[str, str, dict[str, np.ndarray], list[str]]  # (protocol, model, inputs, outputs)


def call(server: Server, proto: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray] | str:
    """One request over ``proto`` ("http" or "grpc"): its outputs, or its error as 'STATUS: message'."""
    mod = httpclient if proto == "http" else grpcclient
    if proto == "http":
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=CALL_TIMEOUT_S, connection_timeout=CALL_TIMEOUT_S)
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        xs = []
        for name, arr in inputs.items():
            x = mod.InferInput(name, list(arr.shape), TYPES[arr.dtype])
            x.set_data_from_numpy(arr)
            xs.append(x)
        kw = {} if proto == "http" else {"client_timeout": CALL_TIMEOUT_S}
        res = client.infer(model, xs, outputs=[mod.InferRequestedOutput(o) for o in outputs], **kw)
        return {o: res.as_numpy(o) for o in outputs}
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"
    finally:
        client.close()


def alternating(requests: list[tuple[str, dict[str, np.ndarray], list[str]]], first: int = 0) -> list[Call]:
    """(model, inputs, outputs) requests as calls over HTTP and gRPC in turn, HTTP first when ``first`` is 0."""
    return [(("http", "grpc")[(first + i) % 2], model, inputs, outputs) for i, (model, inputs, outputs) in enumerate(requests)]


def at_once(server: Server, calls: list[Call]) -> list[Any]:
    """Every call concurrently (the hosts batch them together); each one's outputs or error, in order."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call, server, *c) for c in calls]
        return [f.result(timeout=CALL_TIMEOUT_S + 30) for f in futures]
