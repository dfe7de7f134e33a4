"""Multimodal backbones as stage hosts in a real tritonserver.

One server for this module, on a fresh repository holding both tiny
multimodal backbones (``llava-tiny`` with its stages sharing the CPUs,
``mllama-tiny`` with its stages pinned apart), three multimodal vFMs, and
nothing else. Every answer is compared with the one-piece transformers model
run in-process on the stage weights read back from the repository: generated
tokens identical, prefill logits within 1e-4 (fp32).
"""

from __future__ import annotations

import os
import sys
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from fmplex.control import serving
from fmplex.control.server import TritonProcess, free_ports
from fmplex.control import workflows
from fmplex.families import multimodal as control
from fmplex.multimodal import models
from fmplex.multimodal.models import EOS_ID, IMAGE_ID, PAD_ID, ByteTokenizer

from .fuzzing import fuzz, fuzz_settings

pytestmark = pytest.mark.e2e

ATOL = 1e-4
FMPLEX = str(Path(sys.executable).parent / "fmplex")
TASKS = {  # task -> (backbone, prompt, max_new_tokens)
    "caption": ("llava-tiny", "USER: ", 8),
    "vqa": ("llava-tiny", "Q: ", 6),
    "xcaption": ("mllama-tiny", "Describe ", 8),
}
OUTPUTS = ["GENERATED_TEXT", "TOKEN_IDS", "PROMPT_IDS", "PREFILL_LOGITS"]


class MMServer:
    def __init__(self, proc: TritonProcess, repo: Path, log: Path) -> None:
        self.proc, self.repo, self.log = proc, repo, log
        self.ports = proc.ports
        self.refs: dict[str, Any] = {}
        self.grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{self.ports.grpc}")
        self.http = httpclient.InferenceServerClient(f"127.0.0.1:{self.ports.http}", network_timeout=60, concurrency=4)

    def ref(self, backbone: str) -> Any:
        """The one-piece model reassembled from the repository's stage weights."""
        if backbone not in self.refs:
            spec = models.get_multimodal(backbone)
            self.refs[backbone] = models.load_one_piece(self.repo / spec.encode_model / "1", self.repo / spec.lm_model / "1")
        return self.refs[backbone]

    def encoder_stats(self, backbone: str) -> dict[str, Any]:
        st = self.grpc.get_inference_statistics(f"fm.{backbone}.encode", as_json=True)["model_stats"][0]
        sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in st.get("batch_stats", [])}
        return {"images": int(st.get("inference_count", 0)), "batches": int(st.get("execution_count", 0)), "sizes": sizes}

    def metric(self, name: str, **labels: str) -> float:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def mm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MMServer]:
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("mm")
    repo = work / "repo"
    split = control.placements("split") if len(os.sched_getaffinity(0)) >= 2 else control.placements("shared")
    control.init_multimodal(repo, "llava-tiny", control.placements("shared"))
    control.init_multimodal(repo, "mllama-tiny", split)
    for task, (backbone, prompt, max_new) in TASKS.items():
        workflows.create_task(repo, task, backbone, options=dict(prompt=prompt, max_new_tokens=max_new))
        workflows.deploy(repo, [task])
    log = work / "tritonserver.log"
    t0 = time.monotonic()
    proc = serving.start(repo, free_ports(), log_path=log)  # as 'fmplex serve' does: hosts, then deployed vFMs
    server = MMServer(proc, repo, log)
    print(f"\nserver with 4 stage hosts + 3 vFMs ready in {time.monotonic() - t0:.1f}s")
    try:
        yield server
    finally:
        server.grpc.close()
        server.http.close()
        proc.stop()


