"""What one generation request is while the engine runs it, and what the engine reports.

:class:`SamplingParams` (how a request decodes, validated once), :class:`Sequence`
(prompt, parameters and running state of one request), :class:`Update` (what a
request's sink hears after a step), :class:`StepReport` and :class:`EngineStats`
(what a step did, what the engine did so far). Pure data: no torch work here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # sampling only; None = a random seed
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string must be 1-{MAX_STOP_CHARS} characters, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class Update:
    """What the engine tells a request's sink after a step (or at its end).

    ``text`` is the new part of the answer; the concatenation of all ``text``
    of one sequence is exactly its final answer. ``done`` comes once, last.
    ``error``/``outcome`` are set when the request failed instead.
    """

    seq: Sequence
    text: str
    done: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length"
    error: str | None = None
    outcome: str = "ok"  # ok | expired | cancelled | shutdown | removed | internal


class Sequence:
    """One generation request: prompt, parameters, and its state while it runs."""

    def __init__(
        self,
        task: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: Any = None,
        sink: Callable[[Update], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
        tag: Any = None,
        prompt_embeds: Any = None,
        context: Any = None,
        want_prompt_logits: bool = False,
    ) -> None:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.task = task
        self.prompt_ids = [int(t) for t in prompt_ids]
        if prompt_embeds is not None and int(prompt_embeds.shape[0]) != len(self.prompt_ids):
            raise ValueError(f"prompt_embeds has {int(prompt_embeds.shape[0])} rows for {len(self.prompt_ids)} prompt tokens")
        self.prompt_embeds = prompt_embeds  # [prompt tokens, hidden]: the prefill's inputs instead of the ids' embeddings
        self.context = context  # model-specific inputs a forward reads (e.g. cross-attention image features)
        self.want_prompt_logits = want_prompt_logits
        self.prompt_logits: Any = None  # [prompt tokens, vocab] after prefill, when asked for
        self.params = params
        self.adapter = adapter
        self.sink = sink
        self.cancelled = cancelled
        self.deadline = deadline
        self.tag = tag  # the caller's own handle (e.g. a Triton request)
        self.generated: list[int] = []  # new token ids (EOS included if produced)
        self.text = ""  # the answer so far (final: stop string trimmed)
        self.emitted = 0  # characters of ``text`` already handed to the sink
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.outcome: str | None = None
        self.done = False
        self.past = 0  # positions in the KV cache
        self.submitted_at = 0.0
        self.admitted_at: float | None = None  # when its prefill step started
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.state: Any = None  # a forward's own per-sequence state, if it keeps any
        self.sampler: Any = None  # the sampler's per-sequence state (generator, warpers)
        self.detokenizer: Any = None  # the incremental detokenizer of this answer

    @property
    def output_ids(self) -> list[int]:
        return list(self.generated)

    def __repr__(self) -> str:
        return f"Sequence(task={self.task!r}, prompt={len(self.prompt_ids)} tokens, generated={len(self.generated)}, done={self.done})"


@dataclasses.dataclass
class StepReport:
    rows: int  # sequences in the forward pass
    admitted: int  # of which prefilled at this step
    tokens: int  # new tokens through the projections (prefill + decode)
    finished: int
    seconds: float
    padded_tokens: int  # the attention's padded query volume: one per decoding row + prompts x the longest prompt


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    rows: int = 0  # sum over steps of rows per step
    multi_row_steps: int = 0  # steps with >1 row: requests really shared a batch
    max_rows: int = 0
    tokens_generated: int = 0
    prefill_tokens: int = 0
    admitted: int = 0
    finished: int = 0
    forward_seconds: float = 0.0
