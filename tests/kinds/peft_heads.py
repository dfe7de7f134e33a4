"""PEFT adapters saved with their trained heads (SEQ_CLS / TOKEN_CLS), made by peft itself.

Every artifact is made with real PEFT on ``AutoModelForSequenceClassification``
(or ``...ForTokenClassification``) of the MiniLM backbone, with every trained
tensor non-trivial: LoRA with ``init_lora_weights=False`` (B != 0), IA3 vectors
and soft prompts moved off their initial values, and the classifier (PEFT's
``modules_to_save``) drawn at a trained-looking scale. The reference is
``PeftModel.from_pretrained(AutoModelFor...(backbone), dir)`` in eval mode, one
text at a time: its ``logits`` and the label of their argmax.

Labels: one artifact ships a ``config.json`` with ``id2label`` beside the
adapter, one is given ``--labels``, the rest are transformers' ``LABEL_<i>``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import BACKBONE, TaskSource, tokenizer

LABELS3 = ["negative", "neutral", "positive"]


def _cls_model(n: int, token: bool = False) -> Any:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialised" is the point here
    hf_logging.disable_progress_bar()
    cls = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    return cls.from_pretrained(BACKBONE, local_files_only=True, num_labels=n)


def _reference(out: Path, n: int, names: list[str], token: bool) -> Callable[[list[str]], dict[str, np.ndarray]]:
    from peft import PeftModel

    ref = PeftModel.from_pretrained(_cls_model(n, token), str(out)).eval()
    tok = tokenizer()
    labels = np.array([x.encode() for x in names], dtype=object)

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        rows = []
        for t in texts:
            enc = tok(t, return_tensors="pt")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Token type ids are not supported")
                rows.append(ref(**enc).logits[0].numpy())
        if token:
            longest = max(r.shape[0] for r in rows)
            padded = np.zeros((len(rows), longest, n), dtype=np.float32)
            for i, r in enumerate(rows):
                padded[i, : r.shape[0]] = r
            return {"TOKEN_LOGITS": padded}
        logits = np.stack(rows).astype(np.float32)
        return {"LOGITS": logits, "LABEL": labels[logits.argmax(1)]}

    return reference


def _perturb(model: Any, seed: int, marker: str, around: float, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(around + torch.randn(p.shape, generator=g) * scale)


def make(tmp: Path, variant: str, seed: int = 0) -> TaskSource:
    """``variant``: lora_qv | lora_all | lora_pattern | prompt | ia3 | lora_token."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    torch.manual_seed(seed)
    out = Path(tmp) / f"peft_{variant}_s{seed}"
    n, token, names, args = 3, False, [f"LABEL_{i}" for i in range(3)], []
    if variant == "lora_qv":  # id2label from a config.json saved beside the adapter
        base = _cls_model(n)
        base.config.id2label = dict(enumerate(LABELS3))
        base.config.label2id = {v: k for k, v in base.config.id2label.items()}
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
                                                init_lora_weights=False))
        names = LABELS3
    elif variant == "lora_all":  # every Linear, the pooler included
        model = get_peft_model(_cls_model(n), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                                         init_lora_weights=False))
    elif variant == "lora_pattern":  # per-module ranks and alphas, rsLoRA, --labels
        n = 4
        names = ["w", "x", "y", "z"]
        args = ["--labels", ",".join(names)]
        model = get_peft_model(_cls_model(n), LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "intermediate.dense"],
            rank_pattern={"key": 2, "layer.3.intermediate.dense": 12}, alpha_pattern={"value": 5}, use_rslora=True,
            init_lora_weights=False))
    elif variant == "prompt":
        model = get_peft_model(_cls_model(n), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=6,
                                                                 prompt_tuning_init=PromptTuningInit.RANDOM))
        words = model.get_base_model().bert.embeddings.word_embeddings.weight
        g = torch.Generator().manual_seed(100 + seed)
        picks = torch.randint(1000, words.shape[0], (6,), generator=g)
        with torch.no_grad():  # trained-looking vectors: real word vectors plus noise
            vectors = words[picks] + torch.randn(6, words.shape[1], generator=g) * words.std() * 0.5
            model.prompt_encoder["default"].embedding.weight.copy_(vectors)
    elif variant == "ia3":  # key/value outputs, feed-forward inputs, and the pooler
        model = get_peft_model(_cls_model(n), IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense", "pooler.dense"],
                                                        feedforward_modules=["output.dense"]))
        _perturb(model, 200 + seed, "ia3_l", 1.0, 0.3)
    elif variant == "lora_token":
        n = 5
        token = True
        names = [f"LABEL_{i}" for i in range(n)]
        model = get_peft_model(_cls_model(n, token=True), LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                                     target_modules=["query", "value", "output.dense"],
                                                                     init_lora_weights=False))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if variant.startswith("lora"):
        _perturb(model, 300 + seed, "lora_B", 0.0, 0.05)  # PEFT's non-default init keeps B small: make it matter
    # transformers starts the classifier at std 0.02 (logits ~0.05): make it look trained
    _perturb(model, 400 + seed, "modules_to_save", 0.0, 0.3)
    model.eval()
    model.save_pretrained(str(out))
    if variant == "lora_qv":
        model.get_base_model().config.save_pretrained(str(out))  # config.json with id2label beside the adapter
    kind = {"prompt": "prompt", "ia3": "ia3"}.get(variant, "lora")
    return TaskSource(kind, ["--kind", kind, "--source", str(out), *args], _reference(out, n, names, token), atol=1e-4, rtol=1e-4)