def _inputs(mod: Any, text: str, images: np.ndarray | None, **scalars: Any) -> list[Any]:
    t = mod.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    out = [t]
    if images is not None:
        im = mod.InferInput("IMAGES", list(images.shape), "FP32")
        im.set_data_from_numpy(images.astype(np.float32))
        out.append(im)
    types = {"MAX_NEW_TOKENS": ("INT32", np.int32), "TEMPERATURE": ("FP32", np.float32), "SEED": ("INT64", np.int64)}
    for name, value in scalars.items():
        dtype, np_type = types[name]
        x = mod.InferInput(name, [1], dtype)
        x.set_data_from_numpy(np.array([value], dtype=np_type))
        out.append(x)
    return out


def ask(mm: MMServer, task: str, text: str, images: np.ndarray | None, proto: str = "grpc", **scalars: Any) -> dict[str, np.ndarray]:
    mod, client = (grpcclient, mm.grpc) if proto == "grpc" else (httpclient, mm.http)
    res = client.infer(task, _inputs(mod, text, images, **scalars), outputs=[mod.InferRequestedOutput(o) for o in OUTPUTS])
    return {o: res.as_numpy(o) for o in OUTPUTS}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def reference(mm: MMServer, task: str, text: str, images: np.ndarray | None, **gen: Any) -> tuple[list[int], np.ndarray, list[int]]:
    """(prompt ids, prefill logits, generated ids) of the one-piece model in-process."""
    backbone, prompt, max_new = TASKS[task]
    model = mm.ref(backbone)
    n = 0 if images is None else len(images)
    family = models.get_multimodal(backbone).family
    ids = ByteTokenizer(16 if family == "llava" else 1).encode(prompt + text, n)
    kw: dict[str, Any] = {}
    if n and family == "llava":
        kw = {"pixel_values": torch.from_numpy(images)}
    elif n:
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        dense = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, IMAGE_ID)], [[1] * n], 1, len(ids))
        kw = {
            "pixel_values": torch.from_numpy(images).reshape(1, n, 1, 3, 32, 32),
            "aspect_ratio_ids": torch.ones(1, n, dtype=torch.long),
            "aspect_ratio_mask": torch.ones(1, n, 1, dtype=torch.long),
            "cross_attention_mask": torch.from_numpy(dense),
        }
    it = torch.tensor([ids])
    sample = gen.get("temperature", 0) > 0
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        logits = model(input_ids=it, **kw).logits[0].numpy()
        if sample:
            torch.manual_seed(gen["seed"])
        out = model.generate(
            input_ids=it, attention_mask=torch.ones_like(it), max_new_tokens=gen.get("max_new_tokens", max_new),
            do_sample=sample, temperature=gen.get("temperature") if sample else None, top_k=0 if sample else None,
            top_p=1.0 if sample else None, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kw,
        )  # fmt: skip
    return ids, logits, out[0, len(ids) :].tolist()


def assert_exact(mm: MMServer, task: str, text: str, images: np.ndarray | None, got: dict[str, np.ndarray], **gen: Any) -> None:
    ids, logits, tokens = reference(mm, task, text, images, **gen)
    assert got["PROMPT_IDS"].tolist() == ids
    assert got["TOKEN_IDS"].tolist() == tokens
    np.testing.assert_allclose(got["PREFILL_LOGITS"], logits, atol=ATOL, rtol=0)
    assert got["GENERATED_TEXT"][0] == ByteTokenizer.decode(tokens).encode()


# --- exactness and routing ------------------------------------------------------------------


@pytest.mark.parametrize("task", ["caption", "xcaption"])
@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_text_only_never_reaches_the_encoder(mm: MMServer, task: str, proto: str) -> None:
    backbone = TASKS[task][0]
    before = mm.encoder_stats(backbone)
    got = ask(mm, task, "What is a cat?", None, proto)
    assert_exact(mm, task, "What is a cat?", None, got)
    empty = np.zeros((0, 3, 32, 32), np.float32)  # an empty IMAGES tensor is text-only too
    assert_exact(mm, task, "What is a cat?", None, ask(mm, task, "What is a cat?", empty, proto))
    assert mm.encoder_stats(backbone) == before


