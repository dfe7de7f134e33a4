"""Every vision kind in shared batches against its independent reference.

References (none of them goes through fmplex's executor):

- embedding: the package's own ``EfficientNet.extract_features`` + average pooling;
- classifier: the package's own model with its ``_fc`` replaced by the trained probe;
- fork: the fine-tuned state dict loaded into the package's whole model, run alone;
- onnx: ONNX Runtime running the .onnx file alone on the package model's pooled features;
- lora: PEFT's own ``PeftModel`` (LoRA-wrapped 1x1 convolutions) run alone.

Tolerance: fp32, |fmplex - reference| <= 1e-4 + 1e-4 * |reference|; labels equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fmplex.families.vision import model as net
from fmplex.families.vision.family import VisionFamily
from fmplex.families.vision.preprocess import decode_image
from fmplex.families.vision.weights import load_state_dict

from .vision_data import digit_images, photos, write_digits_folder

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def family() -> VisionFamily:
    torch.set_num_threads(1)
    return VisionFamily()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """12 preprocessed rows: 6 photographs and 6 digits."""
    digits, _ = digit_images(6, (3, 7))
    return np.stack([decode_image(b) for b in photos() + digits])


def package_model(state: dict | None = None):  # noqa: ANN201
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_name("efficientnet-lite0", num_classes=int((state or load_state_dict())["_fc.weight"].shape[0]))
    m.load_state_dict(state or load_state_dict())
    return m.eval()


def ref_pooled(x: np.ndarray) -> torch.Tensor:
    m = package_model()
    with torch.no_grad():
        return m._avg_pooling(m.extract_features(torch.from_numpy(x))).flatten(1)


def fine_tuned_state(point_block: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The ImageNet state dict with blocks >= point_block, the head conv and a new classifier changed."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in load_state_dict().items()}
    for k, v in state.items():
        stage = net.stage_of(k)
        if stage is not None and stage >= point_block and v.is_floating_point():
            if k.endswith("running_var"):
                state[k] = v * (1 + 0.1 * torch.rand(v.shape, generator=g))
            else:
                state[k] = v + 0.02 * torch.randn(v.shape, generator=g) * (v.std() if v.numel() > 1 else 1)
    state["_fc.weight"] = 0.05 * torch.randn(classes, 1280, generator=g)
    state["_fc.bias"] = 0.1 * torch.randn(classes, generator=g)
    return state


def onnx_head(path: Path, w: np.ndarray, b: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> None:
    """logits = Gemm(Relu(Gemm(pooled)))"""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["pooled", "W", "B"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["hr"]),
         helper.make_node("Gemm", ["hr", "W2", "B2"], ["logits"], transB=1)],
        "vision_head",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["n", 1280])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", w2.shape[0]])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w, "W"), (b, "B"), (w2, "W2"), (b2, "B2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fmplex-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def peft_adapter(out: Path, classes: int):  # noqa: ANN201
    """A LoRA adapter (random A and B, so the delta is not zero) + a trained-looking _fc, saved by PEFT; and the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    m = net.plain_pointwise(package_model({k: v.clone() for k, v in load_state_dict().items()}))
    m._fc = torch.nn.Linear(1280, classes)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*_blocks\.(1|5|9|15)\._(expand|project)_conv",
                     modules_to_save=["_fc"], init_lora_weights=False)
    pm = get_peft_model(m, cfg)
    with torch.no_grad():  # make the deltas matter: LoRA's B starts small
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    pm.save_pretrained(str(out))
    return pm.eval()


def close(got: np.ndarray, ref: np.ndarray) -> float:
    err = float(np.max(np.abs(got - ref)))
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= ATOL + RTOL * np.abs(ref)), f"max abs error {err}"
    return err


