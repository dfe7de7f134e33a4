"""Bottleneck adapters on MiniLM in fmplex's adapter file format; reference =
transformers' AutoModel with forward hooks adding ``up(act(down(y)))`` to the
output of each adapted projection (Houlsby placement: before dropout, the
residual and the LayerNorm)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import TaskSource, backbone_model, embedding_reference, tokenizer

HIDDEN = 384
# (layer, position): "attention" = after attention.output.dense, "output" = after output.dense
DEFAULT_PLACES = ((0, "attention"), (1, "output"), (3, "attention"), (3, "output"), (5, "output"))
_ACT = {"relu": torch.relu, "gelu": lambda t: torch.nn.functional.gelu(t, approximate="none"), "tanh": torch.tanh}
_LINEAR = {"attention": "attention.output.dense", "output": "output.dense"}


def adapter_tensors(seed: int, bottleneck: int, places: tuple[tuple[int, str], ...]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for j, pos in places:
        key = f"encoder.layer.{j}.{pos}.adapter"
        out[f"{key}.down.weight"] = torch.randn(bottleneck, HIDDEN, generator=gen) * 0.05
        out[f"{key}.down.bias"] = torch.randn(bottleneck, generator=gen) * 0.05
        out[f"{key}.up.weight"] = torch.randn(HIDDEN, bottleneck, generator=gen) * 0.05
        out[f"{key}.up.bias"] = torch.randn(HIDDEN, generator=gen) * 0.05
    return out


def make(
    tmp: Path,
    seed: int = 0,
    bottleneck: int = 16,
    activation: str = "relu",
    places: tuple[tuple[int, str], ...] = DEFAULT_PLACES,
) -> TaskSource:
    from safetensors.torch import save_file

    tensors = adapter_tensors(seed, bottleneck, places)
    out = Path(tmp) / f"adapter_b{bottleneck}_{activation}_s{seed}.safetensors"
    save_file(tensors, str(out), metadata={"activation": activation})

    model = backbone_model()
    act = _ACT[activation]
    for j, pos in places:
        key = f"encoder.layer.{j}.{pos}.adapter"
        dw, db, uw, ub = (tensors[f"{key}.{p}"] for p in ("down.weight", "down.bias", "up.weight", "up.bias"))

        def hook(module: torch.nn.Module, args: object, y: torch.Tensor, dw=dw, db=db, uw=uw, ub=ub) -> torch.Tensor:  # noqa: ANN001
            return y + (act(y @ dw.T + db) @ uw.T + ub)

        model.get_submodule(f"encoder.layer.{j}.{_LINEAR[pos]}").register_forward_hook(hook)
    tok = tokenizer()

    reference = embedding_reference(model, tok)

    return TaskSource("adapter", ["--kind", "adapter", "--source", str(out)], reference)
