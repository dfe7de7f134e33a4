"""A host whose work is the WFQ scheduler's batches (the encoder, vision and series hosts).

The generative and multimodal LM hosts drive an engine of their own; these
hosts instead queue every accepted request as a ``Pending`` on
``self.scheduler`` and run one batch per worker turn. What that shares —
taking work (expired requests first, then a batch), the wake-up time, the
drain, failing a batch whose run raised, answering expired requests — lives
here once; a subclass supplies ``run_batch``.
"""

from __future__ import annotations

import time
from typing import Any

import triton_python_backend_utils as pb_utils

from .host import Host
from .ledger import Answer
from .scheduler import Pending


class ScheduledHost(Host):
    """``Host`` with a ``self.scheduler`` (set in ``setup``) whose payloads carry ``.answer``."""

    scheduler: Any

    def submit(self, pending: Pending, now: float) -> None:
        with self._cv:
            self.scheduler.submit(pending, now)
            self._cv.notify()

    def take_work(self, now: float) -> Any:
        expired = self.scheduler.expire(now)
        if expired:
            return ("expired", expired, now)
        batch = self.scheduler.next_batch(now)
        return ("batch", batch) if batch else None

    def next_wakeup(self, now: float) -> float | None:
        return self.scheduler.next_wakeup(now)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return self.scheduler.stats()

    def drain(self) -> list[Answer]:
        with self._cv:
            return [p.payload.answer for p in self.scheduler.drain()]

    def work_done(self, work: Any) -> None:
        if work[0] == "batch":
            self.scheduler.finished(work[1])

    def work_failed(self, work: Any, exc: Exception) -> None:
        if work[0] == "batch":
            for p in work[1]:
                self.fail(p.payload.answer, f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL, "internal")

    def run_work(self, work: Any) -> None:
        if work[0] == "expired":
            _, expired, now = work
            self.metrics.touch()
            for p in expired:
                self.fail(p.payload.answer, f"deadline exceeded: queued {1e3 * (now - p.arrival):.1f} ms", pb_utils.TritonError.UNAVAILABLE, "expired")
            return
        started = time.monotonic()
        self.metrics.queued(len(work[1]), sum(started - p.arrival for p in work[1]))
        self.run_batch(work[1])

    def run_batch(self, batch: list[Pending]) -> None:
        raise NotImplementedError
