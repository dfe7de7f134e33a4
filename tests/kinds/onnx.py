"""ONNX heads built with onnx.helper; reference = ONNX Runtime running the
user's .onnx file alone on plain transformers' outputs (sentence vector, or
last hidden states + mask), never the graph's math re-written here.

- ``pooled``: Gemm on the pooled sentence vector -> logits for 3 labels
  (family classifier: LOGITS + LABEL);
- ``hidden``: per-token MatMul + Add on the token states (times the mask) ->
  logits for 2 labels per token (family token: TOKEN_LOGITS, padded per
  request to [rows, longest, 2]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import TaskSource, backbone_model, mean_pool, tokenizer

HIDDEN = 384
POOLED_LABELS = ["neg", "neu", "pos"]
TOKEN_LABELS = ["O", "ENT"]


def pooled_graph(w: np.ndarray, b: np.ndarray):  # noqa: ANN201 - onnx.ModelProto
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["pooled", "W", "B"], ["logits"], transB=1)],
        "pooled_head",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", w.shape[0]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _model(graph)


def token_graph(w: np.ndarray, b: np.ndarray):  # noqa: ANN201
    """logits = (hidden @ W + b) * mask[..., None]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["hidden", "W"], ["hw"]),
        helper.make_node("Add", ["hw", "B"], ["raw"]),
        helper.make_node("Unsqueeze", ["mask", "axis"], ["mask3"]),
        helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["raw", "maskf"], ["token_logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "token_head",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", "L", HIDDEN]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["n", "L"]),
        ],
        [helper.make_tensor_value_info("token_logits", TensorProto.FLOAT, ["n", "L", w.shape[1]])],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
        ],
    )
    return _model(graph)


def _model(graph):  # noqa: ANN001, ANN202
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fmplex-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _session(path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    """The user's file in ONNX Runtime alone: CPU, one thread, as written (no fmplex code)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def make(tmp: Path, seed: int = 0, mode: str = "pooled") -> TaskSource:
    import onnx

    rng = np.random.default_rng(seed)
    model, tok = backbone_model(), tokenizer()
    out = Path(tmp) / f"onnx_{mode}_s{seed}.onnx"
    if mode == "pooled":
        w = rng.normal(0, 1.0, (len(POOLED_LABELS), HIDDEN)).astype(np.float32)
        b = rng.normal(0, 0.1, len(POOLED_LABELS)).astype(np.float32)
        onnx.save(pooled_graph(w, b), str(out))
        names = np.array([x.encode() for x in POOLED_LABELS], dtype=object)
        session = _session(out)

        def reference(texts: list[str]) -> dict[str, np.ndarray]:
            embs = []
            for t in texts:
                enc = tok(t, return_tensors="pt")
                with torch.no_grad():
                    embs.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])[0])
            logits = session.run(None, {"pooled": np.stack(embs).astype(np.float32)})[0]
            return {"LOGITS": logits, "LABEL": names[logits.argmax(1)]}

        args = ["--labels", ",".join(POOLED_LABELS), "--onnx-input", "pooled", "--onnx-family", "classifier"]
    elif mode == "hidden":
        w = rng.normal(0, 0.1, (HIDDEN, len(TOKEN_LABELS))).astype(np.float32)
        b = rng.normal(0, 0.1, len(TOKEN_LABELS)).astype(np.float32)
        onnx.save(token_graph(w, b), str(out))
        session = _session(out)

        def reference(texts: list[str]) -> dict[str, np.ndarray]:
            per = []
            for t in texts:
                enc = tok(t, return_tensors="pt")
                with torch.no_grad():
                    h = model(**enc).last_hidden_state.numpy().astype(np.float32)
                per.append(session.run(None, {"hidden": h, "mask": enc["attention_mask"].numpy().astype(np.int64)})[0][0])
            longest = max(p.shape[0] for p in per)
            padded = np.zeros((len(per), longest, len(TOKEN_LABELS)), dtype=np.float32)
            for i, p in enumerate(per):
                padded[i, : p.shape[0]] = p
            return {"TOKEN_LOGITS": padded}

        args = ["--labels", ",".join(TOKEN_LABELS), "--onnx-input", "hidden", "--onnx-family", "token"]
    else:
        raise ValueError(f"unknown mode {mode!r} (pooled | hidden)")
    return TaskSource("onnx", ["--kind", "onnx", "--source", str(out), *args], reference)
