"""ONNX heads: graphs imported and checked, exact inside a batch shared with
adapter tasks and a plain task (references in :mod:`tests.kinds.onnx` and
:mod:`tests.kinds.adapter`), a failing graph failing only its own rows, and a
classifier's linear head exported to ONNX and back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fmplex.artifacts import ArtifactError, read_manifest, read_weights
from fmplex.backbones import get_backbone
from fmplex.control import importers
from fmplex.control.export_onnx import ExportError, export_task
from fmplex.control.importers import SourceError
from fmplex.control.train import write_artifact
from fmplex.triton_backend.executor import Executor, WorkItem, pad_tokens
from fmplex.triton_backend.extensions import Extension, load_extension
from fmplex.triton_backend.extensions.embedding import EmbeddingExtension
from fmplex.triton_backend.extensions.onnx_extension import OnnxExtension
from fmplex.triton_backend.extensions.onnx_head import OnnxHead, open_session
from fmplex.runtime.validation import Rows

from ..kinds import TaskSource, backbone_model, mean_pool, tokenizer
from ..kinds import adapter as adapter_source
from ..kinds import onnx as onnx_source

SPEC = get_backbone("minilm")
FMPLEX = str(Path(sys.executable).parent / "fmplex")
TEXTS = ["a short one", "a considerably longer sentence, so the batch needs padding for the others", "mid length text here"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def sources(tmp: Path) -> dict[str, TaskSource]:
    return {
        "pooled": onnx_source.make(tmp, seed=1, mode="pooled"),
        "token": onnx_source.make(tmp, seed=2, mode="hidden"),
        "ad16": adapter_source.make(tmp, seed=3, bottleneck=16),
        "ad4": adapter_source.make(tmp, seed=4, bottleneck=4, activation="gelu", places=((1, "output"), (4, "attention"))),
    }


def options(args: list[str]) -> tuple[Path, dict[str, Any]]:
    """`task create` arguments -> (source, importer options), as the CLI does."""
    d = dict(zip(args[::2], args[1::2]))
    labels = d.get("--labels")
    return Path(d["--source"]), {
        "labels": labels.split(",") if labels else None,
        "onnx_input": d.get("--onnx-input", "pooled"),
        "onnx_family": d.get("--onnx-family", "classifier"),
    }


def artifact(src: TaskSource, where: Path, executor: Executor) -> Extension:
    """Import, write the artifact as `task create` does, load it as the host does."""
    source, opts = options(src.create_args)
    built = importers.build(src.kind, source, SPEC, opts, lambda m: None)
    out = where / "1"
    write_artifact(out, where.name, 1, "minilm", src.kind, {"head": {"type": "embedding"}, **built.manifest}, built.tensors, built.files, "test")
    return load_extension(out, SPEC, config=executor.config)


def plain(texts: list[str]) -> np.ndarray:
    tok, model = tokenizer(), backbone_model()
    outs = []
    for t in texts:
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            outs.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])[0])
    return np.stack(outs)


def compare(item: WorkItem, want: dict[str, np.ndarray]) -> float:
    assert item.error is None and item.result is not None, item.error
    worst = 0.0
    for name, value in want.items():
        if name == "LABEL":
            assert list(item.result.txt) == list(value)  # type: ignore[arg-type]
            continue
        got = pad_tokens(item.result.tok) if name == "TOKEN_LOGITS" else item.result.out  # type: ignore[arg-type]
        assert got is not None and got.shape == value.shape, (name, None if got is None else got.shape, value.shape)
        np.testing.assert_allclose(got, value, atol=1e-4, rtol=0, err_msg=name)
        worst = max(worst, float(np.abs(got - value).max()))
    return worst


def test_onnx_heads_adapters_and_a_plain_task_in_one_batch_are_exact(executor: Executor, sources: dict[str, TaskSource], tmp: Path) -> None:
    exts = {k: artifact(s, tmp / "repo" / k, executor) for k, s in sources.items()}
    assert isinstance(exts["pooled"], OnnxExtension) and isinstance(exts["pooled"].head, OnnxHead)
    emb = EmbeddingExtension({"kind": "embedding", "backbone": "minilm"}, {}, SPEC)
    items = [
        WorkItem(Rows(texts=TEXTS[:2]), exts["ad16"]),
        WorkItem(Rows(texts=TEXTS), exts["pooled"]),
        WorkItem(Rows(texts=[TEXTS[2]]), emb),
        WorkItem(Rows(texts=[TEXTS[1], TEXTS[0]]), exts["token"]),
        WorkItem(Rows(texts=[TEXTS[2], TEXTS[1]]), exts["ad4"]),
        WorkItem(Rows(texts=[TEXTS[0]]), exts["token"]),
        WorkItem(Rows(texts=[TEXTS[1]]), exts["pooled"]),
    ]
    executor.run(items)
    owner = {id(e): k for k, e in exts.items()}
    worst: dict[str, float] = {}
    for item in items:
        texts = item.rows.texts or []
        key = "plain" if item.extension is emb else owner[id(item.extension)]
        want = {"EMBEDDING": plain(texts)} if key == "plain" else sources[key].reference(texts)
        worst[key] = max(worst.get(key, 0.0), compare(item, want))
    print("max abs error", {k: f"{v:.2e}" for k, v in worst.items()})
    assert items[3].result.tok[0].shape[0] > items[3].result.tok[1].shape[0]  # type: ignore[union-attr] - cut per row


# --- graphs for refusals ------------------------------------------------------
def _gemm(width: int = 384, labels: int = 3, batch: Any = "n", name: str = "pooled") -> Any:
    w = np.zeros((labels, width), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", [name, "W"], ["logits"], transB=1)],
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, labels])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return _model(graph)


def _model(graph: Any) -> Any:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _token_graph() -> Any:
    return onnx_source.token_graph(np.zeros((384, 2), np.float32), np.zeros(2, np.float32))


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def _build(path: Path, labels: list[str] | None = None, mode: str = "pooled", family: str = "classifier") -> importers.Built:
    return importers.build("onnx", path, SPEC, {"labels": labels, "onnx_input": mode, "onnx_family": family}, lambda m: None)


ABC = ["a", "b", "c"]


@pytest.mark.parametrize(
    "model, labels, mode, family, words",
    [
        (lambda: _gemm(), None, "pooled", "classifier", "classifier head needs --labels"),
        (lambda: _token_graph(), None, "hidden", "token", "token head needs --labels"),
        (lambda: _gemm(), ["a"], "pooled", "classifier", "at least two labels"),
        (lambda: _gemm(), ["a", "b", "a"], "pooled", "classifier", "duplicate labels: a"),
        (lambda: _gemm(), ["a", "b"], "pooled", "classifier", "output 'logits' has 3 columns for 2 labels"),
        (lambda: _gemm(), ABC, "pooled", "token", "a token head needs the token states"),
        (lambda: _gemm(width=128), ABC, "pooled", "classifier", "input 'pooled' has width 128, the backbone's hidden size is 384"),
        (lambda: _gemm(batch=1), ABC, "pooled", "classifier", "fixed batch size 1; it must be dynamic"),
        (lambda: _gemm(), ABC, "hidden", "classifier", "needs graph inputs 'hidden' [rows, tokens, 384]"),
        (lambda: _gemm(name="hidden"), ABC, "hidden", "classifier", "input 'hidden' has rank 2, expected 3"),
        (lambda: _token_graph(), ["O", "X"], "pooled", "classifier", "exactly one input"),
        (lambda: _token_graph(), ["O", "X"], "hidden", "classifier", "output 'token_logits' has rank 3; a classifier head returns rank 2"),
        (lambda: _token_graph(), ["O", "X", "Y"], "hidden", "token", "has 2 columns for 3 labels"),
    ],
)
def test_mismatched_onnx_heads_are_refused(tmp_path: Path, model: Any, labels: list[str] | None, mode: str, family: str, words: str) -> None:
    path = _save(model(), tmp_path / "h.onnx")
    with pytest.raises(SourceError, match=_re(words)):
        _build(path, labels, mode, family)


def _re(words: str) -> str:
    import re

    return re.escape(words)


def test_files_that_are_not_runnable_onnx_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "h.onnx"
    text.write_text("this is not a protobuf, just some words\n" * 20)
    with pytest.raises(SourceError, match="not an ONNX model|fails the ONNX checker"):
        _build(text, ABC)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="not an ONNX model"):
        _build(empty, ABC)
    bad = _gemm()
    bad.graph.node[0].input[1] = "nowhere"  # dangling input: the checker refuses it
    with pytest.raises(SourceError, match="fails the ONNX checker"):
        _build(_save(bad, tmp_path / "bad.onnx"), ABC)
    custom = _gemm()
    custom.graph.node[0].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(SourceError, match="fails the ONNX checker|ONNX Runtime cannot load it"):
        _build(_save(custom, tmp_path / "custom.onnx"), ABC)
    with pytest.raises(SourceError, match="not a file"):
        _build(tmp_path, ABC)


def test_the_importer_manifest(tmp_path: Path) -> None:
    built = _build(_save(_gemm(), tmp_path / "h.onnx"), [" a", "b ", "c"])
    assert built.manifest == {"head": {"type": "onnx", "file": "head.onnx", "input": "pooled", "family": "classifier"}, "labels": ABC}
    assert built.files == {"head.onnx": tmp_path / "h.onnx"} and not built.tensors
    emb = _build(_save(_gemm(labels=16), tmp_path / "e.onnx"), None, family="embedding")
    assert emb.manifest == {"head": {"type": "onnx", "file": "head.onnx", "input": "pooled", "family": "embedding"}}


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m, d: m["head"].update(file="../head.onnx"), "must name a file in the artifact directory"),
        (lambda m, d: (d / "head.onnx").unlink(), "is missing"),
        (lambda m, d: (d / "head.onnx").write_bytes(b"garbage"), "ONNX Runtime cannot load"),
        (lambda m, d: m["head"].update(input="tokens"), "unknown input mode 'tokens'"),
        (lambda m, d: m.update(labels=["x", "y"]), "has 3 columns for 2 labels"),
        (lambda m, d: m.pop("labels"), "manifest needs 'labels'"),
    ],
)
def test_bad_onnx_artifacts_are_refused_at_load(tmp_path: Path, edit: Any, words: str) -> None:
    d = tmp_path / "art"
    d.mkdir()
    _save(_gemm(), d / "head.onnx")
    manifest = {"kind": "onnx", "backbone": "minilm", "task": "t", "labels": ABC, "head": {"type": "onnx", "file": "head.onnx", "input": "pooled", "family": "classifier"}}
    OnnxExtension(json.loads(json.dumps(manifest)), {}, SPEC, artifact_dir=d)  # the unchanged one loads
    edit(manifest, d)
    with pytest.raises(ArtifactError, match=_re(words)):
        OnnxExtension(manifest, {}, SPEC, artifact_dir=d)
    with pytest.raises(ArtifactError, match="none was given"):
        OnnxExtension({**manifest, "head": {"type": "onnx", "file": "head.onnx"}}, {}, SPEC)


def test_a_graph_that_fails_at_run_time_fails_only_its_own_rows(executor: Executor, tmp_path: Path) -> None:
    """Gemm -> Reshape([2, -1]): 3 rows (9 values) make ONNX Runtime raise, 4 rows
    give 2 rows back; the output width is unknown at load, so a width check can
    only happen at call time."""
    w = np.random.default_rng(0).normal(size=(3, 384)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["pooled", "W"], ["y"], transB=1),
            helper.make_node("Reshape", ["y", "shape"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 384])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2, -1], dtype=np.int64), "shape")],
    )
    d = tmp_path / "art"
    d.mkdir()
    _save(_model(graph), d / "head.onnx")
    manifest = {"kind": "onnx", "backbone": "minilm", "task": "t", "labels": ABC, "head": {"type": "onnx", "file": "head.onnx", "input": "pooled", "family": "classifier"}}
    broken = OnnxExtension(manifest, {}, SPEC, artifact_dir=d)
    emb = EmbeddingExtension({"kind": "embedding", "backbone": "minilm"}, {}, SPEC)
    for rows, words in ((3, "Fail"), (4, "expected rank 2 with 4 rows")):
        items = [WorkItem(Rows(texts=TEXTS[:2]), emb), WorkItem(Rows(texts=(TEXTS * 2)[:rows]), broken)]
        executor.run(items)
        assert items[1].result is None and items[1].error is not None and words.lower() in items[1].error.lower(), items[1].error
        assert items[0].error is None
        np.testing.assert_allclose(items[0].result.out, plain(TEXTS[:2]), atol=1e-4, rtol=0)  # type: ignore[union-attr]


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def test_cli_creates_onnx_tasks_and_a_classifier_head_exports_and_reimports(executor: Executor, sources: dict[str, TaskSource], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _cli("init", str(repo))
    out = _cli("task", "create", "oh", "--kind", "onnx", "--source", str(options(sources["pooled"].create_args)[0]), "--labels", "a,b,c", "--repo", str(repo))
    assert "classifier outputs" in out.stdout
    assert (repo / "oh" / "1" / "head.onnx").is_file() and read_manifest(repo / "oh" / "1")["labels"] == ABC
    out = _cli("task", "create", "ot", *sources["token"].create_args, "--repo", str(repo))
    assert "token outputs" in out.stdout
    # Refusals through the console script: one clear line, nothing left behind.
    out = _cli("task", "create", "nolab", "--kind", "onnx", "--source", str(options(sources["pooled"].create_args)[0]), "--repo", str(repo), ok=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "needs --labels" in out.stderr
    assert not (repo / "nolab").exists()

    # A classifier task (linear head fitted by --train) -> ONNX -> W x + b.
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"good happy day {i},pos\nbad sad day {i},neg\nthe table is brown {i},meh\n" for i in range(4)))
    _cli("task", "create", "mood", "--train", str(csv), "--repo", str(repo))
    path = export_task(repo, "mood", tmp_path / "out")  # a directory that does not exist: a file path
    assert path == tmp_path / "out"
    (tmp_path / "dir").mkdir()
    assert export_task(repo, "mood", tmp_path / "dir") == tmp_path / "dir" / "mood.onnx"
    weights = read_weights(repo / "mood" / "1")
    w, b = weights["head.weight"].numpy(), weights["head.bias"].numpy()
    x = np.random.default_rng(0).normal(size=(5, 384)).astype(np.float32)
    session = open_session(str(path))
    assert [i.name for i in session.get_inputs()] == ["pooled"] and [o.name for o in session.get_outputs()] == ["logits"]
    got = session.run(["logits"], {"pooled": x})[0]
    np.testing.assert_allclose(got, x @ w.T + b, atol=1e-5, rtol=0)
    print(f"export max abs error {np.abs(got - (x @ w.T + b)).max():.2e}")

    # ... and back as an onnx task: it answers exactly as the classifier.
    labels = read_manifest(repo / "mood" / "1")["labels"]
    _cli("task", "create", "mood2", "--kind", "onnx", "--source", str(path), "--labels", ",".join(labels), "--repo", str(repo))
    cls = load_extension(repo / "mood" / "1", SPEC, config=executor.config)
    onx = load_extension(repo / "mood2" / "1", SPEC, config=executor.config)
    items = [WorkItem(Rows(texts=TEXTS), cls), WorkItem(Rows(texts=TEXTS), onx)]
    executor.run(items)
    np.testing.assert_allclose(items[1].result.out, items[0].result.out, atol=1e-5, rtol=0)  # type: ignore[union-attr]
    assert list(items[1].result.txt) == list(items[0].result.txt)  # type: ignore[union-attr]

    for name, words in (("oh", "task 'oh' is of kind 'onnx'"), ("ot", "task 'ot' is of kind 'onnx'")):
        with pytest.raises(ExportError, match=words):
            export_task(repo, name, tmp_path / "x.onnx")
    from fmplex.registry import RegistryError

    with pytest.raises(RegistryError, match="no task named 'ghost'"):
        export_task(repo, "ghost", tmp_path / "x.onnx")
