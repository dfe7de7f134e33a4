"""Bottleneck adapter file -> fmplex ``adapter`` task body.

Source format (fmplex's own; one ``.safetensors`` file)
-------------------------------------------------------
Houlsby-style adapters placed right after a BERT layer's output projections::

    y' = y + up(act(down(y)))

where ``y`` is the projection's output before dropout, the residual and the
LayerNorm. Tensors, for any subset of layers ``j`` and positions ``pos``::

    encoder.layer.{j}.{pos}.adapter.down.weight   [b, hidden]
    encoder.layer.{j}.{pos}.adapter.down.bias     [b]
    encoder.layer.{j}.{pos}.adapter.up.weight     [hidden, b]
    encoder.layer.{j}.{pos}.adapter.up.bias       [hidden]

``pos`` is ``attention`` (after the attention output projection,
``attention.output.dense``) or ``output`` (after the MLP output projection,
``output.dense``); ``b`` (the bottleneck) may differ between modules. All four
tensors of a module are required; floating dtypes are converted to fp32.
The file's safetensors metadata may set ``{"activation": "relu" | "gelu" |
"tanh"}`` (default ``relu``; ``gelu`` is the exact erf form,
``torch.nn.functional.gelu``); other metadata keys are ignored.

Written, e.g., with::

    safetensors.torch.save_file(tensors, "adapter.safetensors", metadata={"activation": "gelu"})

Stored in the artifact as ``adapter.<linear path>.{down,up}.{weight,bias}``
with ``<linear path>`` = ``encoder.layer.{j}.attention.output.dense`` or
``encoder.layer.{j}.output.dense``; the manifest lists the activation and the
modules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from fmplex.backbones import BackboneSpec

from . import Built, Echo, SourceError, read_json, read_safetensors

ACTIVATIONS = ("relu", "gelu", "tanh")
# position in the source -> the Linear (inside a layer) the adapter follows
POSITIONS = {"attention": "attention.output.dense", "output": "output.dense"}
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")

_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(attention|output)\.adapter\.(down|up)\.(weight|bias)$")


def _metadata(source: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(source), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise SourceError(f"{source} is not a readable safetensors file: {exc}") from None


def _layers(spec: BackboneSpec) -> int | None:
    try:
        return int(read_json(spec.locate() / "config.json")["num_hidden_layers"])
    except (SourceError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    if source.is_dir():
        raise SourceError(f"{source} is a directory; an adapter source is one .safetensors file")
    weights = read_safetensors(source)  # refuses non-safetensors files
    meta = _metadata(source)
    activation = meta.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise SourceError(f"{source}: unknown activation {activation!r} in the metadata (known: {', '.join(ACTIVATIONS)})")
    layers = _layers(spec)
    h = spec.hidden_size
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(weights.items()):
        m = _KEY.match(key)
        if not m:
            raise SourceError(
                f"{source}: unexpected tensor '{key}' "
                "(expected encoder.layer.<j>.<attention|output>.adapter.<down|up>.<weight|bias>)"
            )
        j = int(m.group(1))
        if layers is not None and not 0 <= j < layers:
            raise SourceError(f"{source}: '{key}' is for layer {j}, but the backbone has layers 0..{layers - 1}")
        if not tensor.is_floating_point():
            raise SourceError(f"{source}: '{key}' has dtype {tensor.dtype}, not a floating type")
        tensor = tensor.float().contiguous()
        if not torch.isfinite(tensor).all():
            raise SourceError(f"{source}: '{key}' holds NaN or Inf")
        path = f"encoder.layer.{j}.{POSITIONS[m.group(2)]}"
        modules.setdefault(path, {})[f"{m.group(3)}.{m.group(4)}"] = tensor
    if not modules:
        raise SourceError(f"{source}: the file holds no adapter tensors")
    tensors: dict[str, torch.Tensor] = {}
    sizes = []
    for path, parts in sorted(modules.items(), key=lambda kv: _order(kv[0])):
        name = _source_name(path)
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise SourceError(f"{source}: adapter '{name}' lacks {', '.join(f'{name}.{p}' for p in missing)}")
        dw, db, uw, ub = (parts[p] for p in PARTS)
        b = dw.shape[0] if dw.dim() == 2 else -1
        expected = {"down.weight": (b, h), "down.bias": (b,), "up.weight": (h, b), "up.bias": (h,)}
        if dw.dim() != 2 or dw.shape[1] != h or b < 1:
            raise SourceError(f"{source}: '{name}.down.weight' has shape {tuple(dw.shape)}, expected [bottleneck, {h}]")
        for p, t in zip(PARTS, (dw, db, uw, ub)):
            if tuple(t.shape) != expected[p]:
                raise SourceError(
                    f"{source}: '{name}.{p}' has shape {tuple(t.shape)}, expected {list(expected[p])} "
                    f"(bottleneck {b} from down.weight, hidden size {h})"
                )
        for p, t in zip(PARTS, (dw, db, uw, ub)):
            tensors[f"adapter.{path}.{p}"] = t
        sizes.append(b)
    paths = sorted(modules, key=_order)
    echo(
        f"adapter: {len(paths)} modules, bottleneck {', '.join(map(str, sorted(set(sizes))))}, {activation}, "
        f"{sum(t.numel() for t in tensors.values())} parameters"
    )
    return Built(manifest={"adapter": {"activation": activation, "modules": paths}}, tensors=tensors)


def _order(path: str) -> tuple[int, int]:
    parts = path.split(".")
    return int(parts[2]), 0 if parts[3] == "attention" else 1


def _source_name(path: str) -> str:
    """``encoder.layer.3.attention.output.dense`` -> ``encoder.layer.3.attention.adapter``."""
    parts = path.split(".")
    return f"encoder.layer.{parts[2]}.{'attention' if parts[3] == 'attention' else 'output'}.adapter"