@pytest.mark.parametrize("task", ["caption", "xcaption"])
@pytest.mark.parametrize("n", [1, 3])
def test_images_go_through_the_encoder_and_match_one_piece(mm: MMServer, task: str, n: int) -> None:
    backbone = TASKS[task][0]
    images = _images(n, seed=n)
    text = "Compare " + " and ".join(["<image>"] * n) + "." if n > 1 else "What is shown?"
    for proto in ("grpc", "http"):
        before = mm.encoder_stats(backbone)
        got = ask(mm, task, text, images, proto)
        after = mm.encoder_stats(backbone)
        assert_exact(mm, task, text, images, got)
        assert after["images"] - before["images"] == n  # one encoder inference per image
        assert 1 <= after["batches"] - before["batches"] <= n


def test_seeded_sampling_and_request_overrides(mm: MMServer) -> None:
    images = _images(1, seed=9)
    a = ask(mm, "caption", "Once", images, TEMPERATURE=0.8, SEED=7, MAX_NEW_TOKENS=10)
    b = ask(mm, "caption", "Once", images, TEMPERATURE=0.8, SEED=7, MAX_NEW_TOKENS=10)
    assert_exact(mm, "caption", "Once", images, a, temperature=0.8, seed=7, max_new_tokens=10)
    assert a["TOKEN_IDS"].tolist() == b["TOKEN_IDS"].tolist() and (len(a["TOKEN_IDS"]) == 10 or a["TOKEN_IDS"][-1] == EOS_ID)


