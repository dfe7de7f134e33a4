"""What the encoder family makes of a PEFT directory: module paths and the trained head.

Shared by the ``lora``, ``ia3`` and ``prompt`` importers, over the one PEFT
reader (:mod:`fmplex.peft_reader`):

- module paths: PEFT names them relative to the transformers model it wrapped
  (``bert.encoder.layer.3.attention.self.query`` under a ``...ForSequenceClassification``,
  ``encoder.layer.3...`` under a ``BertModel``); fmplex keys them by the
  backbone's own path (``encoder.layer.3.attention.self.query``);
- the head: a ``SEQ_CLS`` or ``TOKEN_CLS`` adapter saves its trained classifier
  (``modules_to_save``). It becomes the task's head — BERT's pooler + the
  classifier (``cls``: what ``BertForSequenceClassification`` computes, the
  pooler reading position 0, which is the first virtual token under prompt
  tuning) or the per-token classifier (``token``). LoRA or IA3 on the pooler is
  merged into the task's own copy of the pooler weight. Labels come from
  ``--labels``, else ``id2label`` in a ``config.json`` beside the adapter, else
  ``LABEL_<i>`` as transformers names them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from fmplex.backbones import BackboneSpec
from fmplex.peft_reader import Ia3Module, LoraModule, PeftAdapter, PeftError, read_adapter
from fmplex.triton_backend.segments import TARGETS

from . import Echo, SourceError, read_json

POOLER = "pooler.dense"
HEAD_TASK_TYPES = {"SEQ_CLS": "cls", "TOKEN_CLS": "token"}
BODY_TASK_TYPES = (None, "FEATURE_EXTRACTION")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_PREFIX = "bert."


def read(source: Path, peft_type: str, kind: str) -> PeftAdapter:
    """The adapter, or a one-line SourceError (with a hint when the kind is wrong)."""
    try:
        adapter = read_adapter(source, (peft_type,))
    except PeftError as exc:
        raise SourceError(_hint(source, str(exc), peft_type)) from None
    task_type = adapter.task_type
    if task_type not in BODY_TASK_TYPES and task_type not in HEAD_TASK_TYPES:
        raise SourceError(
            f"{source}: task_type {task_type!r} is not served by the '{kind}' kind of an encoder "
            f"(accepted: FEATURE_EXTRACTION, SEQ_CLS, TOKEN_CLS or none)"
        )
    return adapter


def _hint(source: Path, message: str, peft_type: str) -> str:
    kinds = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt"}
    try:
        found = read_json(Path(source) / "adapter_config.json").get("peft_type")
    except SourceError:
        return message
    if found != peft_type and found in kinds:
        return f"{message} (use --kind {kinds[found]})"
    return message


def module_path(adapter: PeftAdapter, path: str) -> str:
    """PEFT's module path -> the backbone's (``encoder.layer.<j>.<target>`` or ``pooler.dense``); refuses others."""
    own = path[len(_PREFIX) :] if path.startswith(_PREFIX) else path
    m = _LAYER.match(own)
    if (m and m.group(2) in TARGETS) or own == POOLER:
        return own
    raise SourceError(
        f"{adapter.source}: {adapter.peft_type} on '{path}' is not supported "
        f"(targets: {', '.join(TARGETS)} in encoder layers, and {POOLER})"
    )


def _labels(adapter: PeftAdapter, n: int, options: dict[str, Any]) -> list[str]:
    given = options.get("labels")
    where = adapter.source
    if given:
        labels = [str(x).strip() for x in given]
        if len(labels) != n:
            raise SourceError(f"{where}: --labels names {len(labels)} labels, the trained classifier has {n} outputs")
        if any(not x for x in labels) or len(set(labels)) != len(labels):
            raise SourceError(f"{where}: --labels must be {n} distinct, non-empty names")
        return labels
    config = Path(where) / "config.json"
    if config.is_file():
        id2label = read_json(config).get("id2label")
        if isinstance(id2label, dict) and id2label:
            try:
                items = sorted((int(k), str(v)) for k, v in id2label.items())
            except (TypeError, ValueError):
                raise SourceError(f"{config}: id2label keys must be integers") from None
            if [i for i, _ in items] != list(range(n)):
                raise SourceError(f"{config}: id2label has ids {[i for i, _ in items]}, the trained classifier has {n} outputs")
            return [v for _, v in items]
    return [f"LABEL_{i}" for i in range(n)]


def _backbone_pooler(spec: BackboneSpec) -> tuple[torch.Tensor, torch.Tensor]:
    from . import read_safetensors  # noqa: PLC0415

    weights = read_safetensors(spec.locate() / "model.safetensors")
    for prefix in ("", _PREFIX):
        w, b = weights.get(f"{prefix}{POOLER}.weight"), weights.get(f"{prefix}{POOLER}.bias")
        if w is not None and b is not None:
            return w.float(), b.float()
    raise SourceError(f"backbone '{spec.name}' has no BERT pooler, which a sequence-classification head reads")


def head(
    adapter: PeftAdapter,
    spec: BackboneSpec,
    options: dict[str, Any],
    echo: Echo,
    pooler_lora: LoraModule | None = None,
    pooler_ia3: Ia3Module | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest fields, tensors) of the trained head; ({}, {}) for an adapter saved without one."""
    where, h = adapter.source, spec.hidden_size
    saved = {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in adapter.saved.items()}
    head_type = HEAD_TASK_TYPES.get(adapter.task_type or "")
    pooler_changed = pooler_lora is not None or pooler_ia3 is not None
    allowed = {"classifier.weight", "classifier.bias"} | ({f"{POOLER}.weight", f"{POOLER}.bias"} if head_type == "cls" else set())
    stray = sorted(k for k in saved if k not in allowed)
    if stray:
        kind = f"a {adapter.task_type} adapter" if head_type else f"task_type {adapter.task_type!r}"
        raise SourceError(f"{where}: modules_to_save tensor '{stray[0]}' is not imported for {kind} (only the classifier"
                          f"{' and the pooler' if head_type == 'cls' else ''} of a SEQ_CLS/TOKEN_CLS adapter)")
    if head_type == "token" and pooler_changed:
        raise SourceError(f"{where}: {adapter.peft_type} on '{POOLER}' in a TOKEN_CLS adapter: BertForTokenClassification has no pooler")
    if "classifier.weight" not in saved and "classifier.bias" not in saved:
        if head_type == "cls" and pooler_changed:
            raise SourceError(f"{where}: {adapter.peft_type} on '{POOLER}' without the classifier that reads it (not in the adapter file)")
        return {}, {}  # a body only: the head comes from --train, or the task is an embedding
    if head_type is None:
        raise SourceError(f"{where}: a classifier is saved, but task_type is {adapter.task_type!r} (SEQ_CLS or TOKEN_CLS expected)")
    if options.get("train"):
        raise SourceError(f"{where}: the adapter brings its trained classifier; --train would replace it (leave --train out)")
    w, b = saved.get("classifier.weight"), saved.get("classifier.bias")
    if w is None or b is None:
        raise SourceError(f"{where}: the saved classifier lacks its {'weight' if w is None else 'bias'}")
    if w.dim() != 2 or w.shape[1] != h:
        raise SourceError(f"{where}: classifier.weight has shape {tuple(w.shape)}, but backbone '{spec.name}' has hidden size {h}")
    n = int(w.shape[0])
    if n < 2:
        raise SourceError(f"{where}: the classifier has {n} output(s); fmplex classification heads need at least 2 labels")
    if tuple(b.shape) != (n,):
        raise SourceError(f"{where}: classifier.bias has shape {tuple(b.shape)}, expected ({n},)")
    tensors = {"head.weight": w.contiguous(), "head.bias": b.contiguous()}
    fields: dict[str, Any] = {"head": {"type": head_type}, "labels": _labels(adapter, n, options)}
    if head_type == "cls":
        pw, pb = saved.get(f"{POOLER}.weight"), saved.get(f"{POOLER}.bias")
        if (pw is None) != (pb is None):
            raise SourceError(f"{where}: the saved pooler lacks its {'weight' if pw is None else 'bias'}")
        if pw is None:
            pw, pb = _backbone_pooler(spec)
        if tuple(pw.shape) != (h, h) or tuple(pb.shape) != (h,):
            raise SourceError(f"{where}: the pooler has shapes {tuple(pw.shape)} / {tuple(pb.shape)}, expected ({h}, {h}) / ({h},)")
        pw, pb = pw.clone(), pb.clone()
        if pooler_lora is not None:
            a, bm = pooler_lora.a, pooler_lora.b
            if a.shape[1] != h or bm.shape[0] != h:
                raise SourceError(f"{where}: LoRA on '{POOLER}' maps {a.shape[1]}->{bm.shape[0]}, the pooler is {h}->{h}")
            pw = pw + (bm @ a) * pooler_lora.scale
        if pooler_ia3 is not None:
            v = pooler_ia3.vector
            if v.shape != (h,):
                raise SourceError(f"{where}: IA3 on '{POOLER}' has {v.shape[0]} values, the pooler has {h}")
            if pooler_ia3.feedforward:
                pw = pw * v[None, :]
            else:
                pw, pb = pw * v[:, None], pb * v
        tensors["head.pooler.weight"] = pw.contiguous()
        tensors["head.pooler.bias"] = pb.contiguous()
    merged = " (pooler LoRA/IA3 merged into the task's pooler)" if pooler_changed else ""
    echo(f"head: trained {adapter.task_type} classifier, {n} labels ({', '.join(fields['labels'])}){merged}")
    return fields, tensors
