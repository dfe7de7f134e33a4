"""PEFT fine-tunes with their trained heads, served as trained, all at once, through the real server.

Six artifacts made here by peft (tests/kinds/peft_heads.py): LoRA SEQ_CLS on
query/value, LoRA SEQ_CLS on every Linear (pooler included), LoRA with
rank/alpha patterns and rsLoRA, prompt tuning SEQ_CLS, IA3 SEQ_CLS, LoRA
TOKEN_CLS. Each vFM's LOGITS (TOKEN_LOGITS) must equal
``PeftModel.from_pretrained(AutoModelFor...Classification)`` in eval mode
within 1e-4 absolute + 1e-4 relative (fp32), labels exactly, over HTTP and
gRPC, on sentences of 1 to 60 words with non-ASCII text and emoji; the same
holds when the six tasks' rows share batches.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner

from fmplex.control.cli import main as fmplex_main

from ..kinds import TaskSource, peft_heads, tokenizer
from .conftest import Server, text_input

pytestmark = pytest.mark.e2e

VARIANTS = ("lora_qv", "lora_all", "lora_pattern", "prompt", "ia3", "lora_token")
_WORDS = ("the match went to extra time before the home side finally scored a late goal "
          "Zürich café naïve résumé São Paulo Ærø Kraków Ελλάδα Москва 東京 서울 مرحبا "
          "😀 🎉 🚀 👍🏽 ❤️ 🇫🇷 new laptop chip battery announced today by company").split()


def _texts(seed: int, count: int) -> list[str]:
    """Sentences of 1 to 60 words, the shortest and longest always among them."""
    rng = random.Random(seed)
    lengths = [1, 60] + [rng.randint(1, 60) for _ in range(count - 2)]
    return [" ".join(rng.choice(_WORDS) for _ in range(n)) for n in lengths]


TEXTS = _texts(0, 8)
ERRORS: dict[str, float] = {}  # task -> largest |got - want| seen


@pytest.fixture(scope="module")
def tasks(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskSource]:
    tmp = tmp_path_factory.mktemp("peft")
    sources = {f"p_{v}": peft_heads.make(tmp, v, seed=i) for i, v in enumerate(VARIANTS)}
    for name, src in sources.items():
        result = CliRunner().invoke(fmplex_main, ["task", "create", name, *src.create_args, "--repo", str(server.repo)])
        assert result.exit_code == 0, result.output
        assert "note:" not in result.output, result.output  # nothing dropped with a note
    result = CliRunner().invoke(fmplex_main, ["deploy", *sources, "--repo", str(server.repo), "--url", server.grpc_url])
    assert result.exit_code == 0, result.output
    yield sources
    CliRunner().invoke(fmplex_main, ["undeploy", *sources, "--repo", str(server.repo), "--url", server.grpc_url])
    print("max |vFM - PeftModel| per task: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(ERRORS.items())))


def check(name: str, result: Any, want: dict[str, np.ndarray], src: TaskSource) -> None:
    for out, value in want.items():
        got = result.as_numpy(out)
        assert got is not None, f"no {out} in the response"
        if value.dtype == object:
            assert list(got) == list(value), (name, out)
        else:
            assert got.shape == value.shape, (name, out, got.shape, value.shape)
            np.testing.assert_allclose(got, value, atol=src.atol, rtol=src.rtol, err_msg=f"{name} {out}")
            ERRORS[name] = max(ERRORS.get(name, 0.0), float(np.abs(got.astype(np.float64) - value).max()))


@pytest.mark.parametrize("name", [f"p_{v}" for v in VARIANTS])
def test_each_adapter_answers_as_peft_does_over_http_and_grpc(server: Server, tasks: dict[str, TaskSource], name: str) -> None:
    src = tasks[name]
    want = src.reference(TEXTS)
    assert any(v.dtype != object and np.abs(v).max() > 0.1 for v in want.values())  # the head says something
    h = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        check(name, h.infer(name, [text_input(httpclient, TEXTS)]), want, src)
        check(name, g.infer(name, [text_input(grpcclient, TEXTS)], client_timeout=120), want, src)
    finally:
        h.close()
        g.close()


def test_all_six_in_shared_batches_change_no_answer(server: Server, tasks: dict[str, TaskSource]) -> None:
    """Requests of the six tasks sent at once, HTTP and gRPC mixed, so their rows share batches."""
    names = list(tasks)
    pool_texts = _texts(1, 12)
    wants = {n: tasks[n].reference(pool_texts) for n in names}
    tok = tokenizer()
    lengths = [len(tok(t)["input_ids"]) for t in pool_texts]
    batches0 = server.metric("fmplex_batch_batches_total")
    rows0 = server.metric("fmplex_batch_rows_total")

    def one(i: int) -> tuple[str, list[int], Any]:
        name = names[i % len(names)]
        picks = [(i * 5 + k) % len(pool_texts) for k in range(3)]
        texts = [pool_texts[j] for j in picks]
        if i % 2:
            c = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                return name, picks, c.infer(name, [text_input(grpcclient, texts)], client_timeout=120)
            finally:
                c.close()
        c = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        try:
            return name, picks, c.infer(name, [text_input(httpclient, texts)])
        finally:
            c.close()

    n = 4 * len(names)
    with cf.ThreadPoolExecutor(len(names) * 2) as pool:
        results = list(pool.map(one, range(n)))
    for name, picks, result in results:
        want = {}
        for k, v in wants[name].items():
            if k == "TOKEN_LOGITS":  # padded to this request's longest text
                want[k] = v[picks][:, : max(lengths[j] for j in picks)]
            else:
                want[k] = v[picks]
        check(name, result, want, tasks[name])
    rows = server.wait_metric("fmplex_batch_rows_total", rows0 + 3 * n) - rows0
    batches = server.metric("fmplex_batch_batches_total") - batches0
    assert rows == 3 * n
    assert rows / batches > 3.5, f"{rows:.0f} rows in {batches:.0f} batches: requests were not mixed into shared batches"
