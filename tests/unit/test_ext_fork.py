"""The ``fork`` kind (the task's own fine-tuned top layers): importer, extension, executor, CLI.

Checkpoints are made and saved by transformers itself and every expected answer
comes from that whole model run alone (:mod:`tests.kinds.fork`); fmplex must
match it row for row while mixing forks at different layers, different heads
and plain rows in one batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fmplex.artifacts import ArtifactError
from fmplex.backbones import get_backbone
from fmplex.control import importers
from fmplex.control.importers import SourceError
from fmplex.triton_backend.executor import Executor, WorkItem, pad_tokens
from fmplex.triton_backend.extensions.embedding import EmbeddingExtension
from fmplex.triton_backend.extensions.fork import ForkExtension
from fmplex.runtime.validation import Rows
from tests.kinds import TaskSource, backbone_model, mean_pool, tokenizer
from tests.kinds import fork as fork_kind

FMPLEX = str(Path(sys.executable).parent / "fmplex")
SPEC = get_backbone("minilm")
LAYERS = 6

# name -> (head, layers changed): cls forks at 4, token at 5, embedding at 3,
# and a classifier whose encoder is untouched (fork point 6: only the head).
CASES = {"cls": ("cls", 2), "token": ("token", 1), "emb": ("embedding", 3), "headonly": ("cls", 0)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskSource]:
    tmp = tmp_path_factory.mktemp("fork_src")
    return {name: fork_kind.make(tmp, seed=i + 1, head=head, layers=n) for i, (name, (head, n)) in enumerate(CASES.items())}


def source_dir(src: TaskSource) -> Path:
    return Path(src.create_args[src.create_args.index("--source") + 1])


def built(src: TaskSource, echo=lambda m: None) -> importers.Built:  # noqa: ANN001
    return importers.build("fork", source_dir(src), SPEC, {}, echo)


def extension(src: TaskSource, executor: Executor, name: str) -> ForkExtension:
    b = built(src)
    manifest = {"kind": "fork", "backbone": "minilm", "task": name, **b.manifest}
    return ForkExtension(manifest, b.tensors, SPEC, config=executor.config)


# --- importer ---------------------------------------------------------------------


def test_import_finds_fork_point_and_head(sources: dict[str, TaskSource]) -> None:
    for name, (head, changed) in CASES.items():
        said: list[str] = []
        b = built(sources[name], said.append)
        point = LAYERS - changed
        assert b.manifest["fork"] == {"point": point}, name
        assert b.manifest["head"] == {"type": head}, name
        layer_keys = {k for k in b.tensors if k.startswith("fork.layer.")}
        assert {int(k.split(".")[2]) for k in layer_keys} == set(range(point, LAYERS)), name
        assert len(layer_keys) == 16 * changed, name
        assert "attention.self.query.weight" in {k.split(".", 3)[3] for k in layer_keys} or not changed
        heads = {k for k in b.tensors if k.startswith("head.")}
        expected = {"cls": {"head.pooler.weight", "head.pooler.bias", "head.weight", "head.bias"},
                    "token": {"head.weight", "head.bias"}, "embedding": set()}[head]
        assert heads == expected, name
        assert set(b.tensors) == layer_keys | heads
        if head != "embedding":
            assert b.manifest["labels"] == fork_kind.LABELS[head]
        else:
            assert "labels" not in b.manifest
        text = " ".join(said)
        assert (f"fork at layer {point}: {changed} layer" in text) if changed else ("only the cls head" in text), text
    # the stored layers are exactly the checkpoint's (same numbers, BertLayer names)
    b = built(sources["cls"])
    ck = load_file(str(source_dir(sources["cls"]) / "model.safetensors"))
    assert torch.equal(b.tensors["fork.layer.5.output.LayerNorm.weight"], ck["bert.encoder.layer.5.output.LayerNorm.weight"])
    assert torch.equal(b.tensors["head.pooler.weight"], ck["bert.pooler.dense.weight"])
    assert torch.equal(b.tensors["head.weight"], ck["classifier.weight"])


def broken_copy(src: TaskSource, tmp: Path, config: dict | None = None, edit=None) -> Path:  # noqa: ANN001
    out = tmp / "broken"
    shutil.copytree(source_dir(src), out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        tensors = load_file(str(out / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(out / "model.safetensors"))
    return out


def refused(path: Path, *words: str) -> str:
    with pytest.raises(SourceError) as err:
        importers.build("fork", path, SPEC, {}, lambda m: None)
    for w in words:
        assert w in str(err.value), str(err.value)
    return str(err.value)


def test_refuses_changed_embeddings(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["bert.embeddings.word_embeddings.weight"][1234, 7] += 1e-3

    refused(broken_copy(sources["cls"], tmp_path, edit=edit), "embeddings differ: a fork can only own top layers", "word_embeddings")


def test_refuses_other_models(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources["cls"], tmp_path / "a", {"model_type": "roberta"}), "'roberta'", "BERT checkpoint")
    refused(broken_copy(sources["cls"], tmp_path / "b", {"hidden_size": 768}), "does not match backbone", "hidden_size 768")
    refused(broken_copy(sources["token"], tmp_path / "c", {"num_hidden_layers": 12, "num_attention_heads": 6}),
            "num_hidden_layers 12", "num_attention_heads 6")
    refused(broken_copy(sources["emb"], tmp_path / "d", {"vocab_size": 50000}), "vocab_size 50000")
    refused(broken_copy(sources["emb"], tmp_path / "e", {"layer_norm_eps": 1e-5}), "layer_norm_eps")


def test_refuses_unknown_architecture(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    msg = refused(broken_copy(sources["cls"], tmp_path, {"architectures": ["BertForMaskedLM"]}), "BertForMaskedLM", "not supported")
    assert "BertForSequenceClassification" in msg and "BertForTokenClassification" in msg


def test_refuses_pickle_only(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    out = tmp_path / "pickled"
    out.mkdir()
    shutil.copy(source_dir(sources["cls"]) / "config.json", out / "config.json")
    torch.save({"classifier.bias": torch.zeros(3)}, str(out / "pytorch_model.bin"))
    refused(out, "pytorch_model.bin", "pickle")
    (out / "pytorch_model.bin").unlink()
    refused(out, "no model.safetensors")


def test_refuses_missing_head(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    refused(broken_copy(sources["token"], tmp_path, edit=lambda t: t.pop("classifier.weight")), "classifier.weight")


# --- extension --------------------------------------------------------------------


def test_extension_builds_layers(sources: dict[str, TaskSource], executor: Executor) -> None:
    ext = extension(sources["cls"], executor, "c")
    assert ext.fork_point == 4 and len(ext.fork_layers) == 2
    layer = ext.fork_layers[0]
    assert not layer.training
    assert layer.attention.self.config._attn_implementation == executor.config._attn_implementation
    params = sum(p.numel() for layer in ext.fork_layers for p in layer.parameters())
    heads = sum(t.numel() for k, t in built(sources["cls"]).tensors.items() if k.startswith("head."))
    assert ext.nbytes == 4 * (params + heads) and params > 2 * 1_700_000
    # fork layers stored in fp16 run in fp32 and are counted once, as fp32 (head tensors as stored)
    half = {k: v.half() for k, v in built(sources["cls"]).tensors.items()}
    ext16 = ForkExtension({**ext.manifest, "task": "c16"}, half, SPEC, config=executor.config)
    assert ext16.fork_layers[0].output.dense.weight.dtype == torch.float32
    assert ext16.nbytes == 4 * params + 2 * heads
    ck = load_file(str(source_dir(sources["cls"]) / "model.safetensors"))
    assert torch.equal(ext.fork_layers[1].intermediate.dense.weight, ck["bert.encoder.layer.5.intermediate.dense.weight"])
    head_only = extension(sources["headonly"], executor, "h")
    assert head_only.fork_point == LAYERS and head_only.fork_layers == []


def test_extension_refusals(sources: dict[str, TaskSource], executor: Executor) -> None:
    b = built(sources["cls"])
    manifest = {"kind": "fork", "backbone": "minilm", "task": "t", **b.manifest}
    with pytest.raises(ArtifactError, match="config"):
        ForkExtension(manifest, b.tensors, SPEC)
    missing = {k: v for k, v in b.tensors.items() if k != "fork.layer.4.attention.self.key.bias"}
    with pytest.raises(ArtifactError, match="fork.layer.4.attention.self.key.bias' missing"):
        ForkExtension(manifest, missing, SPEC, config=executor.config)
    wrong = {**b.tensors, "fork.layer.5.intermediate.dense.weight": torch.zeros(1536, 385)}
    with pytest.raises(ArtifactError, match="shape"):
        ForkExtension(manifest, wrong, SPEC, config=executor.config)
    stray = {**b.tensors, "fork.layer.3.output.dense.bias": torch.zeros(384)}
    with pytest.raises(ArtifactError, match="unexpected fork tensor"):
        ForkExtension(manifest, stray, SPEC, config=executor.config)
    for point in (-1, 7, "4", None):
        with pytest.raises(ArtifactError, match="fork.point"):
            ForkExtension({**manifest, "fork": {"point": point}}, b.tensors, SPEC, config=executor.config)


# --- exactness in one shared batch ------------------------------------------------

TEXTS = {
    "cls": ["I loved it.", "The service was slow, the food cold, and nobody apologised for any of it.", "meh"],
    "token": ["Alice flew from Paris to Berlin on Tuesday morning.", "Bob"],
    "emb": ["a sentence of medium length about the weather", "short"],
    "headonly": ["works as advertised, nothing more"],
}


def test_mixed_batch_matches_transformers(sources: dict[str, TaskSource], executor: Executor) -> None:
    exts = {name: extension(sources[name], executor, name) for name in CASES}
    plain = EmbeddingExtension({"kind": "embedding", "backbone": "minilm", "task": "plain"}, {}, SPEC)
    plain_texts = ["plain row with a few more words than usual in it, to pad others"]
    items = {name: WorkItem(Rows(texts=TEXTS[name]), exts[name]) for name in CASES}
    again = WorkItem(Rows(texts=["a second request for the same fork"]), exts["cls"])  # same task, two requests
    items_list = [items["cls"], WorkItem(Rows(texts=plain_texts), plain), items["token"], items["emb"], again, items["headonly"]]
    executor.run(items_list)
    for it in items_list:
        assert it.error is None, it.error
    errors: dict[str, float] = {}

    for name in ("cls", "headonly"):
        ref = sources[name].reference(TEXTS[name])
        res = items[name].result
        errors[name] = float(np.abs(res.out - ref["LOGITS"]).max())
        assert list(res.txt) == list(ref["LABEL"])
    ref = sources["cls"].reference(again.rows.texts)
    errors["cls (2nd request)"] = float(np.abs(again.result.out - ref["LOGITS"]).max())
    assert list(again.result.txt) == list(ref["LABEL"])

    ref = sources["token"].reference(TEXTS["token"])["TOKEN_LOGITS"]
    got = pad_tokens(items["token"].result.tok)
    assert got.shape == ref.shape == (2, ref.shape[1], 4)
    errors["token"] = float(np.abs(got - ref).max())

    ref = sources["emb"].reference(TEXTS["emb"])["EMBEDDING"]
    errors["emb"] = float(np.abs(items["emb"].result.out - ref).max())

    tok, base = tokenizer(), backbone_model()
    enc = tok(plain_texts[0], return_tensors="pt")
    with torch.no_grad():
        want = mean_pool(base(**enc).last_hidden_state, enc["attention_mask"])
    errors["plain"] = float(np.abs(items_list[1].result.out - want).max())

    print("max abs error per task:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert all(v < 1e-4 for v in errors.values()), errors
    # the forks really change something (their answers are not the backbone's)
    emb_base = executor.encode([np.asarray(tok(TEXTS["emb"][0])["input_ids"])]).numpy()
    assert np.abs(items["emb"].result.out[:1] - emb_base).max() > 1e-3


# --- CLI --------------------------------------------------------------------------


def test_cli_task_create(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init = subprocess.run([FMPLEX, "init", str(repo)], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    out = subprocess.run([FMPLEX, "task", "create", "sentiment", *sources["cls"].create_args, "--repo", str(repo)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fork at layer 4: 2 layers + cls head" in out.stdout, out.stdout
    manifest = json.loads((repo / "sentiment" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "fork" and manifest["fork"] == {"point": 4}
    assert manifest["head"] == {"type": "cls"} and manifest["labels"] == fork_kind.LABELS["cls"]
    assert set(load_file(str(repo / "sentiment" / "1" / "weights.safetensors"))) == set(built(sources["cls"]).tensors)
    bad = subprocess.run([FMPLEX, "task", "create", "bad", "--kind", "fork", "--source", str(tmp_path), "--repo", str(repo)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "config.json" in bad.stderr, bad.stderr