def test_concurrent_requests_of_two_tasks_share_encoder_batches(mm: MMServer) -> None:
    """8 concurrent 3-image requests of two tasks: the images (one BLS request
    each) are batched together by the encoder's dynamic batcher."""
    before = mm.encoder_stats("llava-tiny")
    jobs = [("caption" if i % 2 else "vqa", _images(3, seed=100 + i)) for i in range(8)]
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{mm.ports.grpc}")
        try:
            task, images = jobs[i]
            res = client.infer(task, _inputs(grpcclient, "Look.", images), outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS])
            results[i] = {o: res.as_numpy(o) for o in OUTPUTS}
        except Exception as exc:  # noqa: BLE001 - asserted below
            results[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = mm.encoder_stats("llava-tiny")
    for (task, images), got in zip(jobs, results):
        assert isinstance(got, dict), got
        assert_exact(mm, task, "Look.", images, got)
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    grown = {s: after["sizes"].get(s, 0) - before["sizes"].get(s, 0) for s in after["sizes"]}
    print(f"\nencoder: {images} images in {batches} batches; batch sizes {dict(sorted((s, c) for s, c in grown.items() if c))}")
    assert images == 24
    assert batches < 24 and max(s for s, c in grown.items() if c) > 1  # batched across requests


def test_concurrent_requests_of_two_tasks_share_lm_steps(mm: MMServer) -> None:
    """6 concurrent text-only requests of two tasks (they skip the encoder, so they reach the
    lm stage together): its engine runs them in shared steps, each answer still exact."""
    batched = ("fmplex_batch_size_total", {"host": "fm.llava-tiny.lm"})

    def shared_steps() -> float:
        return sum(mm.metric(batched[0], **batched[1], rows=str(r)) for r in range(2, 9))

    before = shared_steps()
    engine_before = mm.metric("fmplex_gen_multi_row_steps_total", host="fm.llava-tiny.lm")
    jobs = [("caption" if i % 2 else "vqa", f"Tell me about number {i}.") for i in range(6)]
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{mm.ports.grpc}")
        try:
            res = client.infer(jobs[i][0], _inputs(grpcclient, jobs[i][1], None), outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS])
            results[i] = {o: res.as_numpy(o) for o in OUTPUTS}
        except Exception as exc:  # noqa: BLE001 - asserted below
            results[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (task, text), got in zip(jobs, results):
        assert isinstance(got, dict), got
        assert_exact(mm, task, text, None, got)
    deadline = time.monotonic() + 15  # the host publishes its batch counters about once a second
    while shared_steps() == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert shared_steps() > before  # at least one lm step carried sequences of more than one request
    while mm.metric("fmplex_gen_multi_row_steps_total", host="fm.llava-tiny.lm") == engine_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert mm.metric("fmplex_gen_multi_row_steps_total", host="fm.llava-tiny.lm") > engine_before  # the engine's own count agrees


# --- errors --------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(mm: MMServer) -> None:
    before = mm.encoder_stats("llava-tiny")
    cases = [
        (dict(images=np.zeros((1, 3, 16, 16), np.float32)), r"IMAGES must be FP32 \[n, 3, 32, 32\] for llava-tiny, got \[1, 3, 16, 16\]"),
        (dict(images=np.zeros((2, 3, 32, 32), np.float32), text="only <image> here"), "the text has 1 <image> markers but 2 images were sent"),
        (dict(images=np.full((1, 3, 32, 32), np.nan, np.float32)), "IMAGES contains NaN or Inf"),
        (dict(scalars={"MAX_NEW_TOKENS": 0}), r"MAX_NEW_TOKENS must be 1\.\.256, got 0"),
        (dict(images=np.zeros((9, 3, 32, 32), np.float32)), "9 images in one request, more than the limit of 8"),
        (dict(scalars={"SEED": -1, "TEMPERATURE": 0.5}), "SEED must be >= 0, got -1"),
    ]
    for case, message in cases:
        inputs = _inputs(grpcclient, case.get("text", "hi"), case.get("images"), **case.get("scalars", {}))
        with pytest.raises(InferenceServerException, match=message) as err:
            mm.grpc.infer("caption", inputs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match=message) as err:
            mm.http.infer("caption", _inputs(httpclient, case.get("text", "hi"), case.get("images"), **case.get("scalars", {})))
        assert err.value.status() == "400"
    assert mm.encoder_stats("llava-tiny") == before  # refused before any encoding


@st.composite
def mm_requests(draw: Any) -> tuple[str, bytes, np.ndarray | None, dict[str, Any]]:
    """(task, TEXT bytes, IMAGES or None, scalar inputs): mostly valid, often not."""
    task = draw(st.sampled_from(sorted(TASKS)))
    n = draw(st.integers(0, 3) | st.sampled_from([8, 9]))
    markers = draw(st.sampled_from([0, n, n + 1]))
    text = draw(st.sampled_from(["What is shown?", "Look.", "", "😀 \u202e rtl", "a\u0000b"]) | st.text(max_size=20))
    raw = (" ".join(["<image>"] * markers) + " " + text).encode() if markers else text.encode()
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.binary(min_size=1, max_size=8))  # maybe not UTF-8
    images = None
    if n or draw(st.booleans()):
        shape = [n, 3, 32, 32] if draw(st.integers(0, 3)) else [n, draw(st.sampled_from([1, 3])), draw(st.sampled_from([16, 32])), 32]
        images = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape).astype(np.float32)
        if n and draw(st.integers(0, 7)) == 0:
            images[0, 0, 0, 0] = draw(st.sampled_from([np.nan, np.inf]))
    scalars: dict[str, Any] = {}
    if draw(st.booleans()):
        scalars["MAX_NEW_TOKENS"] = draw(st.integers(1, 6) | st.sampled_from([0, -1, 257]))
    if draw(st.integers(0, 3)) == 0:
        scalars["TEMPERATURE"] = draw(st.sampled_from([0.0, 0.7, 1.3, -0.5]))
        scalars["SEED"] = draw(st.integers(0, 2**20))
    return task, raw, images, scalars


