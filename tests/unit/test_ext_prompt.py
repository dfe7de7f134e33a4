"""The ``prompt`` kind (PEFT prompt tuning): importer, extension, executor, CLI.

Sources are made by peft itself and every expected answer comes from peft
alone (:mod:`tests.kinds.prompt`); fmplex must match it row for row while
mixing prompt tasks of different prompt lengths and plain rows in one batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fmplex.artifacts import ArtifactError
from fmplex.backbones import get_backbone
from fmplex.control import importers
from fmplex.control.importers import SourceError
from fmplex.triton_backend.executor import Executor, WorkItem
from fmplex.triton_backend.extensions.embedding import EmbeddingExtension
from fmplex.triton_backend.extensions.prompt import PromptExtension
from fmplex.runtime.validation import Rows
from tests.kinds import TaskSource, backbone_model, mean_pool, tokenizer
from tests.kinds import prompt as prompt_kind

FMPLEX = str(Path(sys.executable).parent / "fmplex")
SPEC = get_backbone("minilm")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[int, TaskSource]:
    tmp = tmp_path_factory.mktemp("prompt_src")
    return {p: prompt_kind.make(tmp, seed=p, virtual_tokens=p) for p in (4, 12)}


def source_dir(src: TaskSource) -> Path:
    return Path(src.create_args[src.create_args.index("--source") + 1])


def extension(src: TaskSource, executor: Executor, name: str) -> PromptExtension:
    built = importers.build("prompt", source_dir(src), SPEC, {}, lambda m: None)
    manifest = {"kind": "prompt", "backbone": "minilm", "task": name, "head": {"type": "embedding"}, **built.manifest}
    return PromptExtension(manifest, built.tensors, SPEC, config=executor.config)


# --- importer refusals -----------------------------------------------------------


def broken_copy(src: TaskSource, tmp: Path, config: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    out = tmp / "broken"
    shutil.copytree(source_dir(src), out)
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def refused(path: Path, *words: str) -> None:
    with pytest.raises(SourceError) as err:
        importers.build("prompt", path, SPEC, {}, lambda m: None)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_import_reads_peft_dir(sources: dict[int, TaskSource]) -> None:
    notes: list[str] = []
    built = importers.build("prompt", source_dir(sources[4]), SPEC, {}, notes.append)
    assert built.manifest == {"prompt": {"virtual_tokens": 4}}
    assert set(built.tensors) == {"prompt.embeddings"}
    want = load_file(str(source_dir(sources[4]) / "adapter_model.safetensors"))["prompt_embeddings"]
    assert built.tensors["prompt.embeddings"].dtype == torch.float32
    assert torch.equal(built.tensors["prompt.embeddings"], want)
    assert any("4 virtual tokens" in n for n in notes)


def test_refuses_wrong_peft_type(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources[4], tmp_path, {"peft_type": "LORA"}), "peft_type is 'LORA'", "PROMPT_TUNING")


def test_refuses_prefix_tuning(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources[4], tmp_path, {"peft_type": "PREFIX_TUNING"}), "PREFIX_TUNING", "not 'PROMPT_TUNING'")


def test_refuses_wrong_token_dim(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    path = broken_copy(sources[4], tmp_path, {"token_dim": 768}, {"prompt_embeddings": torch.randn(4, 768)})
    refused(path, "token_dim is 768", "hidden size 384")


def test_refuses_tensor_of_wrong_width(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources[4], tmp_path, tensors={"prompt_embeddings": torch.randn(4, 768)}), "width 768", "hidden size 384")


def test_refuses_encoder_decoder_prompt(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources[4], tmp_path, {"num_transformer_submodules": 2}), "num_transformer_submodules is 2", "not 1")


def test_refuses_missing_tensor(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources[4], tmp_path, tensors={"something_else": torch.zeros(4, 384)}), "lacks the tensor 'prompt_embeddings'")


def test_refuses_missing_weights_file(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    path = broken_copy(sources[4], tmp_path)
    (path / "adapter_model.safetensors").unlink()
    refused(path, "adapter_model.safetensors is missing")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_refuses_non_finite(sources: dict[int, TaskSource], tmp_path: Path, bad: float) -> None:
    t = torch.randn(4, 384)
    t[2, 7] = bad
    refused(broken_copy(sources[4], tmp_path, tensors={"prompt_embeddings": t}), "NaN or Inf")


def test_refuses_prompt_as_long_as_the_limit(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    n = SPEC.max_tokens
    path = broken_copy(sources[4], tmp_path, {"num_virtual_tokens": n}, {"prompt_embeddings": torch.randn(n, 384)})
    refused(path, f"num_virtual_tokens is {n}", f"limit of {n} tokens")


def test_refuses_shape_config_mismatch(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources[4], tmp_path, {"num_virtual_tokens": 5}), "shape (4, 384)", "[5, 384]")


def test_extension_checks_shape(executor: Executor) -> None:
    base = {"kind": "prompt", "backbone": "minilm", "task": "x", "head": {"type": "embedding"}}
    with pytest.raises(ArtifactError, match="has shape"):
        PromptExtension(base, {"prompt.embeddings": torch.randn(4, 768)}, SPEC, config=executor.config)
    with pytest.raises(ArtifactError, match="missing"):
        PromptExtension(base, {}, SPEC, config=executor.config)
    with pytest.raises(ArtifactError, match="manifest says 5"):
        PromptExtension({**base, "prompt": {"virtual_tokens": 5}}, {"prompt.embeddings": torch.randn(4, 384)}, SPEC)
    ext = PromptExtension(base, {"prompt.embeddings": torch.randn(4, 384, dtype=torch.float64)}, SPEC)
    assert ext.prompt_len == 4 and ext.prompt is not None and ext.prompt.dtype == torch.float32


# --- executor exactness ------------------------------------------------------------

TEXTS_A = ["hi", "a much longer sentence that needs many more tokens than the first one does, with commas and all"]
TEXTS_B = ["the quick brown fox jumps over the lazy dog", "ok", "soft prompts shift every token's state"]
PLAIN = ["plain row without any prompt at all", "x"]


def plain_reference(texts: list[str]) -> np.ndarray:
    tok, model = tokenizer(), backbone_model()
    rows = []
    for t in texts:
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            rows.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])[0])
    return np.stack(rows)


def test_mixed_batch_matches_peft(sources: dict[int, TaskSource], executor: Executor) -> None:
    a, b = extension(sources[4], executor, "a"), extension(sources[12], executor, "b")
    plain = EmbeddingExtension({"kind": "embedding", "backbone": "minilm", "task": "plain"}, {}, SPEC)
    items = [
        WorkItem(Rows(texts=TEXTS_A), a),
        WorkItem(Rows(texts=PLAIN), plain),
        WorkItem(Rows(texts=TEXTS_B), b),
        WorkItem(Rows(texts=TEXTS_A[::-1]), b),  # same texts through the other prompt
    ]
    executor.run(items)
    for it in items:
        assert it.error is None, it.error
    want = [
        sources[4].reference(TEXTS_A)["EMBEDDING"],
        plain_reference(PLAIN),
        sources[12].reference(TEXTS_B)["EMBEDDING"],
        sources[12].reference(TEXTS_A[::-1])["EMBEDDING"],
    ]
    errors = [float(np.abs(it.result.out - w).max()) for it, w in zip(items, want)]  # type: ignore[union-attr]
    print(f"max abs error per item: {errors}")
    assert max(errors) < 1e-4, errors
    # The prompt really changes the answer (the test would be vacuous otherwise).
    assert np.abs(items[0].result.out - plain_reference(TEXTS_A)).max() > 1e-2  # type: ignore[union-attr]
    assert np.abs(items[0].result.out - items[3].result.out[::-1]).max() > 1e-2  # type: ignore[union-attr]


def test_embed_path_matches_peft(sources: dict[int, TaskSource], executor: Executor) -> None:
    """What ``task create --train`` fits on is what the host serves."""
    ext = extension(sources[12], executor, "b")
    got = executor.embed(TEXTS_B, extension=ext).numpy()
    assert np.abs(got - sources[12].reference(TEXTS_B)["EMBEDDING"]).max() < 1e-4


def test_prompt_plus_tokens_over_limit_is_a_client_error(sources: dict[int, TaskSource], executor: Executor) -> None:
    a = extension(sources[4], executor, "a")
    b = extension(sources[12], executor, "b")
    plain = EmbeddingExtension({"kind": "embedding", "backbone": "minilm", "task": "plain"}, {}, SPEC)
    long_text = " ".join(["word"] * 248)
    n = len(executor.tokenizer(long_text)["input_ids"])
    assert SPEC.max_tokens - 12 < n <= SPEC.max_tokens - 4, n  # too long with 12 prompt vectors only
    items = [
        WorkItem(Rows(texts=["short one", long_text]), b),
        WorkItem(Rows(texts=[long_text]), a),
        WorkItem(Rows(texts=[long_text]), plain),
        WorkItem(Rows(texts=TEXTS_B), b),
    ]
    executor.run(items)
    assert items[0].client_fault and items[0].result is None
    assert "12 prompt vectors" in (items[0].error or "") and "256" in (items[0].error or "")
    for it in items[1:]:
        assert it.error is None and not it.client_fault and it.result is not None, it.error
    assert np.abs(items[1].result.out - sources[4].reference([long_text])["EMBEDDING"]).max() < 1e-4  # type: ignore[union-attr]
    assert np.abs(items[3].result.out - sources[12].reference(TEXTS_B)["EMBEDDING"]).max() < 1e-4  # type: ignore[union-attr]


# --- the command line -------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def test_cli_task_create(sources: dict[int, TaskSource], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", str(repo))
    out = cli("task", "create", "soft", *sources[12].create_args, "--repo", str(repo))
    assert "prompt on minilm, embedding outputs" in out.stdout, out.stdout
    manifest = json.loads((repo / "soft" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "prompt" and manifest["prompt"] == {"virtual_tokens": 12}
    assert manifest["head"] == {"type": "embedding"}
    weights = load_file(str(repo / "soft" / "1" / "weights.safetensors"))
    assert tuple(weights["prompt.embeddings"].shape) == (12, 384)

    csv = tmp_path / "mood.csv"
    rows = ["text,label"]
    rows += [f"what a lovely and wonderful day number {i},happy" for i in range(6)]
    rows += [f"this is a miserable and awful day number {i},sad" for i in range(6)]
    csv.write_text("\n".join(rows) + "\n")
    out = cli("task", "create", "softmood", *sources[4].create_args, "--train", str(csv), "--repo", str(repo))
    assert "prompt on minilm, classifier outputs" in out.stdout, out.stdout
    manifest = json.loads((repo / "softmood" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "prompt" and manifest["head"] == {"type": "linear"}
    assert manifest["labels"] == ["happy", "sad"] and manifest["prompt"] == {"virtual_tokens": 4}
    weights = load_file(str(repo / "softmood" / "1" / "weights.safetensors"))
    assert tuple(weights["head.weight"].shape) == (2, 384) and tuple(weights["prompt.embeddings"].shape) == (4, 384)
    reg = json.loads((repo / "fmplex.registry.json").read_text())
    assert reg["tasks"]["softmood"]["kind"] == "prompt"
