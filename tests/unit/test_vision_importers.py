"""What the vision builders and the artifact check refuse, each with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmplex.artifacts import ArtifactError
from fmplex.families.vision import importers
from fmplex.families.vision.loading import load_task
from fmplex.families.vision.weights import load_state_dict


def _state(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in load_state_dict().items()}
    state.update(changes)
    return state


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def _refused(fn, *args) -> str:  # noqa: ANN001
    with pytest.raises(importers.SourceError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_fork_refuses(tmp_path: Path) -> None:
    base = load_state_dict()
    stem = _save(tmp_path / "stem.safetensors", _state(**{"_conv_stem.weight": base["_conv_stem.weight"] + 1e-3}))
    assert "stem differs" in _refused(importers.build_fork, stem, {}, print)
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not read")
    assert "pickle" in _refused(importers.build_fork, pth, {}, print)
    state = _state()
    del state["_blocks.3._bn1.running_var"]
    assert "missing" in _refused(importers.build_fork, _save(tmp_path / "missing.safetensors", state), {}, print)
    odd = _save(tmp_path / "odd.safetensors", _state(extra=torch.zeros(2)))
    assert "unexpected" in _refused(importers.build_fork, odd, {}, print)
    one = _save(tmp_path / "one.safetensors", _state(**{"_fc.weight": torch.zeros(1, 1280), "_fc.bias": torch.zeros(1)}))
    assert "labels>=2" in _refused(importers.build_fork, one, {}, print)
    ok = _save(tmp_path / "ok.safetensors", _state(**{"_fc.weight": torch.zeros(3, 1280), "_fc.bias": torch.zeros(3)}))
    assert "2 labels for a classifier with 3 outputs" in _refused(importers.build_fork, ok, {"labels": ["a", "b"]}, print)


def test_fork_keeps_only_what_differs(tmp_path: Path) -> None:
    base = load_state_dict()
    src = _save(tmp_path / "ft.safetensors", _state(**{
        "_blocks.14._bn2.bias": base["_blocks.14._bn2.bias"] + 0.1,
        "_fc.weight": torch.zeros(2, 1280), "_fc.bias": torch.zeros(2),
    }))
    fields, tensors = importers.build_fork(src, {}, print)
    assert fields["fork"]["point"] == 14 and fields["labels"] == ["LABEL_0", "LABEL_1"]
    assert not any(k.startswith("fork._blocks.13.") for k in tensors)
    assert any(k.startswith("fork._blocks.15.") for k in tensors) and "fork._conv_head.weight" in tensors


def test_lora_refuses(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none"}
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "use_dora" in _refused(importers.build_lora, d, {}, print)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model._blocks.2._depthwise_conv.lora_A.weight": torch.zeros(2, 144, 1, 1)}, str(d / "adapter_model.safetensors"))
    assert "1x1 convolution" in _refused(importers.build_lora, d, {}, print)
    save_file({"base_model.model._blocks.0._expand_conv.lora_A.weight": torch.zeros(2, 32, 1, 1)}, str(d / "adapter_model.safetensors"))
    assert "targets no 1x1 convolution" in _refused(importers.build_lora, d, {}, print)  # block 0 has no expand conv
    assert "PEFT adapter directory" in _refused(importers.build_lora, d / "adapter_config.json", {}, print)


def test_onnx_refuses_a_graph_of_the_wrong_width(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((3, 384), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["pooled", "W"], ["logits"], transB=1)], "g",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 384])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "h.onnx"))
    msg = _refused(importers.build_onnx, tmp_path / "h.onnx", {"labels": ["a", "b", "c"]}, print, tmp_path / "out")
    assert "1280" in msg
    assert "needs labels" in _refused(importers.build_onnx, tmp_path / "h.onnx", {}, print, tmp_path / "out")


@pytest.mark.parametrize(
    "manifest,tensors,needle",
    [
        ({"kind": "embedding", "backbone": "fm.minilm"}, {}, "made for backbone"),
        ({"kind": "prompt", "backbone": "fm.efficientnet"}, {}, "not a vision kind"),
        ({"kind": "fork", "backbone": "fm.efficientnet", "fork": {"point": 40}}, {}, "fork.point"),
        ({"kind": "fork", "backbone": "fm.efficientnet", "fork": {"point": 16}, "head": {"type": "linear"}}, {}, "is missing"),
        ({"kind": "classifier", "backbone": "fm.efficientnet", "head": {"type": "linear"}, "labels": ["a", "b"]},
         {"head.weight": torch.zeros(2, 384), "head.bias": torch.zeros(2)}, "expected ?x1280"),
        ({"kind": "classifier", "backbone": "fm.efficientnet", "head": {"type": "linear"}, "labels": ["a", "b"]},
         {"head.weight": torch.full((2, 1280), float("nan")), "head.bias": torch.zeros(2)}, "NaN"),
        ({"kind": "lora", "backbone": "fm.efficientnet", "lora": {"scale": 1.0}},
         {"lora.3.project.A": torch.zeros(2, 144)}, "needs both"),
    ],
)
def test_artifact_check_refuses(manifest: dict, tensors: dict, needle: str) -> None:
    with pytest.raises(ArtifactError, match=needle.replace("?", r"\?")):
        load_task({"task": "t", **manifest}, tensors)


def test_training_data_from_csv_and_folder(tmp_path: Path) -> None:
    from fmplex.families.vision import train

    from .vision_data import digit_images

    images, labels = digit_images(4, (0, 1))
    (tmp_path / "imgs").mkdir()
    for i, b in enumerate(images):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(b)
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("path,label\n" + "".join(f"imgs/{i}.png,{lab}\n" for i, lab in enumerate(labels)))
    paths, got = train.read_labelled_images(csv_file)
    assert got == labels and paths[0] == tmp_path / "imgs" / "0.png"
    assert train.load_pixels(paths).shape == (4, 3, 224, 224)

    folder = tmp_path / "folder"
    for i, (b, lab) in enumerate(zip(images, labels)):
        (folder / lab).mkdir(parents=True, exist_ok=True)
        (folder / lab / f"{i}.png").write_bytes(b)
    (folder / labels[0] / "notes.txt").write_text("ignored")
    paths, got = train.read_labelled_images(folder)
    assert sorted(got) == sorted(labels) and all(p.suffix == ".png" for p in paths)

    (tmp_path / "imgs" / "0.png").write_bytes(images[0][:100])
    with pytest.raises(train.TrainError, match="0.png"):
        train.load_pixels(paths[:0] + [tmp_path / "imgs" / "0.png"])
    with pytest.raises(train.TrainError, match="does not exist"):
        train.load_pixels([tmp_path / "nope.png"])
    one = tmp_path / "one.csv"
    one.write_text("imgs/1.png,a\nimgs/2.png,a\n")
    with pytest.raises(train.TrainError, match="two different labels"):
        train.read_labelled_images(one)
    bad = tmp_path / "bad.csv"
    bad.write_text("imgs/1.png\n")
    with pytest.raises(train.TrainError, match="row 1 must be path,label"):
        train.read_labelled_images(bad)


def test_serving_modules_import_no_control_plane_or_triton() -> None:
    """What a host imports of the vision family pulls in neither the CLI/control plane nor Triton."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import fmplex.families.vision.family, fmplex.families.vision.executor\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fmplex.control', 'click', 'tritonclient', 'triton_python_backend_utils', 'sklearn', 'skimage')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == ""
