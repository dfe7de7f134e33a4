"""LoRA tasks: PEFT adapters imported as written, exact inside a shared batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fmplex.backbones import get_backbone
from fmplex.control import importers
from fmplex.control.importers import SourceError
from fmplex.triton_backend.executor import Executor, WorkItem
from fmplex.triton_backend.extensions.embedding import EmbeddingExtension
from fmplex.triton_backend.extensions.lora import LoraExtension
from fmplex.runtime.validation import Rows

from ..kinds import lora as lora_source

SPEC = get_backbone("minilm")
TEXTS = ["a short one", "a considerably longer sentence, so the batch needs padding for the others", "mid length text here"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("lora")
    return {
        "r4": lora_source.make(tmp, seed=1, rank=4),
        "r16": lora_source.make(tmp, seed=2, rank=16, targets=("query", "key", "intermediate.dense", "output.dense")),
    }


def load(src: object, executor: Executor) -> LoraExtension:
    built = importers.build("lora", Path(src.create_args[-1]), SPEC, {}, lambda m: None)  # type: ignore[attr-defined]
    manifest = {"kind": "lora", "backbone": "minilm", "task": "t", "head": {"type": "embedding"}, **built.manifest}
    return LoraExtension(manifest, built.tensors, SPEC, config=executor.config)


def test_two_ranks_and_a_plain_task_in_one_batch_are_exact(executor: Executor, sources: dict[str, object]) -> None:
    r4, r16 = load(sources["r4"], executor), load(sources["r16"], executor)
    plain = EmbeddingExtension({"kind": "embedding", "backbone": "minilm"}, {}, SPEC)
    items = [
        WorkItem(Rows(texts=TEXTS[:2]), r4),
        WorkItem(Rows(texts=[TEXTS[2]]), plain),
        WorkItem(Rows(texts=TEXTS), r16),
        WorkItem(Rows(texts=[TEXTS[1]]), r4),
    ]
    executor.run(items)
    want = {
        id(r4): sources["r4"].reference,  # type: ignore[attr-defined]
        id(r16): sources["r16"].reference,  # type: ignore[attr-defined]
    }
    for item in items:
        assert item.error is None and item.result is not None
        texts = item.rows.texts or []
        if item.extension is plain:
            expect = _plain(texts)
        else:
            expect = want[id(item.extension)](texts)["EMBEDDING"]
        np.testing.assert_allclose(item.result.out, expect, atol=1e-4, rtol=0)
    # The adapters really change the answer (the test could fail).
    assert np.abs(items[0].result.out - _plain(TEXTS[:2])).max() > 1e-3


def _plain(texts: list[str]) -> np.ndarray:
    """The plain backbone's sentence embeddings, by transformers alone."""
    from ..kinds import backbone_model, embedding_reference, tokenizer

    return embedding_reference(backbone_model(), tokenizer())(texts)["EMBEDDING"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: (d / "adapter_config.json").write_text(json.dumps({**json.loads((d / "adapter_config.json").read_text()), "peft_type": "IA3"})), "not 'LORA'"),
        (lambda d: (d / "adapter_config.json").write_text(json.dumps({**json.loads((d / "adapter_config.json").read_text()), "use_dora": True})), "use_dora"),
        (lambda d: (d / "adapter_config.json").write_text(json.dumps({**json.loads((d / "adapter_config.json").read_text()), "r": 7})), "rank 4 but the config says 7"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "never pickle"),
        (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    ],
)
def test_bad_adapters_are_refused(sources: dict[str, object], tmp_path: Path, mutate: object, words: str) -> None:
    d = _copy(Path(sources["r4"].create_args[-1]), tmp_path / "bad")  # type: ignore[attr-defined]
    mutate(d)  # type: ignore[operator]
    with pytest.raises(SourceError, match=words):
        importers.build("lora", d, SPEC, {}, lambda m: None)


def test_lora_on_an_unsupported_module_is_refused(sources: dict[str, object], tmp_path: Path) -> None:
    d = _copy(Path(sources["r4"].create_args[-1]), tmp_path / "emb")  # type: ignore[attr-defined]
    w = load_file(str(d / "adapter_model.safetensors"))
    w["base_model.model.embeddings.word_embeddings.lora_A.weight"] = torch.zeros(4, 384)
    w["base_model.model.embeddings.word_embeddings.lora_B.weight"] = torch.zeros(384, 4)
    save_file(w, str(d / "adapter_model.safetensors"))
    with pytest.raises(SourceError, match="not supported"):
        importers.build("lora", d, SPEC, {}, lambda m: None)


def test_cli_imports_a_peft_dir_and_trains_a_head_on_lora_features(sources: dict[str, object], tmp_path: Path) -> None:
    fmplex = str(Path(sys.executable).parent / "fmplex")
    repo = tmp_path / "repo"
    subprocess.run([fmplex, "init", str(repo)], check=True, capture_output=True)
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"good happy day {i},pos\nbad sad day {i},neg\n" for i in range(6)))
    out = subprocess.run(
        [fmplex, "task", "create", "lt", "--kind", "lora", "--source", sources["r4"].create_args[-1], "--train", str(csv), "--repo", str(repo)],  # type: ignore[attr-defined]
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "classifier outputs" in out.stdout
    manifest = json.loads((repo / "lt" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "lora" and manifest["head"] == {"type": "linear"} and manifest["labels"] == ["neg", "pos"]
    assert len(manifest["lora"]["scales"]) == 30  # 6 layers x (query, value, 3 dense); the pooler is skipped
