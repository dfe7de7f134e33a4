"""Continuous-batching decode engine for decoder backbones (no Triton imports).

Iteration-level batching (Orca, vLLM): the unit of work is one *step* -- one
batched forward pass that (1) prefills the sequences admitted at this step
and (2) advances every running sequence by one token. Sequences join between
steps as soon as the running batch has room and leave as soon as they are
done, so a short answer never waits for a long one and a new request never
waits for the whole batch to finish.

Admission is the fair scheduler's job: waiting requests sit in weighted-fair
queues (``fmplex.runtime.scheduler``, cost = prompt + max new tokens), and
between steps the engine asks it for as many as the batch has free rows,
within a prefill token budget (rows x padded prompt length) that bounds how
long a step with prefills can stall the running rows. Deadlines expire queued
sequences; a cancelled request leaves at the next step.

This module is the step loop; its parts live beside it: ``sequence`` (a
request and its state), ``forward`` (the model step and ``kv_cache``),
``sampler`` (the next token), ``detokenizer`` (ids -> text, stop strings).
The SmolLM2 host and the multimodal LM stage host both run it; a backbone
brings its :class:`~fmplex.generative.forward.Forward`, tokenizer and EOS id.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from typing import Any, Callable

from fmplex.runtime.scheduler import BatchBudget, Pending, QueueFull, TaskPolicy, make_scheduler

from .detokenizer import Detokenizer, first_stop, stable_prefix
from .forward import Forward, LlamaForward
from .sampler import choose
from .sequence import EngineStats, SamplingParams, Sequence, StepReport, Update

__all__ = ["Engine", "Forward", "QueueFull", "SamplingParams", "Sequence", "StepReport", "Update"]


class Engine:
    """Runs generation requests of many tasks in shared, continuously refilled batches.

    Thread model: ``submit`` (any thread) and ``step`` (one worker thread) may
    run concurrently; the scheduler is guarded by a lock held only for
    admission, never during a forward pass.
    """

    def __init__(
        self,
        lm: Any = None,
        *,
        forward: Forward | None = None,
        tokenizer: Any = None,
        eos_token_id: int | None = None,
        max_rows: int = 8,
        prefill_tokens: int = 1024,
        max_context: int = 2048,
        policy: str = "wfq",
        max_lag: float = 4096.0,
        default_policy: TaskPolicy | None = None,
        kv_capacity: int = 128,
    ) -> None:
        """``lm``: a loaded ``LlamaForCausalLM`` with its tokenizer (``fmplex.generative.smollm.LoadedLM``);
        or, for another backbone, its ``forward``, ``tokenizer`` (``decode(ids, skip_special_tokens=True)``)
        and ``eos_token_id``."""
        if max_rows < 1 or prefill_tokens < 1:
            raise ValueError("max_rows and prefill_tokens must be >= 1")
        if forward is None:
            forward = LlamaForward.of_causal_lm(lm.model, max_rows=max_rows, kv_capacity=kv_capacity)
            tokenizer = lm.tokenizer if tokenizer is None else tokenizer
            eos_token_id = lm.eos_token_id if eos_token_id is None else eos_token_id
        if tokenizer is None:
            raise ValueError("an engine needs a tokenizer")
        self.lm = lm
        self.forward = forward
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_rows = max_rows
        self.max_context = min(max_context, forward.max_positions)
        self.vocab_size = forward.vocab_size
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

    @property
    def cache(self) -> Any:
        """The forward's KV cache (None for a forward that keeps its state per sequence)."""
        return self.forward.cache

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
        self.forward.reset()
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
                self.forward.reset()
            return None
        t0 = time.perf_counter()
        rows = self.running + fresh
        try:
            for seq in fresh:
                seq.admitted_at = now
            logits, padded = self.forward(rows, n_old=len(self.running))
        except Exception as exc:  # noqa: BLE001 - fail the rows of this step, keep serving
            self.log_error(traceback.format_exc())
            for seq in rows:
                self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}", "internal")
            self.running = []
            self.forward.reset()
            return None
        self.running = list(rows)  # ``rows`` stays this step's batch; ``running`` shrinks as rows finish
        finished = 0
        for i, seq in enumerate(rows):
            try:
                token = choose(seq, logits[i])
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

    # --- tokens -> text --------------------------------------------------------------------
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
            if seq.detokenizer is None:
                seq.detokenizer = Detokenizer(self.tokenizer)
            searched = seq.detokenizer.stable_length  # no stop string lies wholly before this
            full = seq.detokenizer.add(token)
            seq.text = full
            cut = first_stop(full, p.stop, searched) if p.stop else -1
            if cut >= 0:
                seq.text = full[:cut]
                reason = "stop"
        if reason is None and (len(seq.generated) >= p.max_tokens or seq.past + 1 > self.max_context):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
            return
        ready = stable_prefix(seq.text, p.stop)
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
                self.forward.release(rows[i])
                if i != last:
                    self.forward.move(last, i, rows[last])
                    rows[i] = rows[last]
                rows.pop()
            else:
                i += 1


def _safe_call(fn: Callable[[], bool]) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - treat a broken probe as "not cancelled"
        return False
