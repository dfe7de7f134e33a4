"""A PEFT LoRA adapter on MiniLM, made by peft itself; reference = PeftModel alone."""

from __future__ import annotations

from pathlib import Path

import torch

from . import TaskSource, backbone_model, embedding_reference, tokenizer


def make(tmp: Path, seed: int = 0, rank: int = 4, targets: tuple[str, ...] = ("query", "value", "dense")) -> TaskSource:
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(backbone_model(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter): make it do something
            torch.nn.init.normal_(p, std=0.05)
    out = tmp / f"lora_r{rank}_s{seed}"
    model.save_pretrained(str(out))
    ref = PeftModel.from_pretrained(backbone_model(), str(out)).eval()
    tok = tokenizer()

    reference = embedding_reference(ref, tok)

    return TaskSource("lora", ["--kind", "lora", "--source", str(out)], reference)
