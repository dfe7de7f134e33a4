"""A PEFT prompt-tuning adapter on MiniLM, made by peft itself; reference = PeftModel alone.

PEFT (0.21, FEATURE_EXTRACTION) runs the backbone on ``[prompt ; word
embeddings]`` with the attention mask extended by P ones in front, positions
0..P+T-1, token type ids dropped (all zeros), and returns ``last_hidden_state``
for all P+T positions, virtual ones first. fmplex's sentence vector of a prompt
task is the masked mean over the input tokens only (``h[:, P:]``), L2-normalised.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import TaskSource, backbone_model, mean_pool, tokenizer


def make(tmp: Path, seed: int = 0, virtual_tokens: int = 8) -> TaskSource:
    from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(seed)
    config = PromptTuningConfig(
        task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM
    )
    model = get_peft_model(backbone_model(), config)
    # RANDOM init is N(0, 1), far off the word-embedding scale: make the prompt
    # look trained instead — real word vectors of random tokens plus noise.
    words = model.get_base_model().embeddings.word_embeddings.weight
    g = torch.Generator().manual_seed(1000 + seed)
    picks = torch.randint(1000, words.shape[0], (virtual_tokens,), generator=g)
    with torch.no_grad():
        vectors = words[picks] + torch.randn(virtual_tokens, words.shape[1], generator=g) * words.std() * 0.5
        model.prompt_encoder["default"].embedding.weight.copy_(vectors)
    out = tmp / f"prompt_p{virtual_tokens}_s{seed}"
    model.save_pretrained(str(out))
    ref = PeftModel.from_pretrained(backbone_model(), str(out)).eval()
    tok = tokenizer()

    def reference(texts: list[str]) -> dict[str, np.ndarray]:
        rows = []
        for t in texts:
            enc = tok(t, return_tensors="pt")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Token type ids are not supported")
                hidden = ref(**enc).last_hidden_state
            assert hidden.shape[1] == virtual_tokens + enc["input_ids"].shape[1]
            rows.append(mean_pool(hidden[:, virtual_tokens:], enc["attention_mask"])[0])
        return {"EMBEDDING": np.stack(rows)}

    return TaskSource("prompt", ["--kind", "prompt", "--source", str(out)], reference)
