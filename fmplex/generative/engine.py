"""Continuous-batching decode engine for the generative backbone (no Triton imports).

Iteration-level batching (Orca, vLLM): the unit of work is one *step* — one
batched forward pass that (1) prefills the sequences admitted at this step
and (2) advances every running sequence by one token. Sequences join between
steps as soon as the running batch has room and leave as soon as they are
done, so a short answer never waits for a long one and a new request never
waits for the whole batch to finish.

Admission is the fair scheduler's job: waiting requests sit in the host's
weighted-fair queues (``fmplex.runtime.scheduler``, cost = prompt +
max new tokens), and between steps the engine asks it for as many as the
batch has free rows, within a prefill token budget (rows x padded prompt
length) that bounds how long a step with prefills can stall the running rows.

The forward pass is our own loop over the Llama layers of the loaded
``LlamaForCausalLM`` (its weights and norm/rotary modules, not a copy), because
a step mixes rows at different positions and tasks:
  * the new tokens of all rows are packed flat ([tokens, hidden], no padding)
    through every projection, with explicit position ids for the rotary
    embedding;
  * each task's LoRA or IA3 delta changes its own rows only: the rows' owners
    (:class:`fmplex.row_deltas.Segments`) are built once per step and passed
    to every projection (``lora.py`` reads the adapters);
  * attention runs per row against that row's KV cache — one SDPA call over
    the batch with a boolean mask (row r sees its own keys ``< past_r + i + 1``),
    queries padded only when a step carries prefills;
  * the KV cache is one preallocated tensor per layer, ``[max_rows, kv_heads,
    capacity, head_dim]``, row i = the i-th running sequence; a finished
    sequence's row is refilled with the last one (O(its length) copy).
Greedy decoding gives the same token ids as ``model.generate(do_sample=False)``
on the sequence alone (fp32; checked in tests/unit/test_generative_engine.py).
Sampling applies transformers' own temperature / top-k / top-p warpers in
generate's order and draws with a per-request ``torch.Generator`` seeded with
the request's seed, so a sampled answer depends on its seed only — not on
which other requests share its steps — and equals ``generate(do_sample=True)``
after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fmplex.runtime.scheduler import BatchBudget, Pending, QueueFull, TaskPolicy, make_scheduler

from fmplex.row_deltas import Segments, linear

from .lora import TaskAdapter
from .smollm import LoadedLM

__all__ = ["Engine", "QueueFull", "SamplingParams", "Sequence", "StepReport", "Update"]

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
        adapter: TaskAdapter | None = None,
        sink: Callable[[Update], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
        tag: Any = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.task = task
        self.prompt_ids = [int(t) for t in prompt_ids]
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
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._generator: torch.Generator | None = None
        self._warpers: list[Any] | None = None

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
    padded_tokens: int  # rows x padded query length, the attention's padded volume


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


class _KVCache:
    """Per-layer K and V: ``[max_rows, kv_heads, capacity, head_dim]``, grown by doubling."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int) -> None:
        self.shape = (layers, rows, kv_heads, head_dim)
        self.initial = capacity
        self._alloc(capacity)

    @torch.inference_mode()
    def _alloc(self, capacity: int) -> None:
        layers, rows, kv, hd = self.shape
        self.capacity = capacity
        self.k = [torch.zeros(rows, kv, capacity, hd) for _ in range(layers)]
        self.v = [torch.zeros(rows, kv, capacity, hd) for _ in range(layers)]

    @torch.inference_mode()
    def ensure(self, length: int, used_rows: int, used_len: int) -> None:
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        old_k, old_v = self.k, self.v
        self._alloc(cap)
        for new, old in ((self.k, old_k), (self.v, old_v)):
            for n, o in zip(new, old):
                n[:used_rows, :, :used_len] = o[:used_rows, :, :used_len]

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]

    def reset(self) -> None:
        """Back to the initial capacity once idle: long answers do not pin memory."""
        if self.capacity != self.initial:
            self._alloc(self.initial)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class _Layer:
    """References to one decoder layer's weights and norm modules (no copies)."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.w = {
            "q_proj": attn.q_proj.weight,
            "k_proj": attn.k_proj.weight,
            "v_proj": attn.v_proj.weight,
            "o_proj": attn.o_proj.weight,
            "gate_proj": mlp.gate_proj.weight,
            "up_proj": mlp.up_proj.weight,
            "down_proj": mlp.down_proj.weight,
        }
        for name, proj in (("q_proj", attn.q_proj), ("o_proj", attn.o_proj), ("gate_proj", mlp.gate_proj)):
            if getattr(proj, "bias", None) is not None:
                raise ValueError(f"{name} has a bias: not a plain Llama layer")
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Engine:
    """Runs generation requests of many tasks in shared, continuously refilled batches.

    Thread model: ``submit`` (any thread) and ``step`` (one worker thread) may
    run concurrently; the scheduler is guarded by a lock held only for
    admission, never during a forward pass.
    """

    def __init__(
        self,
        lm: LoadedLM,
        *,
        max_rows: int = 8,
        prefill_tokens: int = 1024,
        max_context: int = 2048,
        policy: str = "wfq",
        max_lag: float = 4096.0,
        default_policy: TaskPolicy | None = None,
        kv_capacity: int = 128,
    ) -> None:
        if max_rows < 1 or prefill_tokens < 1:
            raise ValueError("max_rows and prefill_tokens must be >= 1")
        cfg = lm.config
        if getattr(cfg, "model_type", "") != "llama":
            raise ValueError(f"the engine runs Llama decoders, got model_type {getattr(cfg, 'model_type', None)!r}")
        model = lm.model
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.eos_token_id = lm.eos_token_id
        self.max_rows = max_rows
        self.max_context = min(max_context, int(cfg.max_position_embeddings))
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.scaling = self.head_dim**-0.5  # as LlamaAttention
        self.vocab_size = int(cfg.vocab_size)
        self._embed = model.model.embed_tokens.weight
        self._layers = [_Layer(layer) for layer in model.model.layers]
        self._norm = model.model.norm
        self._rotary = model.model.rotary_emb
        self._lm_head = model.lm_head.weight
        self.cache = _KVCache(len(self._layers), max_rows, self.n_kv, self.head_dim, kv_capacity)
        self.scheduler = make_scheduler(
            policy,
            cost_fn=lambda p: float(p.payload.params.max_tokens + len(p.payload.prompt_ids)),
            default_policy=default_policy,
            max_rows=max_rows,
            max_tokens=prefill_tokens,
            max_lag=max_lag,
        )
        self._budget: BatchBudget = self.scheduler.budget
        self._lock = threading.Lock()
        self.running: list[Sequence] = []  # index == KV cache row
        self.stats = EngineStats()
        self.log_error: Callable[[str], None] = lambda msg: None

    # --- requests ------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def set_policy(self, task: str, policy: TaskPolicy) -> None:
        with self._lock:
            self.scheduler.set_policy(task, policy)

    def submit(self, seq: Sequence, now: float | None = None) -> None:
        """Queue a sequence; raises QueueFull (task at its limit) or ValueError (too long)."""
        now = time.monotonic() if now is None else now
        need = len(seq.prompt_ids) + seq.params.max_tokens
        if need > self.max_context:
            raise ValueError(
                f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) exceeds the context limit of {self.max_context}"
            )
        if max(seq.prompt_ids) >= self.vocab_size or min(seq.prompt_ids) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        seq.submitted_at = now
        pending = Pending(task=seq.task, rows=1, tokens=len(seq.prompt_ids), arrival=now, deadline=seq.deadline, payload=seq)
        with self._lock:
            self.scheduler.submit(pending, now)

    def queued(self, task: str | None = None) -> int:
        with self._lock:
            return self.scheduler.queued(task)

    def has_work(self) -> bool:
        return bool(self.running) or self.queued() > 0

    def next_wakeup(self, now: float) -> float | None:
        with self._lock:
            return self.scheduler.next_wakeup(now)

    def remove_task(self, task: str, reason: str) -> int:
        """Fail a task's queued and running sequences (undeployed); how many."""
        with self._lock:
            queued = [p.payload for p in self.scheduler.remove_task(task)]
        gone = [s for s in self.running if s.task == task]
        for seq in queued:
            self._fail(seq, reason, "removed")
        for seq in gone:
            self._fail(seq, reason, "removed")
        self._compact()
        return len(queued) + len(gone)

    def fail_queued(self, reason: str, outcome: str = "shutdown") -> int:
        """Fail every sequence still waiting for admission (running ones go on)."""
        with self._lock:
            queued = [p.payload for p in self.scheduler.drain()]
        for seq in queued:
            self._fail(seq, reason, outcome)
        return len(queued)

    def abort_all(self, reason: str, outcome: str = "shutdown") -> int:
        """Fail everything queued or running (shutdown); call with the worker stopped."""
        with self._lock:
            queued = [p.payload for p in self.scheduler.drain()]
        running, self.running = self.running, []
        for seq in queued + running:
            self._fail(seq, reason, outcome)
        self.cache.reset()
        return len(queued) + len(running)

    # --- the step --------------------------------------------------------------------
    def step(self, now: float | None = None) -> StepReport | None:
        """Admit waiting sequences, run one forward, emit tokens; None if idle."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [p for p in self.scheduler.expire(now)]
            free = self.max_rows - len(self.running)
            admitted: list[Sequence] = []
            if free > 0 and self.scheduler.queued():
                self.scheduler.budget = dataclasses.replace(self._budget, max_rows=free)
                try:
                    admitted = [p.payload for p in self.scheduler.next_batch(now)]
                finally:
                    self.scheduler.budget = self._budget
        for p in expired:
            self._fail(p.payload, f"deadline exceeded: queued {1e3 * (now - p.arrival):.1f} ms", "expired")
        for seq in self.running:
            if seq.cancelled is not None and _safe_call(seq.cancelled):
                self._fail(seq, "request cancelled", "cancelled")
        self._compact()
        fresh = []
        for seq in admitted:
            if seq.cancelled is not None and _safe_call(seq.cancelled):
                self._fail(seq, "request cancelled", "cancelled")
            else:
                fresh.append(seq)
        if not self.running and not fresh:
            if not self.has_work():
                self.cache.reset()
            return None
        t0 = time.perf_counter()
        rows = self.running + fresh
        try:
            logits, padded = self._forward(rows, n_old=len(self.running))
        except Exception as exc:  # noqa: BLE001 - fail the rows of this step, keep serving
            self.log_error(traceback.format_exc())
            for seq in rows:
                self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}", "internal")
            self.running = []
            self.cache.reset()
            return None
        self.running = list(rows)  # ``rows`` stays this step's batch; ``running`` shrinks as rows finish
        finished = 0
        for i, seq in enumerate(rows):
            try:
                token = self._choose(seq, logits[i])
                self._advance(seq, token, now)
            except Exception as exc:  # noqa: BLE001 - one bad row fails alone
                self.log_error(traceback.format_exc())
                self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}", "internal")
            if seq.done:
                finished += 1
        self._compact()
        seconds = time.perf_counter() - t0
        st = self.stats
        st.steps += 1
        st.rows += len(rows)
        st.multi_row_steps += len(rows) > 1
        st.max_rows = max(st.max_rows, len(rows))
        st.admitted += len(fresh)
        st.prefill_tokens += sum(len(s.prompt_ids) for s in fresh)
        st.forward_seconds += seconds
        tokens = len(rows) - len(fresh) + sum(len(s.prompt_ids) for s in fresh)
        return StepReport(rows=len(rows), admitted=len(fresh), tokens=tokens, finished=finished, seconds=seconds, padded_tokens=padded)

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step until nothing is queued or running (tests, benchmarks); steps run."""
        n = 0
        while self.has_work() and n < max_steps:
            if self.step() is None and not self.running:
                wake = self.next_wakeup(time.monotonic())
                if wake is None:
                    break
                time.sleep(max(0.0, wake - time.monotonic()))
            n += 1
        return n

    # --- forward -----------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, rows: list[Sequence], n_old: int) -> tuple[torch.Tensor, int]:
        """One batched pass: rows[:n_old] decode one token, the rest prefill their prompts."""
        ids: list[int] = []
        pos: list[int] = []
        row_of: list[int] = []
        off_of: list[int] = []
        lens = []
        for r, seq in enumerate(rows):
            new = seq.prompt_ids if r >= n_old else [seq.generated[-1]]
            ids.extend(new)
            pos.extend(range(seq.past, seq.past + len(new)))
            row_of.extend([r] * len(new))
            off_of.extend(range(len(new)))
            lens.append(len(new))
        b, t = len(rows), len(ids)
        kv_len = [seq.past + n for seq, n in zip(rows, lens)]
        max_kv, max_n = max(kv_len), max(lens)
        self.cache.ensure(max_kv, used_rows=n_old, used_len=max((s.past for s in rows[:n_old]), default=0))
        ids_t = torch.tensor(ids, dtype=torch.long)
        pos_t = torch.tensor(pos, dtype=torch.long)
        row_t = torch.tensor(row_of, dtype=torch.long)
        off_t = torch.tensor(off_of, dtype=torch.long)
        decode_only = t == b
        keys = torch.arange(max_kv)
        if decode_only:
            mask = (keys[None, :] < torch.tensor(kv_len)[:, None])[:, None, None, :]
        else:
            last = torch.tensor(lens)[:, None] - 1
            qpos = torch.tensor([s.past for s in rows])[:, None] + torch.minimum(torch.arange(max_n)[None, :], last)
            mask = (keys[None, None, :] <= qpos[:, :, None])[:, None]
        owners = [seq.adapter for seq in rows]
        segs = Segments.of_rows(owners) if decode_only else Segments.of_tokens(owners, row_t)  # decode: token r is row r

        h = F.embedding(ids_t, self._embed)  # [t, hidden]
        cos, sin = self._rotary(h[None], pos_t[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [t, 1, head_dim]
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        for li, layer in enumerate(self._layers):
            x = layer.input_norm(h)
            q = self._proj(x, layer, li, "q_proj", segs).view(t, nh, hd)
            k = self._proj(x, layer, li, "k_proj", segs).view(t, nkv, hd)
            v = self._proj(x, layer, li, "v_proj", segs).view(t, nkv, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            ck, cv = self.cache.k[li], self.cache.v[li]
            ck[row_t, :, pos_t] = k
            cv[row_t, :, pos_t] = v
            if decode_only:
                qb = q.unsqueeze(2)  # [b, heads, 1, hd]: token r is row r
            else:
                qb = q.new_zeros(b, nh, max_n, hd)
                qb[row_t, :, off_t] = q
            o = F.scaled_dot_product_attention(
                qb, ck[:b, :, :max_kv], cv[:b, :, :max_kv], attn_mask=mask, scale=self.scaling, enable_gqa=True
            )
            o = o.squeeze(2) if decode_only else o[row_t, :, off_t]
            h = h + self._proj(o.reshape(t, nh * hd), layer, li, "o_proj", segs)
            x = layer.post_norm(h)
            gate = self._proj(x, layer, li, "gate_proj", segs)
            up = self._proj(x, layer, li, "up_proj", segs)
            h = h + self._proj(F.silu(gate) * up, layer, li, "down_proj", segs)
        last_tok = torch.tensor([sum(lens[: r + 1]) - 1 for r in range(b)], dtype=torch.long)
        hidden = self._norm(h.index_select(0, last_tok))
        logits = F.linear(hidden, self._lm_head)
        for seq, n in zip(rows, lens):
            seq.past += n
        return logits, b * max_n

    @staticmethod
    def _proj(x: torch.Tensor, layer: _Layer, li: int, name: str, segs: Segments) -> torch.Tensor:
        return linear(x, layer.w[name], None, (li, name), segs)

    # --- tokens -> text --------------------------------------------------------------------
    def _choose(self, seq: Sequence, logits: torch.Tensor) -> int:
        p = seq.params
        if p.greedy:
            return int(torch.argmax(logits))
        if seq._warpers is None:
            from transformers.generation.logits_process import (  # noqa: PLC0415
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )

            warpers: list[Any] = []  # generate's order
            if p.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(p.temperature))
            if p.top_k:
                warpers.append(TopKLogitsWarper(top_k=p.top_k))
            if p.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=p.top_p))
            seq._warpers = warpers
            seq._generator = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        scores = logits[None].float()
        for w in seq._warpers:
            scores = w(None, scores)
        probs = F.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=seq._generator)[0, 0])

    def _advance(self, seq: Sequence, token: int, now: float) -> None:
        seq.generated.append(token)
        self.stats.tokens_generated += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        p = seq.params
        reason = None
        if token == self.eos_token_id:
            reason = "stop"
        else:
            full = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            seq.text = full
            cut = min((i for i in (full.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = full[:cut]
                reason = "stop"
        if reason is None and (len(seq.generated) >= p.max_tokens or seq.past + 1 > self.max_context):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
            return
        ready = _stable_prefix(seq.text, p.stop)
        if ready > seq.emitted:
            chunk = seq.text[seq.emitted:ready]
            seq.emitted = ready
            self._emit(Update(seq, chunk))

    def _finish(self, seq: Sequence, reason: str) -> None:
        chunk = seq.text[seq.emitted:]
        seq.emitted = len(seq.text)
        seq.finish_reason = reason
        seq.outcome = "ok"
        seq.done = True
        seq.finished_at = time.monotonic()
        self.stats.finished += 1
        self._emit(Update(seq, chunk, done=True, finish_reason=reason))

    def _fail(self, seq: Sequence, message: str, outcome: str) -> None:
        if seq.done:
            return
        seq.error = message
        seq.outcome = outcome
        seq.done = True
        seq.finished_at = time.monotonic()
        self._emit(Update(seq, "", done=True, error=message, outcome=outcome))

    def _emit(self, update: Update) -> None:
        if update.seq.sink is None:
            return
        try:
            update.seq.sink(update)
        except Exception:  # noqa: BLE001 - a failing client must not stop the batch
            self.log_error(traceback.format_exc())

    def _compact(self) -> None:
        """Drop finished rows; refill each hole with the last running row."""
        rows = self.running
        i = 0
        while i < len(rows):
            if rows[i].done:
                last = len(rows) - 1
                if i != last:
                    self.cache.move(last, i, rows[last].past)
                    rows[i] = rows[last]
                rows.pop()
            else:
                i += 1


def _safe_call(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - treat a broken probe as "not cancelled"
        return False


def _stable_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent now: never a trailing partial UTF-8
    character (decoded as U+FFFD until its last byte arrives) nor a suffix
    that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text[:end].endswith(s[:k]):
                hold = k
                break
    return end - hold
