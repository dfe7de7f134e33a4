"""PEFT adapters with their trained heads: imported whole, or refused with one line.

Artifacts are made by peft itself (tests/kinds/peft_heads.py) and then broken
on purpose; exactness against PeftModel is checked here in one shared batch
of all six kinds (the executor alone) and end to end in tests/e2e/test_peft.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fmplex.backbones import get_backbone
from fmplex.control import importers
from fmplex.control.importers import SourceError
from fmplex.triton_backend.executor import Executor, WorkItem, pad_tokens
from fmplex.triton_backend.extensions import extension_class
from fmplex.runtime.validation import Rows

from ..kinds import TaskSource, peft_heads

SPEC = get_backbone("minilm")
VARIANTS = ("lora_qv", "lora_all", "lora_pattern", "prompt", "ia3", "lora_token")
TEXTS = ["ok", "Zürich café — naïve 東京 😀🎉 rocks!", "A new laptop with a faster chip and a much better battery was announced today."]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskSource]:
    tmp = tmp_path_factory.mktemp("peft")
    return {v: peft_heads.make(tmp, v, seed=i) for i, v in enumerate(VARIANTS)}


def _dir(src: TaskSource) -> Path:
    return Path(src.create_args[src.create_args.index("--source") + 1])


def _options(src: TaskSource, **extra: Any) -> dict[str, Any]:
    a = src.create_args
    return {"labels": a[a.index("--labels") + 1].split(",") if "--labels" in a else None, **extra}


def _build(src: TaskSource, path: Path | None = None, **extra: Any) -> importers.Built:
    return importers.build(src.kind, path or _dir(src), SPEC, _options(src, **extra), lambda m: None)


def test_all_six_in_one_batch_equal_peft_alone(executor: Executor, sources: dict[str, TaskSource]) -> None:
    """1e-4 absolute + 1e-4 relative in fp32, labels exact; each row among rows of the five others."""
    items = []
    for name, src in sources.items():
        built = _build(src)
        manifest = {"kind": src.kind, "backbone": "minilm", "task": name, "head": {"type": "embedding"}, **built.manifest}
        ext = extension_class(src.kind)(manifest, built.tensors, SPEC, config=executor.config)
        items.append((name, src, WorkItem(Rows(texts=TEXTS), ext)))
    executor.run([it for _, _, it in items])
    for name, src, item in items:
        assert item.error is None and item.result is not None, (name, item.error)
        for out, want in src.reference(TEXTS).items():
            got = {"LOGITS": item.result.out, "LABEL": item.result.txt}.get(out)
            if out == "TOKEN_LOGITS":
                got = pad_tokens(item.result.tok or [])
            if want.dtype == object:
                assert list(got) == list(want), name
            else:
                assert np.abs(want).max() > 0.1, name  # the head says something
                np.testing.assert_allclose(got, want, atol=src.atol, rtol=src.rtol, err_msg=name)


def test_heads_labels_and_pooler_merge_are_recorded(sources: dict[str, TaskSource]) -> None:
    qv = _build(sources["lora_qv"])
    assert qv.manifest["head"] == {"type": "cls"} and qv.manifest["labels"] == peft_heads.LABELS3  # id2label beside the adapter
    assert _build(sources["lora_pattern"]).manifest["labels"] == ["w", "x", "y", "z"]  # --labels
    assert _build(sources["ia3"]).manifest["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]  # transformers' default names
    assert _build(sources["lora_token"]).manifest["head"] == {"type": "token"}
    base = load_file(str(SPEC.locate() / "model.safetensors"))["pooler.dense.weight"]
    assert torch.equal(qv.tensors["head.pooler.weight"], base)  # no pooler LoRA: the backbone's pooler
    merged = _build(sources["lora_all"])
    assert not any(k.startswith("lora.pooler") for k in merged.tensors)
    assert (merged.tensors["head.pooler.weight"] - base).abs().max() > 1e-3  # the pooler LoRA is in the head
    ia3 = _build(sources["ia3"])
    assert (ia3.tensors["head.pooler.weight"] - base).abs().max() > 1e-3
    assert "encoder.layer.0.attention.output.dense" in ia3.manifest["ia3"]["feedforward"]  # PEFT's suffix rule, no dot


def _edit_weights(src: TaskSource, tmp: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    d = tmp / "bad"
    shutil.copytree(_dir(src), d)
    w = load_file(str(d / "adapter_model.safetensors"))
    edit(w)
    save_file(w, str(d / "adapter_model.safetensors"))
    return d


def _edit_config(src: TaskSource, tmp: Path, **fields: Any) -> Path:
    d = tmp / "bad"
    shutil.copytree(_dir(src), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return d


CLS_W = "base_model.model.classifier.weight"
CLS_B = "base_model.model.classifier.bias"


@pytest.mark.parametrize(
    ("variant", "edit", "words"),
    [
        ("lora_qv", lambda w: w.update({CLS_W: torch.zeros(3, 100)}), r"classifier.weight has shape \(3, 100\), but backbone 'minilm' has hidden size 384"),
        ("lora_qv", lambda w: w.pop(CLS_B), "the saved classifier lacks its bias"),
        ("lora_qv", lambda w: w[CLS_W].__setitem__((0, 0), float("nan")), "holds NaN or Inf"),
        ("lora_qv", lambda w: w.update({CLS_B: torch.zeros(4)}), r"classifier.bias has shape \(4,\), expected \(3,\)"),
        ("lora_qv", lambda w: w.update({CLS_W: torch.zeros(1, 384), CLS_B: torch.zeros(1)}), "need at least 2 labels"),
        ("prompt", lambda w: w.update({"base_model.classifier.weight": torch.zeros(3, 8)}), "hidden size 384"),
        ("ia3", lambda w: w.update({"base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l": torch.ones(1, 384)}), "does not fit"),
        ("lora_qv", lambda w: w.update({"base_model.model.bert.embeddings.word_embeddings.lora_A.weight": torch.zeros(8, 30522),
                                        "base_model.model.bert.embeddings.word_embeddings.lora_B.weight": torch.zeros(384, 8)}), "not supported"),
    ],
)
def test_heads_and_bodies_that_do_not_fit_are_refused(sources: dict[str, TaskSource], tmp_path: Path, variant: str, edit: Any, words: str) -> None:
    d = _edit_weights(sources[variant], tmp_path, edit)
    with pytest.raises(SourceError, match=words):
        _build(sources[variant], d)


@pytest.mark.parametrize(
    ("variant", "fields", "words"),
    [
        ("lora_qv", {"task_type": "CAUSAL_LM"}, "task_type 'CAUSAL_LM' is not served"),
        ("lora_qv", {"use_dora": True}, "DoRA"),
        ("lora_qv", {"lora_bias": True}, "LoRA biases"),
        ("lora_qv", {"init_lora_weights": "pissa"}, "rewrites the base model's weights"),
        ("lora_qv", {"peft_type": "IA3"}, "use --kind ia3"),
        ("ia3", {"peft_type": "LORA"}, "use --kind lora"),
        ("lora_qv", {"modules_to_save": ["classifier", "embeddings"]}, None),  # listed but not saved: nothing to refuse
        ("lora_token", {"task_type": "FEATURE_EXTRACTION"}, "a classifier is saved, but task_type is 'FEATURE_EXTRACTION'"),
    ],
)
def test_configs_that_change_the_model_are_refused(sources: dict[str, TaskSource], tmp_path: Path, variant: str, fields: dict, words: str | None) -> None:
    d = _edit_config(sources[variant], tmp_path, **fields)
    if words is None:
        _build(sources[variant], d)
        return
    with pytest.raises(SourceError, match=words):
        _build(sources[variant], d)


def test_labels_and_train_conflicts_are_refused(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    src = sources["lora_qv"]
    with pytest.raises(SourceError, match="--train would replace it"):
        _build(src, train=True)
    with pytest.raises(SourceError, match="--labels names 2 labels, the trained classifier has 3 outputs"):
        importers.build("lora", _dir(src), SPEC, {"labels": ["a", "b"]}, lambda m: None)
    d = tmp_path / "cfg"
    shutil.copytree(_dir(src), d)
    (d / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(SourceError, match=r"id2label has ids \[0, 1\], the trained classifier has 3 outputs"):
        _build(src, d)


def test_pooler_lora_in_a_token_adapter_is_refused(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    key = "base_model.model.bert.pooler.dense"
    d = _edit_weights(sources["lora_token"], tmp_path, lambda w: w.update(
        {f"{key}.lora_A.weight": torch.ones(4, 384), f"{key}.lora_B.weight": torch.ones(384, 4)}))
    with pytest.raises(SourceError, match="BertForTokenClassification has no pooler"):
        _build(sources["lora_token"], d)


def test_task_create_refuses_in_one_line_and_stores_nothing(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    from fmplex.control.cli import main

    repo = tmp_path / "repo"
    assert CliRunner().invoke(main, ["init", str(repo)]).exit_code == 0
    d = _edit_weights(sources["lora_qv"], tmp_path, lambda w: w.pop(CLS_B))
    result = CliRunner().invoke(main, ["task", "create", "bad", "--kind", "lora", "--source", str(d), "--repo", str(repo)])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "lacks its bias" in lines[0], result.output
    assert not (repo / "bad").exists()


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (None, "is missing"),
        (lambda p: p.write_text("{"), "is not valid JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "is not valid JSON"),
        (lambda p: p.write_text("[1, 2]"), "must hold a JSON object"),
    ],
)
def test_importers_read_json_with_the_readers_rules_as_a_source_error(tmp_path: Path, write: Any, words: str) -> None:
    """The importers of other sources share the PEFT reader's JSON rules, but refuse as a SourceError (what the CLI reports)."""
    path = tmp_path / "config.json"
    if write is not None:
        write(path)
    with pytest.raises(SourceError, match=words) as err:
        importers.read_json(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_importers_read_safetensors_refuses_pickle_as_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    with pytest.raises(SourceError, match="is missing .only safetensors"):
        importers.read_safetensors(path)
    path.write_bytes(b"\x80\x04\x95 a pickle")
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        importers.read_safetensors(path)
    save_file({"w": torch.ones(2)}, str(path))
    assert torch.equal(importers.read_safetensors(path)["w"], torch.ones(2))