@fuzz
@fuzz_settings(15)
@given(case=mm_requests(), proto=st.sampled_from(["grpc", "http"]))
def test_fuzz_multimodal_inputs_answer_one_piece_or_refuse_clearly(mm: MMServer, case: Any, proto: str) -> None:
    """Image counts, shapes, markers, NaN, odd or non-UTF-8 text, out-of-range
    scalars: a client error (INVALID_ARGUMENT / 400) where a rule says so,
    else exactly the one-piece model's answer; then the stages still answer right."""
    task, raw, images, scalars = case
    n = 0 if images is None else images.shape[0]
    mod, client = (grpcclient, mm.grpc) if proto == "grpc" else (httpclient, mm.http)
    inputs = _inputs(mod, "", images, **scalars)
    inputs[0].set_data_from_numpy(np.array([raw], dtype=object))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    must_refuse = (
        text is None
        or (images is not None and list(images.shape[1:]) != [3, 32, 32])
        or (n > 0 and not np.isfinite(images).all())  # type: ignore[union-attr]
        or n > 8
        or not 1 <= scalars.get("MAX_NEW_TOKENS", 1) <= 256
        or scalars.get("TEMPERATURE", 0.0) < 0
        or (text is not None and 0 < text.count("<image>") != n)
    )
    try:
        res = client.infer(task, inputs, outputs=[mod.InferRequestedOutput(o) for o in OUTPUTS])
    except InferenceServerException as exc:
        assert exc.status() in ("StatusCode.INVALID_ARGUMENT", "400"), (exc.status(), str(exc), raw, scalars)
        assert "Traceback" not in str(exc), str(exc)
    else:
        assert not must_refuse, f"answered a request a rule refuses: {raw!r} {None if images is None else images.shape} {scalars}"
        gen = {"max_new_tokens": scalars.get("MAX_NEW_TOKENS", TASKS[task][2])}
        if scalars.get("TEMPERATURE"):
            gen.update(temperature=scalars["TEMPERATURE"], seed=scalars["SEED"])
        assert_exact(mm, task, text, images if n else None, {o: res.as_numpy(o) for o in OUTPUTS}, **gen)  # type: ignore[arg-type]
    assert_exact(mm, task, "still fine", _images(1, 3), ask(mm, task, "still fine", _images(1, 3)))


# --- placement and control plane --------------------------------------------------------------


def _stub_cpus(mm: MMServer, host: str) -> set[int]:
    pid = int(mm.metric("fmplex_host_pid", host=host))
    assert pid > 0
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        line = next(x for x in fh if x.startswith("Cpus_allowed_list:"))
    from fmplex.multimodal.placement import parse_cpus

    return parse_cpus(line.split(":", 1)[1].strip()) or set()


def test_stage_placement_follows_the_config(mm: MMServer) -> None:
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("pinning apart needs 2 CPUs")
    assert _stub_cpus(mm, "fm.llava-tiny.encode") == _stub_cpus(mm, "fm.llava-tiny.lm") == allowed  # shared
    enc, lm = _stub_cpus(mm, "fm.mllama-tiny.encode"), _stub_cpus(mm, "fm.mllama-tiny.lm")  # split
    assert enc and lm and not enc & lm and enc | lm == allowed


