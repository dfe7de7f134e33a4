"""Choosing the next token of one sequence from its logits.

Greedy (``temperature == 0``) is the argmax. Sampling applies transformers' own
temperature / top-k / top-p warpers in ``generate``'s order and draws with a
per-sequence ``torch.Generator`` seeded with the request's seed, so a sampled
answer depends on its seed only -- not on which other sequences share its steps
-- and equals ``generate(do_sample=True)`` after ``torch.manual_seed(seed)``.
A temperature so close to 0 that logits / temperature overflows to infinity
(``generate`` raises there) gives the argmax, the limit of those distributions.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import torch
import torch.nn.functional as F

from .sequence import SamplingParams, Sequence

__all__ = ["choose", "draw"]


@dataclasses.dataclass
class _SamplerState:
    warpers: list[Any]
    generator: torch.Generator


def _state(params: SamplingParams) -> _SamplerState:
    from transformers.generation.logits_process import (  # noqa: PLC0415
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers: list[Any] = []  # generate's order
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return _SamplerState(warpers, torch.Generator().manual_seed(seed))


def choose(seq: Sequence, logits: torch.Tensor) -> int:
    """The next token of ``seq`` from its logits ``[vocab]``."""
    p = seq.params
    if p.greedy:
        return int(torch.argmax(logits))
    if seq.sampler is None:
        seq.sampler = _state(p)
    scores = logits[None].float()
    for w in seq.sampler.warpers:
        scores = w(None, scores)
    return draw(F.softmax(scores, dim=-1), logits, seq.sampler.generator)


def draw(probs: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token drawn from ``probs`` (softmax of the warped ``logits``), or the argmax of ``logits`` where
    the warping overflowed (a temperature that near 0 is greedy in the limit; ``multinomial`` would raise)."""
    if not bool(torch.isfinite(probs).all()):
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs.reshape(1, -1), num_samples=1, generator=generator)[0, 0])
