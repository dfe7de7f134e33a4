"""Reading PEFT LoRA adapters for the generative backbone without peft (tiny random Llama, fast).

What we read must be what PEFT applies: the same A, B and scaling per module
(rank/alpha patterns, rsLoRA, layers_to_transform), and anything PEFT would
apply that the engine cannot is refused with one clear line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fmplex.generative.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, load_peft_lora


@pytest.fixture(scope="module")
def tiny():  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _peft(tiny, tmp_path: Path, **kw) -> tuple[object, Path]:  # noqa: ANN001
    import copy  # noqa: PLC0415

    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model = get_peft_model(copy.deepcopy(tiny), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kw))
    model.save_pretrained(str(tmp_path / "ad"))
    return model, tmp_path / "ad"


def test_matches_what_peft_applies(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    model, path = _peft(
        tiny,
        tmp_path,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 2, "layers.1.mlp.up_proj": 4},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
        layers_to_transform=[0, 1],
    )
    adapter = load_peft_lora(path, tiny.config, "t")
    seen = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            parts = name.split(".")
            layer, proj = int(parts[parts.index("layers") + 1]), parts[-1]
            d = adapter.deltas[(layer, proj)]
            a, b, scale = d.a, d.b, d.scale
            assert torch.equal(a, module.lora_A["default"].weight)
            assert torch.equal(b, module.lora_B["default"].weight)
            assert scale == pytest.approx(module.scaling["default"], rel=1e-12)
            seen.add((layer, proj))
    assert seen == set(adapter.deltas) and len(seen) == 14  # 7 projections x layers 0, 1
    assert adapter.ranks == [2, 4, 8]
    # and the delta it adds equals PEFT's layer output minus the base layer's
    x = torch.randn(5, 32)
    peft_q = model.base_model.model.model.layers[1].self_attn.q_proj
    d = adapter.deltas[(1, "q_proj")]
    a, b, s = d.a, d.b, d.scale
    torch.testing.assert_close(peft_q(x), peft_q.base_layer(x) + (x @ a.T @ b.T) * s, rtol=0, atol=1e-6)


def _write(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg}))
    save_file(tensors, str(path / ADAPTER_WEIGHTS))
    return path


def _pair(layer: int = 0, proj: str = "self_attn.q_proj", a: tuple = (2, 32), b: tuple = (32, 2)) -> dict[str, torch.Tensor]:
    key = f"base_model.model.model.layers.{layer}.{proj}"
    return {f"{key}.lora_A.weight": torch.ones(a), f"{key}.lora_B.weight": torch.ones(b)}


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        ({"use_dora": True}, _pair(), "DoRA"),
        ({"bias": "all"}, _pair(), "bias 'all'"),
        ({"modules_to_save": ["lm_head"]}, _pair(), "modules_to_save"),
        ({"peft_type": "PREFIX_TUNING"}, _pair(), "not 'LORA'"),
        ({"task_type": "SEQ_CLS"}, _pair(), "not a causal-LM adapter"),
        ({}, {"base_model.model.lm_head.lora_A.weight": torch.ones(2, 32), "base_model.model.lm_head.lora_B.weight": torch.ones(64, 2)}, "not supported"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 64)}, "unexpected tensor"),
        ({}, _pair(layer=7), "beyond the backbone's 3 layers"),
        ({}, _pair(a=(2, 31)), "the backbone's q_proj is 32->32"),
        ({}, _pair(b=(32, 3)), "mismatched LoRA shapes"),
        ({"r": 4}, _pair(), "rank 2 but the config says 4"),
        ({}, {k: v for k, v in _pair().items() if "lora_A" in k}, "lacks lora_B"),
        ({}, {k: v * float("nan") for k, v in _pair().items()}, "NaN or Inf"),
        ({}, {}, "holds no LoRA weights"),
    ],
)
def test_refuses_what_it_cannot_apply(tiny, tmp_path: Path, cfg: dict, tensors: dict, message: str) -> None:  # noqa: ANN001
    path = _write(tmp_path / "bad", cfg, tensors)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_peft_lora(path, tiny.config)


def test_missing_or_corrupt_files(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_peft_lora(tmp_path, tiny.config)
    path = _write(tmp_path / "ok", {}, _pair())
    (path / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_peft_lora(path, tiny.config)
    (path / ADAPTER_CONFIG).write_text("{nope")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_peft_lora(path, tiny.config)


def test_ia3_matches_what_peft_applies(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    """IA3 read by the same reader: every projection's output equals PEFT's ia3.Linear."""
    import copy  # noqa: PLC0415

    from peft import IA3Config, get_peft_model  # noqa: PLC0415

    from fmplex.generative.lora import load_peft_adapter  # noqa: PLC0415
    from fmplex.row_deltas import Ia3Delta  # noqa: PLC0415

    model = get_peft_model(copy.deepcopy(tiny), IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                                                          feedforward_modules=["down_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + torch.randn(p.shape) * 0.3)
    model.save_pretrained(str(tmp_path / "ia3"))
    adapter = load_peft_adapter(tmp_path / "ia3", tiny.config, "t", kind="ia3")
    assert len(adapter.deltas) == 12 and adapter.ranks == [] and adapter.nbytes > 0
    layers = model.base_model.model.model.layers
    for (layer, proj), delta in adapter.deltas.items():
        assert isinstance(delta, Ia3Delta) and delta.feedforward == (proj in ("down_proj", "up_proj"))
        module = getattr(layers[layer].self_attn if proj in ("k_proj", "v_proj") else layers[layer].mlp, proj)
        x = torch.randn(5, module.in_features)
        w = module.base_layer.weight
        torch.testing.assert_close(delta(x, torch.nn.functional.linear(x, w), w, None), module(x), rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="not 'LORA'"):
        load_peft_lora(tmp_path / "ia3", tiny.config)
