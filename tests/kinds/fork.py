"""A fine-tuned MiniLM checkpoint (top layers + head changed), made and saved by
transformers itself; reference = that whole model run alone on each text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import BACKBONE, TaskSource, mean_pool, tokenizer

LABELS = {"cls": ["negative", "neutral", "positive"], "token": ["O", "B-PER", "I-PER", "B-LOC"]}


def finetuned(head: str = "cls", seed: int = 0, layers: int = 2, std: float = 0.02) -> torch.nn.Module:
    """The backbone as a ``head`` model with seeded noise on its top ``layers`` layers and its head."""
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    torch.manual_seed(seed)  # a new classifier starts from random weights
    if head == "embedding":
        model = BertModel.from_pretrained(BACKBONE, local_files_only=True)
        bert = model
    else:
        cls = BertForSequenceClassification if head == "cls" else BertForTokenClassification
        names = LABELS[head]
        model = cls.from_pretrained(
            BACKBONE,
            local_files_only=True,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        bert = model.bert
    gen = torch.Generator().manual_seed(seed)
    n = len(bert.encoder.layer)
    with torch.no_grad():
        changed = [*bert.encoder.layer[n - layers :]]
        if head != "embedding":
            changed.append(model.classifier)
        if head == "cls":
            changed.append(bert.pooler)
        for module in changed:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def make(tmp: Path, seed: int = 0, head: str = "cls", layers: int = 2) -> TaskSource:
    model = finetuned(head, seed, layers)
    out = tmp / f"fork_{head}_l{layers}_s{seed}"
    model.save_pretrained(str(out))  # safetensors (transformers' default)
    tok = tokenizer()

    def run(text: str):  # noqa: ANN202
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            return model(**enc), enc

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        if head == "cls":
            logits = np.stack([run(t)[0].logits[0].numpy() for t in texts])
            names = np.array([LABELS["cls"][i].encode() for i in logits.argmax(axis=1)], dtype=object)
            return {"LOGITS": logits, "LABEL": names}
        if head == "token":
            rows = [run(t)[0].logits[0].numpy() for t in texts]
            padded = np.zeros((len(rows), max(r.shape[0] for r in rows), rows[0].shape[1]), dtype=np.float32)
            for i, r in enumerate(rows):
                padded[i, : r.shape[0]] = r
            return {"TOKEN_LOGITS": padded}
        outs = []
        for t in texts:
            res, enc = run(t)
            outs.append(mean_pool(res.last_hidden_state, enc["attention_mask"])[0])
        return {"EMBEDDING": np.stack(outs)}

    return TaskSource("fork", ["--kind", "fork", "--source", str(out)], reference)
