"""Adapter tasks: bottleneck adapter files imported and checked, exact inside a
shared batch against forward hooks on a plain transformers model
(:mod:`tests.kinds.adapter`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fmplex.artifacts import ArtifactError
from fmplex.backbones import get_backbone
from fmplex.control import importers
from fmplex.control.importers import SourceError
from fmplex.triton_backend.executor import Executor, WorkItem
from fmplex.triton_backend.extensions.adapter import AdapterExtension
from fmplex.triton_backend.extensions.embedding import EmbeddingExtension
from fmplex.runtime.validation import Rows

from ..kinds import TaskSource, backbone_model, mean_pool, tokenizer
from ..kinds import adapter as adapter_source

SPEC = get_backbone("minilm")
FMPLEX = str(Path(sys.executable).parent / "fmplex")
TEXTS = ["a short one", "a considerably longer sentence, so the batch needs padding for the others", "mid length text here"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskSource]:
    tmp = tmp_path_factory.mktemp("adapter")
    return {
        "b16": adapter_source.make(tmp, seed=1, bottleneck=16),
        "b4": adapter_source.make(tmp, seed=2, bottleneck=4, activation="gelu", places=((0, "output"), (2, "attention"), (5, "attention"))),
        "b32": adapter_source.make(tmp, seed=3, bottleneck=32, activation="tanh", places=((4, "output"),)),
    }


def load(src: TaskSource, executor: Executor) -> AdapterExtension:
    built = importers.build("adapter", Path(src.create_args[-1]), SPEC, {}, lambda m: None)
    manifest = {"kind": "adapter", "backbone": "minilm", "task": "t", "head": {"type": "embedding"}, **built.manifest}
    return AdapterExtension(manifest, built.tensors, SPEC, config=executor.config)


def plain(texts: list[str]) -> np.ndarray:
    tok, model = tokenizer(), backbone_model()
    outs = []
    for t in texts:
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            outs.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])[0])
    return np.stack(outs)


def test_adapters_of_three_bottlenecks_and_a_plain_task_in_one_batch_are_exact(executor: Executor, sources: dict[str, TaskSource]) -> None:
    exts = {k: load(s, executor) for k, s in sources.items()}
    emb = EmbeddingExtension({"kind": "embedding", "backbone": "minilm"}, {}, SPEC)
    items = [
        WorkItem(Rows(texts=TEXTS[:2]), exts["b16"]),
        WorkItem(Rows(texts=[TEXTS[2]]), emb),
        WorkItem(Rows(texts=TEXTS), exts["b4"]),
        WorkItem(Rows(texts=[TEXTS[1]]), exts["b32"]),
        WorkItem(Rows(texts=[TEXTS[2], TEXTS[0]]), exts["b16"]),
    ]
    executor.run(items)
    owner = {id(e): k for k, e in exts.items()}
    worst = 0.0
    for item in items:
        assert item.error is None and item.result is not None, item.error
        texts = item.rows.texts or []
        want = plain(texts) if item.extension is emb else sources[owner[id(item.extension)]].reference(texts)["EMBEDDING"]
        np.testing.assert_allclose(item.result.out, want, atol=1e-4, rtol=0)
        worst = max(worst, float(np.abs(item.result.out - want).max()))
    print(f"max abs error {worst:.2e}")
    # The adapters really change the answer (the test could fail).
    for item in (items[0], items[2], items[3]):
        assert np.abs(item.result.out - plain(item.rows.texts or [])).max() > 1e-3  # type: ignore[union-attr]


def test_the_importer_stores_per_linear_tensors(sources: dict[str, TaskSource]) -> None:
    built = importers.build("adapter", Path(sources["b4"].create_args[-1]), SPEC, {}, lambda m: None)
    assert built.manifest == {
        "adapter": {
            "activation": "gelu",
            "modules": ["encoder.layer.0.output.dense", "encoder.layer.2.attention.output.dense", "encoder.layer.5.attention.output.dense"],
        }
    }
    assert built.tensors["adapter.encoder.layer.2.attention.output.dense.down.weight"].shape == (4, 384)
    assert built.tensors["adapter.encoder.layer.0.output.dense.up.weight"].shape == (384, 4)
    assert len(built.tensors) == 12 and all(t.dtype == torch.float32 for t in built.tensors.values())


def _good() -> dict[str, torch.Tensor]:
    return adapter_source.adapter_tensors(0, 8, ((1, "attention"), (2, "output")))


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


A1 = "encoder.layer.1.attention.adapter"


@pytest.mark.parametrize(
    "mutate, metadata, words",
    [
        (_set(f"{A1}.down.weight", torch.zeros(8, 100)), None, r"down.weight' has shape \(8, 100\), expected \[bottleneck, 384\]"),
        (_set(f"{A1}.up.weight", torch.zeros(384, 6)), None, r"up.weight' has shape \(384, 6\), expected \[384, 8\] \(bottleneck 8"),
        (_set(f"{A1}.down.bias", torch.zeros(7)), None, r"down.bias' has shape \(7,\), expected \[8\]"),
        (_set(f"{A1}.up.bias", torch.zeros(384, 1)), None, r"up.bias' has shape \(384, 1\), expected \[384\]"),
        (_set("encoder.layer.6.output.adapter.down.weight", torch.zeros(8, 384)), None, r"layer 6, but the backbone has layers 0..5"),
        (_set("encoder.layer.1.intermediate.adapter.down.weight", torch.zeros(8, 384)), None, "unexpected tensor 'encoder.layer.1.intermediate"),
        (_set("classifier.weight", torch.zeros(2, 384)), None, "unexpected tensor 'classifier.weight'"),
        (lambda t: t.pop(f"{A1}.up.bias"), None, f"lacks {A1}.up.bias"),
        (_set(f"{A1}.down.weight", torch.full((8, 384), float("nan"))), None, "holds NaN or Inf"),
        (_set(f"{A1}.up.bias", torch.full((384,), float("inf"))), None, "holds NaN or Inf"),
        (_set(f"{A1}.up.bias", torch.zeros(384, dtype=torch.int32)), None, "not a floating type"),
        (lambda t: t.clear(), None, "holds no adapter tensors"),
        (None, {"activation": "swish"}, "unknown activation 'swish'"),
    ],
)
def test_bad_adapter_files_are_refused(tmp_path: Path, mutate: Any, metadata: dict[str, str] | None, words: str) -> None:
    tensors = _good()
    if mutate is not None:
        mutate(tensors)
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(SourceError, match=words):
        importers.build("adapter", path, SPEC, {}, lambda m: None)


def test_non_safetensors_sources_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(b"PK\x03\x04 not safetensors at all")
    with pytest.raises(SourceError, match="not a readable safetensors file"):
        importers.build("adapter", bad, SPEC, {}, lambda m: None)
    with pytest.raises(SourceError, match="is a directory"):
        importers.build("adapter", tmp_path, SPEC, {}, lambda m: None)
    with pytest.raises(SourceError, match="does not exist"):
        importers.build("adapter", tmp_path / "missing.safetensors", SPEC, {}, lambda m: None)


def test_default_activation_is_relu(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file(_good(), str(path))
    assert importers.build("adapter", path, SPEC, {}, lambda m: None).manifest["adapter"]["activation"] == "relu"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m, t: m.pop("adapter"), "lacks 'adapter'"),
        (lambda m, t: m["adapter"].update(activation="swish"), "unknown adapter activation"),
        (lambda m, t: m["adapter"].update(modules=[]), "lacks adapter.modules"),
        (lambda m, t: m["adapter"]["modules"].append("encoder.layer.1.intermediate.dense"), "not after an attention or MLP output"),
        (lambda m, t: m["adapter"]["modules"].append("encoder.layer.9.output.dense"), "beyond the backbone's 6 layers"),
        (lambda m, t: t.pop("adapter.encoder.layer.2.output.dense.up.weight"), "up.weight' missing"),
        (lambda m, t: t.__setitem__("adapter.encoder.layer.2.output.dense.up.bias", torch.zeros(383)), r"expected \(384,\)"),
        (lambda m, t: m["adapter"]["modules"].pop(), "not listed in adapter.modules"),
    ],
)
def test_bad_artifacts_are_refused_at_load(executor: Executor, change: Any, words: str) -> None:
    good = _good()
    tensors = {
        f"adapter.encoder.layer.{path}.{p}": good[f"encoder.layer.{src}.adapter.{p}"]
        for path, src in (("1.attention.output.dense", "1.attention"), ("2.output.dense", "2.output"))
        for p in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    manifest = {
        "kind": "adapter", "backbone": "minilm", "task": "t", "head": {"type": "embedding"},
        "adapter": {"activation": "relu", "modules": ["encoder.layer.1.attention.output.dense", "encoder.layer.2.output.dense"]},
    }
    AdapterExtension(json.loads(json.dumps(manifest)), dict(tensors), SPEC, config=executor.config)  # the unchanged one loads
    change(manifest, tensors)
    with pytest.raises(ArtifactError, match=words):
        AdapterExtension(manifest, tensors, SPEC, config=executor.config)


def test_cli_creates_an_adapter_task(sources: dict[str, TaskSource], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run([FMPLEX, "init", str(repo)], check=True, capture_output=True, timeout=300)
    out = subprocess.run([FMPLEX, "task", "create", "ad", *sources["b16"].create_args, "--repo", str(repo)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "adapter: 5 modules, bottleneck 16, relu" in out.stdout and "embedding outputs" in out.stdout
    manifest = json.loads((repo / "ad" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["head"] == {"type": "embedding"}
    assert len(manifest["adapter"]["modules"]) == 5
    # A bad file is one clear line, and no version is left behind.
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder.layer.0.output.adapter.down.weight": torch.zeros(4, 384)}, str(bad), metadata={"activation": "relu"})
    out = subprocess.run([FMPLEX, "task", "create", "ad2", "--kind", "adapter", "--source", str(bad), "--repo", str(repo)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "lacks encoder.layer.0.output.adapter.down.bias" in out.stderr
    assert not (repo / "ad2").exists()
