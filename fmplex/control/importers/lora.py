"""PEFT LoRA adapter directory -> fmplex ``lora`` task (body, and head if trained).

Read by the one PEFT reader (:mod:`fmplex.peft_reader`): any rank,
per-module ranks/alphas (``rank_pattern``/``alpha_pattern``), rsLoRA scaling,
targets among the attention and MLP projections of any layer, and BERT's
pooler. Stored as ``lora.<path>.A`` [r, in] and ``lora.<path>.B`` [out, r]
with one scale per module (manifest ``lora.scales``). A ``SEQ_CLS`` /
``TOKEN_CLS`` adapter's trained classifier becomes the task's head, with LoRA
on the pooler merged into the task's own pooler weight
(:mod:`.peft_encoder`). On an adapter without a head (``FEATURE_EXTRACTION``),
LoRA on the pooler changes nothing the task returns: the sentence embedding
is the mean over token states, which never reads BERT's pooler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmplex.backbones import BackboneSpec

from . import Built, Echo
from . import peft_encoder as pe


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    adapter = pe.read(source, "LORA", "lora")
    tensors, scales = {}, {}
    pooler = None
    for path, module in adapter.lora.items():
        own = pe.module_path(adapter, path)
        if own == pe.POOLER:
            pooler = module
            continue
        scales[own] = module.scale
        tensors[f"lora.{own}.A"] = module.a
        tensors[f"lora.{own}.B"] = module.b
    fields, head_tensors = pe.head(adapter, spec, options, echo, pooler_lora=pooler)
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".A")})
    echo(f"LoRA: {len(scales)} modules, rank {', '.join(map(str, ranks))}, {sum(t.numel() for t in tensors.values())} parameters")
    return Built(manifest={"lora": {"scales": scales}, **fields}, tensors={**tensors, **head_tensors})
