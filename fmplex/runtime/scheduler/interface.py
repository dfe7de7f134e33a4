"""Data types and the abstract interface of the fmplex request scheduler.

The scheduler is a pure decision step: the host (the backend's worker loop)
submits requests, asks for the next batch, and fails whatever the scheduler
hands back as expired or removed. It imports nothing from Triton, torch or
numpy and never reads a clock -- every call takes ``now`` in seconds -- so
policies can be unit tested and simulated on their own.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Hashable

ROW_OVERHEAD_TOKENS = 8
"""Fixed per-row cost (tokens) in the default cost model: every row occupies a
slot of the forward pass however short it is, so tiny requests are not free."""


@dataclass
class TaskPolicy:
    """Per-task scheduling policy, set by the control plane at deploy time."""

    weight: float = 1.0  # share of the backbone relative to other tasks; > 0
    queue_limit: int = 256  # max queued requests; one more raises QueueFull
    deadline_s: float | None = None  # max queueing time (None = no limit)

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be a finite number > 0, got {self.weight!r}")
        if self.queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {self.queue_limit!r}")
        if self.deadline_s is not None and self.deadline_s < 0:
            raise ValueError(f"deadline_s must be >= 0 or None, got {self.deadline_s!r}")


@dataclass(eq=False)  # identity equality/hash: two identical requests are still two requests
class Pending:
    """One queued request. The scheduler never looks at ``payload``."""

    task: str
    rows: int  # rows (sequences) in this request, >= 1
    tokens: int  # padded length of its longest row, >= 1
    arrival: float  # submission time (seconds)
    deadline: float | None = None  # absolute time after which it is failed, not served
    batch_key: Hashable = None  # equal keys batch well together (e.g. a length bucket)
    payload: Any = None
    cost: float = 0.0  # filled at submit by the cost model when 0
    start_tag: float = 0.0  # filled by the policy at submit
    finish_tag: float = 0.0


@dataclass(frozen=True)
class BatchBudget:
    """Limits on one batch handed to the backbone.

    ``max_tokens`` bounds the *padded* volume ``rows_total * max(tokens)``,
    because the backbone pads every row of a batch to its longest row; that
    product, not the sum of true lengths, is what costs memory and time.

    ``max_lag`` (virtual-time units, i.e. cost / weight) bounds how far WFQ may
    depart from strict finish-tag order to build batches that share a
    ``batch_key``. The default 4096 is half a default batch of padded tokens
    at weight 1: a weight-1 task can be overtaken by at most that much work
    from each other task for the sake of batching. 0 = strict order.

    ``max_queue_delay_s`` lets a batch fill: ``next_batch`` returns [] while
    the oldest queued request is younger than this and the batch is not full.
    0 (default) is work-conserving.

    ``share_cap``: while several tasks have requests queued, a task may fill
    at most its weighted share of ``max_rows`` in one batch (its first
    request always fits). A flooding task then cannot stretch the batch that
    carries a light task's request to full size: the light task waits at
    most the batch in flight plus a short one. With one task queued the
    batch is filled as usual (work-conserving).

    ``saturated_rows`` lets a batch grow beyond ``max_rows`` under
    saturation, because a larger forward runs more rows per second: while
    no light task is queued (every queued task has at least its weighted
    share of ``max_rows`` waiting, or only one task is queued) and the
    queued tasks share one weight, a batch may
    take up to ``min(saturated_rows, (queued_rows + rows_in_flight) // parallel)``
    rows (never fewer than ``max_rows``), ``max_tokens`` scaling with it.
    ``parallel`` is the number of workers taking batches at once: a worker
    takes its share of all the rows in the system, so growth never leaves an
    idle worker without work, and a worker whose peers are busy with large
    batches is not held to half of what waits (rows in flight are those
    dispatched and not yet reported back through ``finished``). Unequal
    weights keep ``max_rows`` batches because such a batch holds about
    everything queued: each task would be served as fast as its clients
    send, and weights would no longer decide anything (with three tasks of
    32 closed-loop clients at weights 1:2:4, the shares served were 31/34/34%).
    The moment a light task queues, batches are back
    to ``max_rows`` with share caps. The cost, bounded: a light request that
    arrives while saturated batches run waits for at most the batches in
    flight (one of at most ``saturated_rows`` rows per worker) plus one of
    at most ``max_rows``. ``saturated_rows <= max_rows`` (default 0) turns
    growth off.

    ``light_window_s``: a closed-loop light client has nothing queued between
    its requests, so "no light task is queued" alone would let batches grow
    in those gaps and its next request wait behind them. A task that is not
    queued now, was served within the last ``light_window_s`` seconds and
    took fewer rows than its weighted share in its last batch counts as a
    light task waiting: batches stay at ``max_rows`` until it has been quiet
    for the window. A heavy task whose whole queue rode one batch took at
    least its share, so it does not stop growth.
    """

    max_rows: int = 64
    max_tokens: int = 8192
    max_lag: float = 4096.0
    max_queue_delay_s: float = 0.0
    share_cap: bool = True
    saturated_rows: int = 0
    parallel: int = 1
    light_window_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_tokens < 1:
            raise ValueError("max_rows and max_tokens must be >= 1")
        if self.max_lag < 0 or self.max_queue_delay_s < 0:
            raise ValueError("max_lag and max_queue_delay_s must be >= 0")
        if self.saturated_rows < 0 or self.parallel < 1:
            raise ValueError("saturated_rows must be >= 0 and parallel >= 1")
        if not self.light_window_s >= 0:
            raise ValueError("light_window_s must be >= 0")

    def limits(self, rows_in_system: int, light_waiting: bool) -> tuple[int, int]:
        """(rows, padded tokens) one batch may take now (see ``saturated_rows``);
        ``rows_in_system``: queued plus in flight."""
        if light_waiting or self.saturated_rows <= self.max_rows:
            return self.max_rows, self.max_tokens
        rows = min(self.saturated_rows, max(self.max_rows, rows_in_system // self.parallel))
        return rows, self.max_tokens * rows // self.max_rows


class QueueFull(Exception):
    """Raised by ``submit`` at once, so the client gets back-pressure instead of
    an unbounded wait."""

    def __init__(self, task: str, limit: int) -> None:
        super().__init__(f"task '{task}' queue is full ({limit} requests queued)")
        self.task = task
        self.limit = limit


CostFn = Callable[[Pending], float]


def default_cost(req: Pending) -> float:
    """Backbone work of a request: its padded tokens plus a fixed per-row cost."""
    return float(req.rows * (req.tokens + ROW_OVERHEAD_TOKENS))


class Scheduler(ABC):
    """What the host needs from a scheduling policy; every call takes ``now``.

    The host loop is: ``submit`` on arrival (answer QueueFull/ValueError at
    once); then repeatedly fail ``expire(now)``, run ``next_batch(now)`` and
    report it back with ``finished(batch)``, and when that is empty sleep
    until ``next_wakeup(now)`` or the next submit.
    """

    budget: BatchBudget

    @abstractmethod
    def set_policy(self, task: str, policy: TaskPolicy) -> None:
        """Create or update a task's policy; applies to requests submitted after."""

    @abstractmethod
    def submit(self, req: Pending, now: float) -> None:
        """Queue ``req``; raise QueueFull if its task is at ``queue_limit``."""

    @abstractmethod
    def next_batch(self, now: float) -> list[Pending]:
        """Remove and return the next batch ([] if none should run now)."""

    @abstractmethod
    def finished(self, batch: list[Pending]) -> None:
        """A batch from ``next_batch`` has run (answered or failed): its rows
        are no longer in flight. Only batch growth reads this."""

    @abstractmethod
    def expire(self, now: float) -> list[Pending]:
        """Remove and return the queued requests whose deadline is <= now."""

    @abstractmethod
    def next_wakeup(self, now: float) -> float | None:
        """Earliest time (>= now) something changes by itself; None = never."""

    @abstractmethod
    def remove_task(self, task: str) -> list[Pending]:
        """Forget a task (undeploy) and return its queued requests."""

    @abstractmethod
    def drain(self) -> list[Pending]:
        """Remove and return everything still owed an answer (shutdown)."""

    @abstractmethod
    def queued(self, task: str | None = None) -> int:
        """Queued requests of ``task``, or of all tasks."""

    @abstractmethod
    def stats(self) -> dict[str, dict]:
        """``{"tasks": {name: counters}, "global": counters}``."""
