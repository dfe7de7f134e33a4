"""PEFT IA3 adapter directory -> fmplex ``ia3`` task (body, and head if trained).

IA3 learns one vector per targeted Linear: PEFT multiplies a feed-forward
module's input by it (``W (l ⊙ x) + b``) and any other module's output
(``l ⊙ (W x + b)``); which is which follows the adapter's
``feedforward_modules`` by PEFT's own matching rule. Stored as ``ia3.<path>``
(1-D) with manifest ``ia3.feedforward`` (the paths whose input is scaled).
A ``SEQ_CLS`` / ``TOKEN_CLS`` adapter's trained classifier becomes the task's
head, IA3 on the pooler merged into the task's own pooler weight
(:mod:`.peft_encoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmplex.backbones import BackboneSpec

from . import Built, Echo
from . import peft_encoder as pe


def build(source: Path, spec: BackboneSpec, options: dict[str, Any], echo: Echo) -> Built:
    adapter = pe.read(source, "IA3", "ia3")
    tensors, feedforward, modules = {}, [], []
    pooler = None
    for path, module in sorted(adapter.ia3.items()):
        own = pe.module_path(adapter, path)
        if own == pe.POOLER:
            pooler = module
            continue
        modules.append(own)
        if module.feedforward:
            feedforward.append(own)
        tensors[f"ia3.{own}"] = module.vector
    fields, head_tensors = pe.head(adapter, spec, options, echo, pooler_ia3=pooler)
    echo(f"IA3: {len(modules)} modules ({len(feedforward)} feed-forward), {sum(t.numel() for t in tensors.values())} parameters")
    return Built(manifest={"ia3": {"modules": modules, "feedforward": feedforward}, **fields}, tensors={**tensors, **head_tensors})