def test_status_undeploy_and_redeploy_through_the_cli(mm: MMServer) -> None:
    url = ["--url", f"127.0.0.1:{mm.ports.grpc}"]
    status = subprocess.run([FMPLEX, "status", "--repo", str(mm.repo), *url, "--metrics-url", f"http://127.0.0.1:{mm.ports.metrics}/metrics"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "host fm.llava-tiny.lm: READY" in status.stdout and "host fm.mllama-tiny.encode: READY" in status.stdout
    assert any(line.split()[:3] == ["vqa", "multimodal", "READY"] for line in status.stdout.splitlines())
    undeploy = subprocess.run([FMPLEX, "undeploy", "vqa", "--repo", str(mm.repo), *url], capture_output=True, text=True, timeout=120)
    assert undeploy.returncode == 0, undeploy.stderr
    with pytest.raises(InferenceServerException):
        ask(mm, "vqa", "hi", None)
    assert_exact(mm, "caption", "still here", None, ask(mm, "caption", "still here", None))  # the stages kept serving
    deploy = subprocess.run([FMPLEX, "deploy", "vqa", "--repo", str(mm.repo), *url], capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stderr
    assert_exact(mm, "vqa", "back", _images(1, 5), ask(mm, "vqa", "back", _images(1, 5)))
    loads = mm.log.read_text(errors="replace")
    assert loads.count('loading: fm.llava-tiny.lm:1"') == 1 and loads.count('loading: fm.llava-tiny.encode:1"') == 1  # no stage reload


def test_encoder_down_fails_only_requests_with_images(mm: MMServer) -> None:
    """With the encode stage unloaded, image requests get a clear UNAVAILABLE
    error and text-only requests are still served; loading it back heals it."""
    mm.grpc.unload_model("fm.llava-tiny.encode")
    try:
        deadline = time.monotonic() + 30
        while mm.grpc.is_model_ready("fm.llava-tiny.encode") and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(InferenceServerException, match="encode stage fm.llava-tiny.encode failed") as err:
            ask(mm, "caption", "What is shown?", _images(2, 3))
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert_exact(mm, "caption", "text still works", None, ask(mm, "caption", "text still works", None))
    finally:
        mm.grpc.load_model("fm.llava-tiny.encode")
    assert_exact(mm, "caption", "What is shown?", _images(2, 3), ask(mm, "caption", "What is shown?", _images(2, 3)))
    served = mm.metric("fmplex_task_served_requests_total", host="fm.llava-tiny.lm", task="caption")
    received = mm.metric("fmplex_task_received_total", host="fm.llava-tiny.lm", task="caption")
    assert served > 0 and received >= served
    assert mm.metric("fmplex_task_responses_total", host="fm.llava-tiny.lm", outcome="encode_error") >= 1
    assert mm.metric("fmplex_task_responses_total", host="fm.llava-tiny.lm", outcome="duplicate_suppressed") == 0


def test_unloading_the_lm_stage_answers_every_request_in_flight(mm: MMServer) -> None:
    """Triton drains the LM stage before unloading it: every request in flight
    (text-only and with images) gets its full answer, the one-piece model's;
    the vFMs work again once the stage is loaded back (their ensembles
    untouched). The unload starts once the LM stage has received every
    request (its own counter), so all twelve are in flight by construction."""
    results: list[Any] = [None] * 12
    images_of = {i: (_images(3, 200 + i) if i % 2 else None) for i in range(12)}
    received = ("fmplex_task_received_total", {"host": "fm.llava-tiny.lm", "task": "caption"})
    before = mm.metric(received[0], **received[1])

    def run(i: int) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{mm.ports.grpc}")
        try:
            res = client.infer("caption", _inputs(grpcclient, "long", images_of[i], MAX_NEW_TOKENS=120),
                               outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS], client_timeout=120)  # fmt: skip
            results[i] = {o: res.as_numpy(o) for o in OUTPUTS}
        except Exception as exc:  # noqa: BLE001 - asserted below
            results[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while mm.metric(received[0], **received[1]) < before + 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    in_flight = mm.metric(received[0], **received[1]) - before
    mm.grpc.unload_model("fm.llava-tiny.lm")
    for t in threads:
        t.join(timeout=180)
    try:
        assert in_flight == 12, f"the LM stage had received {in_flight:.0f} of 12 requests when it was unloaded"
        assert all(isinstance(r, dict) for r in results), [r for r in results if not isinstance(r, dict)]
        for i, got in enumerate(results):
            assert_exact(mm, "caption", "long", images_of[i], got, max_new_tokens=120)
    finally:
        mm.grpc.load_model("fm.llava-tiny.lm")
    assert_exact(mm, "caption", "after", _images(1, 1), ask(mm, "caption", "after", _images(1, 1)))
    assert_exact(mm, "vqa", "after", None, ask(mm, "vqa", "after", None))
