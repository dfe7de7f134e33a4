"""Fine-tuned transformers checkpoint -> fmplex ``fork`` task (own top layers + head).

Reads ``config.json`` + ``model.safetensors`` (or its sharded form) of a whole
fine-tuned ``BertModel``, ``BertForSequenceClassification`` or
``BertForTokenClassification`` of the backbone's shape, compares its weights
with the backbone's and keeps only what differs: the layers from the first
changed one up (``fork.layer.<j>.<param>``, BertLayer parameter names) and the
head. A fork shares the backbone's embeddings and every layer below its fork
point, so a checkpoint whose embeddings changed is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmplex.backbones import BackboneSpec

from . import Built, Echo, SourceError, read_json, read_safetensors

# architecture -> fmplex head type
ARCHITECTURES = {
    "BertModel": "embedding",
    "BertForSequenceClassification": "cls",
    "BertForTokenClassification": "token",
}

# Config fields that change what a BERT layer or the embeddings compute: a
# fork's layers run with the backbone's config, so these must agree.
MUST_MATCH = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "max_position_embeddings",
    "type_vocab_size",
    "position_embedding_type",
)

# Parameters of one BertLayer (its state_dict names): the extension's own list.
from fmplex.triton_backend.extensions.fork import LAYER_PARAMS  # noqa: E402

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
_IGNORED = ("embeddings.position_ids",)  # a buffer (arange), not a weight


def _weights(source: Path) -> dict[str, Any]:
    single = source / "model.safetensors"
    index = source / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
        if not shards:
            raise SourceError(f"{index} lists no shards")
        out: dict[str, Any] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise SourceError(f"{index}: shard name '{shard}' is not a file in {source}")
            out.update(read_safetensors(source / shard))
        return out
    pickles = sorted(p.name for pat in _PICKLES for p in source.glob(pat))
    if pickles:
        raise SourceError(
            f"{source} holds only pickle weights ({', '.join(pickles)}): fmplex never loads pickle; "
            "re-save the model with save_pretrained(dir) (safetensors, the default) and import that"
        )
    raise SourceError(f"{source} has no model.safetensors")


def _key(name: str) -> str:
    """Checkpoint key -> BertModel-relative name (``bert.`` prefix off, old LayerNorm names fixed)."""
    if name.startswith("bert."):
        name = name[len("bert.") :]
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def _same(a: Any, b: Any) -> bool:
    import torch  # noqa: PLC0415

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def _labels(cfg: dict[str, Any], n: int, source: Path) -> list[str]:
    if n < 2:
        raise SourceError(f"{source}: the classifier has {n} output(s); fmplex classification heads need at least 2 labels")
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return [f"LABEL_{i}" for i in range(n)]
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        raise SourceError(f"{source}/config.json: id2label keys must be integers") from None
    if [i for i, _ in items] != list(range(n)):
        raise SourceError(f"{source}/config.json: id2label has ids {[i for i, _ in items]}, the classifier has {n} outputs")
    return [v for _, v in items]


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    if not source.is_dir():
        raise SourceError(f"{source}: a fork is imported from a transformers checkpoint directory (config.json + model.safetensors)")
    cfg = read_json(source / "config.json")
    if cfg.get("model_type") != "bert":
        raise SourceError(f"{source}: model_type is {cfg.get('model_type')!r}; a fork of '{spec.name}' must be a BERT checkpoint")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise SourceError(
            f"{source}: architecture {archs!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    arch = archs[0]
    head_type = ARCHITECTURES[arch]
    root = spec.locate()
    base_cfg = read_json(root / "config.json")
    defaults = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "type_vocab_size": 2}
    diffs = [
        f"{k} {cfg.get(k, defaults.get(k))!r} (backbone {base_cfg.get(k, defaults.get(k))!r})"
        for k in MUST_MATCH
        if cfg.get(k, defaults.get(k)) != base_cfg.get(k, defaults.get(k))
    ]
    if diffs:
        raise SourceError(f"{source}: config does not match backbone '{spec.name}': {'; '.join(diffs)}")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise SourceError(f"{source}: decoder / cross-attention BERT checkpoints cannot fork an encoder backbone")

    raw = _weights(source)
    weights: dict[str, Any] = {}
    for name, t in raw.items():
        key = _key(name)
        if key in _IGNORED:
            continue
        if key in weights:
            raise SourceError(f"{source}: tensor '{name}' appears twice (with and without the 'bert.' prefix)")
        weights[key] = t
    base = {k: v for k, v in read_safetensors(root / "model.safetensors").items() if _key(k) not in _IGNORED}
    base = {_key(k): v for k, v in base.items()}
    n_layers = int(base_cfg["num_hidden_layers"])

    # Embeddings: shared by every row of every task, so they must be the backbone's.
    for key in sorted(k for k in base if k.startswith("embeddings.")):
        if key not in weights:
            raise SourceError(f"{source}: tensor '{key}' is missing")
        if not _same(weights[key], base[key]):
            note = "" if weights[key].dtype == base[key].dtype else f" (stored as {weights[key].dtype}, the backbone's are {base[key].dtype})"
            raise SourceError(f"{source}: embeddings differ: a fork can only own top layers ('{key}' changed{note})")

    # Layers: the fork point is the first one that differs anywhere.
    point = n_layers
    for j in range(n_layers):
        for p in LAYER_PARAMS:
            key = f"encoder.layer.{j}.{p}"
            if key not in weights:
                raise SourceError(f"{source}: tensor '{key}' is missing")
            if tuple(weights[key].shape) != tuple(base[key].shape):
                raise SourceError(f"{source}: '{key}' has shape {tuple(weights[key].shape)}, the backbone's is {tuple(base[key].shape)}")
            if point == n_layers and not _same(weights[key], base[key]):
                point = j
    tensors: dict[str, Any] = {}
    for j in range(point, n_layers):
        for p in LAYER_PARAMS:
            tensors[f"fork.layer.{j}.{p}"] = weights[f"encoder.layer.{j}.{p}"].float().contiguous()

    # Head.
    used = {k for k in weights if k.startswith("embeddings.") or k.startswith("encoder.layer.")}
    manifest: dict[str, Any] = {"fork": {"point": point}, "head": {"type": head_type}}
    h = int(base_cfg["hidden_size"])
    if head_type == "cls":
        for name, shape in (("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))):
            if name not in weights:
                raise SourceError(f"{source}: '{name}' (BERT's pooler, which the classifier reads) is missing")
            if tuple(weights[name].shape) != shape:
                raise SourceError(f"{source}: '{name}' has shape {tuple(weights[name].shape)}, expected {shape}")
        tensors["head.pooler.weight"] = weights["pooler.dense.weight"].float().contiguous()
        tensors["head.pooler.bias"] = weights["pooler.dense.bias"].float().contiguous()
        used |= {"pooler.dense.weight", "pooler.dense.bias"}
    if head_type in ("cls", "token"):
        w, b = weights.get("classifier.weight"), weights.get("classifier.bias")
        if w is None or b is None:
            raise SourceError(f"{source}: {arch} checkpoint lacks classifier.weight / classifier.bias")
        if w.dim() != 2 or w.shape[1] != h or b.dim() != 1 or b.shape[0] != w.shape[0]:
            raise SourceError(f"{source}: classifier has shapes {tuple(w.shape)} / {tuple(b.shape)}, expected (labels, {h}) / (labels,)")
        manifest["labels"] = _labels(cfg, int(w.shape[0]), source)
        tensors["head.weight"] = w.float().contiguous()
        tensors["head.bias"] = b.float().contiguous()
        used |= {"classifier.weight", "classifier.bias"}
        if head_type == "cls" and cfg.get("problem_type") == "multi_label_classification":
            echo("note: multi-label classifier: LOGITS are its raw logits, LABEL is only the top-scoring label")
    ignored = sorted(set(weights) - used)
    pooler_only = [k for k in ignored if k.startswith("pooler.")]
    unknown = [k for k in ignored if not k.startswith("pooler.")]
    if unknown:
        raise SourceError(f"{source}: unexpected tensor(s) for {arch}: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if pooler_only and head_type != "cls":
        echo(f"note: ignoring BERT's pooler ({head_type} heads do not use it)")

    size = sum(t.numel() * t.element_size() for t in tensors.values())
    owned = n_layers - point
    labels = f" ({len(manifest['labels'])} labels)" if "labels" in manifest else ""
    if owned:
        echo(f"fork at layer {point}: {owned} layer{'s' if owned != 1 else ''} + {head_type} head{labels}, {size / 1e6:.1f} MB")
    else:
        echo(f"no layer differs from the backbone: only the {head_type} head{labels} is task-specific, {size / 1e6:.1f} MB")
    return Built(manifest=manifest, tensors=tensors)


__all__ = ["ARCHITECTURES", "LAYER_PARAMS", "build"]