@pytest.fixture(scope="module")
def built(family: VisionFamily, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One task of every kind (two forks at different points), built as ``task create`` would."""
    root = tmp_path_factory.mktemp("vision")
    echo_lines: list[str] = []
    echo = echo_lines.append
    tasks: dict = {}

    family.build_task(root / "emb" / "1", "emb", 1, "embedding", None, {}, echo)

    data = write_digits_folder(root / "digits", 30, (0, 1, 2))
    family.build_task(root / "clf" / "1", "clf", 1, "classifier", data, {}, echo)

    states = {"fork13": fine_tuned_state(13, 4, 1), "fork_fc": fine_tuned_state(99, 3, 2)}
    from safetensors.torch import save_file

    for name, state in states.items():
        save_file(state, str(root / f"{name}.safetensors"))
        family.build_task(root / name / "1", name, 1, "fork", root / f"{name}.safetensors",
                          {"labels": [f"c{i}" for i in range(int(state['_fc.weight'].shape[0]))]}, echo)

    g = np.random.default_rng(0)
    onnx_w = [g.standard_normal(s).astype(np.float32) * 0.05 for s in ((64, 1280), (64,), (5, 64), (5,))]
    onnx_head(root / "head.onnx", *onnx_w)
    family.build_task(root / "onnx" / "1", "onnx", 1, "onnx", root / "head.onnx", {"labels": list("abcde")}, echo)

    peft_model = peft_adapter(root / "adapter", 3)
    family.build_task(root / "lora" / "1", "lora", 1, "lora", root / "adapter", {"labels": ["x", "y", "z"]}, echo)

    for name in ("emb", "clf", "fork13", "fork_fc", "onnx", "lora"):
        tasks[name] = family.load_task(root / name / "1")
    return {"tasks": tasks, "states": states, "peft": peft_model, "onnx": root / "head.onnx", "echo": echo_lines}


def references(built: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """name -> reference output (EMBEDDING or LOGITS) for rows ``x``, each computed alone."""
    import onnxruntime as ort

    xt = torch.from_numpy(x)
    out: dict[str, np.ndarray] = {}
    pooled = ref_pooled(x)
    out["emb"] = pooled.numpy()
    clf = built["tasks"]["clf"].head
    m = package_model()
    m._fc = torch.nn.Linear(1280, clf.weight.shape[0])
    with torch.no_grad():
        m._fc.weight.copy_(clf.weight)
        m._fc.bias.copy_(clf.bias)
        out["clf"] = m(xt).numpy()
        for name in ("fork13", "fork_fc"):
            out[name] = package_model(built["states"][name])(xt).numpy()
        out["lora"] = built["peft"](xt).numpy()
    sess = ort.InferenceSession(str(built["onnx"]), providers=["CPUExecutionProvider"])
    out["onnx"] = sess.run(None, {"pooled": pooled.numpy()})[0]
    return out


def test_fork_points_and_sizes(built: dict) -> None:
    tasks = built["tasks"]
    assert tasks["fork13"].fork_point == 13
    assert tasks["fork_fc"].fork_point == net.N_STAGES
    assert tasks["lora"].lora_blocks == {1, 5, 9, 15}
    assert any(line.startswith("held-out accuracy (80/20 split): ") for line in built["echo"])
    assert any(line.startswith("fork at stage 13: 4 stages") for line in built["echo"])


def test_classifier_learns_digits(built: dict) -> None:
    """The probe separates held-out digits 0/1/2 (chance is 1/3)."""
    line = next(x for x in built["echo"] if x.startswith("held-out accuracy"))
    assert float(line.rsplit(" ", 1)[1]) >= 0.8


def test_mixed_batch_every_kind_exact(family: VisionFamily, built: dict, pixels: np.ndarray) -> None:
    """Requests of six tasks (five kinds, two fork points), interleaved, in one run_batch."""
    tasks = built["tasks"]
    ref = references(built, pixels)
    plan = [("lora", 0, 2), ("emb", 2, 5), ("fork13", 5, 7), ("clf", 7, 9), ("onnx", 9, 12), ("emb", 0, 1),
            ("fork_fc", 1, 4), ("clf", 0, 3), ("lora", 3, 6), ("onnx", 0, 1), ("fork13", 0, 5), ("fork_fc", 10, 12)]
    results = family.run_batch([(tasks[name], pixels[a:b]) for name, a, b in plan])
    errors = {}
    for (name, a, b), res in zip(plan, results):
        assert res.error is None, res.error
        errors[name] = max(errors.get(name, 0.0), close(res.outputs.out, ref[name][a:b]))
        if name == "emb":
            assert res.outputs.txt is None
        else:
            names = np.array([x.encode() for x in tasks[name].manifest["labels"]], dtype=object)
            assert list(res.outputs.txt) == list(names[ref[name][a:b].argmax(axis=1)])
    print("max abs errors:", {k: f"{v:.2e}" for k, v in sorted(errors.items())})


def test_answers_do_not_depend_on_chunking(family: VisionFamily, built: dict, pixels: np.ndarray) -> None:
    """The same mixed requests in one pass and in chunks of 3 rows (tasks split across chunks)."""
    tasks = built["tasks"]
    ref = references(built, pixels)
    plan = [("emb", 0, 5), ("lora", 2, 9), ("fork13", 3, 10), ("onnx", 0, 4), ("clf", 5, 12)]
    ex = family.executor
    saved = ex.max_pass_rows
    try:
        for rows in (None, 3):
            ex.max_pass_rows = rows
            results = family.run_batch([(tasks[name], pixels[a:b]) for name, a, b in plan])
            for (name, a, b), res in zip(plan, results):
                assert res.error is None, res.error
                close(res.outputs.out, ref[name][a:b])
    finally:
        ex.max_pass_rows = saved


def test_a_batch_of_forks_only(family: VisionFamily, built: dict, pixels: np.ndarray) -> None:
    """Every row leaves the shared pass (at stage 13 and after stage 16)."""
    tasks = built["tasks"]
    ref = references(built, pixels[:3])
    results = family.run_batch([(tasks["fork_fc"], pixels[:2]), (tasks["fork13"], pixels[:3])])
    close(results[0].outputs.out, ref["fork_fc"][:2])
    close(results[1].outputs.out, ref["fork13"][:3])


def test_family_describes_itself(family: VisionFamily) -> None:
    from fmplex.families.vision.tasks import KINDS

    assert family.backbone == "fm.efficientnet"
    assert tuple(k.name for k in family.kinds) == KINDS
    assert [t.name for t in family.inputs] == ["IMAGE", "PIXELS"]
    assert [t.name for t in family.outputs["classifier"]] == ["LOGITS", "LABEL"]


def test_a_failing_task_fails_only_its_rows(family: VisionFamily, built: dict, pixels: np.ndarray) -> None:
    tasks = built["tasks"]
    ref = references(built, pixels[:4])
    broken = tasks["fork13"]
    original = broken.run_own

    def explode(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    broken.run_own = explode  # type: ignore[method-assign]
    try:
        results = family.run_batch([(tasks["emb"], pixels[:2]), (broken, pixels[:3]), (tasks["lora"], pixels[:4])])
    finally:
        broken.run_own = original  # type: ignore[method-assign]
    assert results[1].error is not None and "boom" in results[1].error and "\n" not in results[1].error
    close(results[0].outputs.out, ref["emb"][:2])
    close(results[2].outputs.out, ref["lora"][:4])


def test_a_failing_lora_delta_fails_only_its_rows(family: VisionFamily, built: dict, pixels: np.ndarray) -> None:
    """A body that fails inside the shared pass: its rows ride on and get an error; the others are exact."""
    tasks = built["tasks"]
    ref = references(built, pixels[:4])
    lora = tasks["lora"]

    def explode(block: int, which: str, x_in: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("delta boom")

    lora.pointwise_delta = explode  # type: ignore[method-assign]
    try:
        results = family.run_batch([(tasks["emb"], pixels[:2]), (lora, pixels[:3]), (tasks["fork13"], pixels[:4])])
    finally:
        del lora.pointwise_delta
    assert results[1].error is not None and "delta boom" in results[1].error
    close(results[0].outputs.out, ref["emb"][:2])
    close(results[2].outputs.out, ref["fork13"][:4])


def test_staged_forward_is_the_packages(pixels: np.ndarray) -> None:
    """fmplex's stage-by-stage forward (run_block) against the package's own forward: bit-equal."""
    m = package_model()
    with torch.no_grad():
        ours = m._fc(net.features(m, torch.from_numpy(pixels[:3])))
        theirs = m(torch.from_numpy(pixels[:3]))
    assert torch.equal(ours, theirs)


def test_weights_cached_as_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fmplex.families.vision import weights

    monkeypatch.setenv("FMPLEX_CACHE_DIR", str(tmp_path))
    weights.load_state_dict.cache_clear()
    try:
        first = weights.load_state_dict()
        cached = weights.cache_dir()
        assert cached is not None and (cached / "model.safetensors").is_file()
        weights.load_state_dict.cache_clear()
        second = weights.load_state_dict()  # from the safetensors copy
        assert set(first) == set(second) and len(first) == 296
        assert all(torch.equal(first[k], second[k]) for k in first)
    finally:
        weights.load_state_dict.cache_clear()
        os.environ.pop("FMPLEX_CACHE_DIR", None)
