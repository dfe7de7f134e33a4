"""Building ``fork``, ``lora`` and ``onnx`` vision tasks from what users bring (control plane).

- ``fork``: a full fine-tuned EfficientNet-Lite0 state dict in one safetensors
  file (the package's key names; a ``module.`` prefix from DataParallel is
  dropped). Compared with the backbone, only what differs is kept: the stages
  from the first changed one up, and the classifier ``_fc``. The stem is shared
  by every row, so a state dict whose stem changed is refused.
- ``lora``: a PEFT LoRA adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) trained on the package's model after
  :func:`..model.plain_pointwise`, targeting blocks' ``_expand_conv`` /
  ``_project_conv``; ``_fc`` in ``modules_to_save`` becomes the task's head.
- ``onnx``: one self-contained ``.onnx`` file with one float input
  ``[rows, 1280]`` (the pooled features); checked with ``onnx.checker`` and
  opened with ONNX Runtime here, so the host never gets a graph it cannot run.

Nothing here unpickles: ``.pth``/``.bin`` sources are refused with a hint.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from fmplex.artifacts import read_json, read_safetensors

from .model import FC_PREFIX, FEATURES, N_BLOCKS, N_STAGES, STEM_PREFIXES, stage_of
from .weights import load_state_dict

Echo = Callable[[str], None]
_PICKLES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


class SourceError(ValueError):
    """What the user gave cannot become a task (one line, shown as is)."""


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in _PICKLES:
        raise SourceError(
            f"{path} is a pickle file: fmplex never loads pickle; save the state dict with "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') and import that"
        )
    if not path.is_file():
        raise SourceError(f"{path} is not a file")
    return read_safetensors(path, SourceError)


def labels_for(count: int, labels: Any, source: Path) -> list[str]:
    """``labels`` (a list of strings) checked against ``count`` outputs; LABEL_<i> when not given."""
    if not labels:
        return [f"LABEL_{i}" for i in range(count)]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise SourceError(f"{source}: labels must be non-empty strings")
    labels = [x.strip() for x in labels]
    if len(labels) != count:
        raise SourceError(f"{source}: {len(labels)} labels for a classifier with {count} outputs")
    if len(set(labels)) != len(labels):
        raise SourceError(f"{source}: duplicate labels")
    return labels


def _fc(weights: dict[str, torch.Tensor], prefix: str, source: Path) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = weights.get(f"{prefix}weight"), weights.get(f"{prefix}bias")
    if w is None or b is None:
        raise SourceError(f"{source}: the classifier {prefix}weight / {prefix}bias is missing")
    if w.dim() != 2 or w.shape[1] != FEATURES or b.dim() != 1 or b.shape[0] != w.shape[0] or w.shape[0] < 2:
        raise SourceError(f"{source}: classifier has shapes {list(w.shape)} / {list(b.shape)}, expected [labels>=2, {FEATURES}] / [labels]")
    return w.float().contiguous(), b.float().contiguous()


def build_fork(source: Path, options: dict[str, Any], echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest fields, tensors) of a fork task from a fine-tuned state dict."""
    raw = _read_safetensors(source)
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    base = {k: v for k, v in load_state_dict().items() if not k.endswith("num_batches_tracked")}
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    unknown = sorted(set(weights) - set(base))
    if unknown:
        raise SourceError(f"{source}: not an EfficientNet-Lite0 state dict (unexpected: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''})")
    missing = sorted(set(base) - set(weights))
    if missing:
        raise SourceError(f"{source}: tensor(s) missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for key, ref in base.items():
        if key.startswith(FC_PREFIX):
            continue
        if tuple(weights[key].shape) != tuple(ref.shape):
            raise SourceError(f"{source}: '{key}' has shape {list(weights[key].shape)}, the backbone's is {list(ref.shape)}")
    changed = {k for k, ref in base.items() if not k.startswith(FC_PREFIX) and not torch.equal(weights[k].float(), ref.float())}
    stem = sorted(k for k in changed if k.startswith(STEM_PREFIXES))
    if stem:
        raise SourceError(f"{source}: the stem differs ('{stem[0]}'): a fork can only own blocks above the stem")
    point = min((stage_of(k) for k in changed), default=N_STAGES)
    assert point is not None
    tensors: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        stage = stage_of(k)
        if stage is not None and stage >= point:
            tensors[f"fork.{k}"] = v.float().contiguous()
    w, b = _fc(weights, FC_PREFIX, source)
    tensors["head.weight"], tensors["head.bias"] = w, b
    labels = labels_for(int(w.shape[0]), options.get("labels"), source)
    size = sum(t.numel() * 4 for t in tensors.values())
    owned = N_STAGES - point
    if owned:
        echo(f"fork at stage {point}: {owned} stage{'s' if owned != 1 else ''} + classifier ({len(labels)} labels), {size / 1e6:.2f} MB")
    else:
        echo(f"no stage differs from the backbone: only the classifier ({len(labels)} labels) is task-specific, {size / 1e6:.2f} MB")
    return {"fork": {"point": point}, "head": {"type": "linear"}, "labels": labels}, tensors


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?_blocks\.(\d+)\._(expand|project)_conv\.lora_(A|B)(?:\.default)?\.weight$")
_FC_KEY = re.compile(r"^(?:base_model\.model\.)?_fc\.(?:modules_to_save\.(?:default\.)?)?(weight|bias)$")


def build_lora(source: Path, options: dict[str, Any], echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest fields, tensors) of a lora task from a PEFT adapter directory."""
    from .lora import pointwise_shape  # noqa: PLC0415

    if not source.is_dir():
        raise SourceError(f"{source}: a lora task is imported from a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    cfg = read_json(source / "adapter_config.json", SourceError, missing=f"{source} has no adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise SourceError(f"{source}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if cfg.get(flag):
            raise SourceError(f"{source}: {flag} is set; fmplex applies plain LoRA only")
    if cfg.get("bias", "none") != "none":
        raise SourceError(f"{source}: bias={cfg.get('bias')!r}; only bias='none' adapters are supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SourceError(f"{source}: rank_pattern/alpha_pattern are not supported (one rank and alpha for every module)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise SourceError(f"{source}: adapter_config.json needs an integer r > 0 and a number lora_alpha")
    scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights = _read_safetensors(source / "adapter_model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    fc: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        m = _LORA_KEY.match(key)
        if m is not None:
            block, which, ab = int(m.group(1)), m.group(2), m.group(3)
            if not 0 <= block < N_BLOCKS or pointwise_shape(block, which) is None:
                raise SourceError(f"{source}: '{key}' targets no 1x1 convolution of EfficientNet-Lite0")
            if t.dim() != 4 or tuple(t.shape[2:]) != (1, 1):
                raise SourceError(f"{source}: '{key}' has shape {list(t.shape)}, expected a 1x1 convolution weight")
            tensors[f"lora.{block}.{which}.{ab}"] = t[:, :, 0, 0].float().contiguous()
            continue
        m = _FC_KEY.match(key)
        if m is not None:
            fc[f"{FC_PREFIX}{m.group(1)}"] = t
            continue
        raise SourceError(f"{source}: '{key}' is not LoRA on a block's 1x1 convolution nor the classifier _fc "
                          "(fmplex applies LoRA to _blocks.<j>._expand_conv / _project_conv only)")
    if not tensors:
        raise SourceError(f"{source}: the adapter holds no LoRA weights for the blocks' 1x1 convolutions")
    fields: dict[str, Any] = {"lora": {"scale": scale, "rank": r, "alpha": alpha, "rslora": bool(cfg.get("use_rslora"))},
                              "head": {"type": "embedding"}}
    if fc:
        w, b = _fc(fc, FC_PREFIX, source)
        tensors["head.weight"], tensors["head.bias"] = w, b
        fields["head"] = {"type": "linear"}
        fields["labels"] = labels_for(int(w.shape[0]), options.get("labels"), source)
    modules = len({k.rsplit(".", 1)[0] for k in tensors if k.startswith("lora.")})
    size = sum(t.numel() * 4 for t in tensors.values())
    echo(f"LoRA r={r} alpha={alpha} on {modules} 1x1 convolution(s), {'classifier' if fc else 'embedding'} outputs, {size / 1e6:.2f} MB")
    return fields, tensors


ONNX_FILE = "head.onnx"


def build_onnx(source: Path, options: dict[str, Any], echo: Echo, out_dir: Path) -> dict[str, Any]:
    """Manifest fields of an onnx task; copies the graph into ``out_dir`` as ``head.onnx``."""
    import onnx  # noqa: PLC0415 - only for this kind

    from fmplex.triton_backend.extensions.onnx_head import check_io, open_session, session_io  # noqa: PLC0415

    family = options.get("onnx_family") or "classifier"
    if family not in ("classifier", "embedding"):
        raise SourceError(f"an ONNX head of a vision task is 'classifier' or 'embedding', not {family!r}")
    if not source.is_file():
        raise SourceError(f"{source} is not a file; an ONNX head source is one .onnx file")
    try:
        model = onnx.load(str(source), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker errors
        raise SourceError(f"{source} is not a valid ONNX model: {_line(exc)}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise SourceError(f"{source} keeps weights in external data files; save it as one file")
    try:
        session = open_session(source.read_bytes())
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise SourceError(f"{source}: ONNX Runtime cannot load it: {_line(exc)}") from None
    inputs, outputs = session_io(session)
    labels = options.get("labels")
    count = None
    if family == "classifier":
        if not labels:
            raise SourceError(f"{source}: an ONNX classifier head needs labels (one per output column)")
        count = len(labels)
        labels = labels_for(count, labels, source)
    problems = check_io(inputs, outputs, "pooled", family, FEATURES, count)
    if problems:
        raise SourceError(f"{source}: does not fit a head on the pooled features [rows, {FEATURES}]: {'; '.join(problems)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out_dir / ONNX_FILE)
    echo(f"ONNX head: input '{inputs[0][0]}' [rows, {FEATURES}], {family} output '{outputs[0][0]}'")
    fields: dict[str, Any] = {"head": {"type": "onnx", "family": family, "file": ONNX_FILE}}
    if labels:
        fields["labels"] = labels
    return fields


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
