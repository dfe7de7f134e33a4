"""The part of a host whose work is one continuous-batching :class:`Engine`.

The SmolLM2 host and the multimodal LM stage both hand their requests to an
engine and let the runtime's worker loop run its steps; what that takes
(the worker hooks, the engine's metrics, per-task policies from the
registry) is written once here. Each host still decodes its own requests
and answers its own updates.
"""

from __future__ import annotations

from typing import Any, Iterable

import triton_python_backend_utils as pb_utils

from fmplex.registry import TaskEntry
from fmplex.runtime.host import Host
from fmplex.runtime.scheduler import TaskPolicy

from .engine_metrics import EngineMetrics


def task_policy(entry: TaskEntry) -> TaskPolicy:
    """A deployed task's weight, queue limit and deadline, as the engine's admission uses them."""
    return TaskPolicy(
        weight=entry.weight,
        queue_limit=entry.queue_limit,
        deadline_s=entry.deadline_ms / 1000.0 if entry.deadline_ms else None,
    )


class EngineHost(Host):
    """A :class:`Host` whose unit of work is the engine's next step."""

    engine: Any  # fmplex.generative.engine.Engine

    def start_engine(self, engine: Any) -> None:
        """Adopt ``engine`` (in ``setup``): its errors go to Triton's log, its counters to the metrics."""
        self.engine = engine
        engine.log_error = lambda msg: pb_utils.Logger.log_error(f"fmplex {self.name}: {msg}")
        self._engine_metrics = EngineMetrics(self.metrics, engine)

    def set_policies(self, entries: Iterable[TaskEntry]) -> None:
        for entry in entries:
            self.engine.set_policy(entry.name, task_policy(entry))

    def take_work(self, now: float) -> Any:
        return self.engine if self.engine.has_work() else None

    def next_wakeup(self, now: float) -> float | None:
        return self.engine.next_wakeup(now)

    def run_work(self, work: Any) -> None:
        report = self.engine.step()
        if report is not None:
            self.metrics.batch(report)

    def work_failed(self, work: Any, exc: Exception) -> None:
        pb_utils.Logger.log_error(f"fmplex {self.name}: step failed: {type(exc).__name__}: {exc}")

    def fail_sequence(self, answer: Any, update: Any) -> None:
        """A sequence the engine ended with an error: its one final response, coded by outcome."""
        codes = pb_utils.TritonError
        code = {
            "expired": codes.UNAVAILABLE,
            "shutdown": codes.UNAVAILABLE,
            "removed": codes.UNAVAILABLE,
            "cancelled": codes.CANCELLED,
        }.get(update.outcome, codes.INTERNAL)
        self.fail(answer, update.error, code, update.outcome)

    def publish(self) -> None:
        """The engine's steps, rows per step and tokens (``fmplex_gen_*``, the same on every engine host)."""
        self._engine_metrics.publish()
