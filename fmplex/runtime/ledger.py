"""The response ledger: exactly one final response per accepted request.

Every response a host sends goes through here. The ledger

* marks a request answered the moment its final response is decided (under
  a lock, whatever thread decides it: a worker, ``execute()``, a BLS
  callback, the drain at shutdown) and suppresses any later one, counting it
  as ``duplicate_suppressed`` (a number that must stay 0);
* counts every final response per task and outcome (``ok``, ``invalid``,
  ``queue_full``, ``expired``, ``shutdown`` ...), published by the host as
  ``fmplex_task_responses_total{task,outcome}``;
* hands the actual ``send`` to one **response-sender thread**. A send is an
  IPC round trip to the Triton server; done by the worker it kept the worker
  from its next batch. Responses go out in the order they were decided (one
  FIFO), so a stream's partial responses always precede its final one.

:meth:`close` (the drain at finalize) sends everything queued before it
returns, so a host never unloads with an answer still in the queue; a
response decided after close is sent inline.

Pure Python: the final flag and the sender objects come from the caller, so
the ledger is unit-tested without Triton.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

SEND_FAILED = "send_failed"
DUPLICATE = "duplicate_suppressed"


class Answer:
    """One request's response channel and whether its final response is decided."""

    __slots__ = ("sender", "task", "answered")

    def __init__(self, sender: Any, task: str = "-") -> None:
        self.sender = sender
        self.task = task  # "-" until the request's slot is resolved
        self.answered = False


class ResponseLedger:
    def __init__(self, final_flag: int, threaded: bool = True,
                 on_send_error: Callable[[str, Exception], None] | None = None,
                 on_count: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.final_flag = final_flag
        self.on_send_error = on_send_error or (lambda _task, _exc: None)
        self.on_count = on_count or (lambda: None)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._queue: queue.SimpleQueue[tuple[Answer, Any, int, float] | None] = queue.SimpleQueue()
        # sends so far and the seconds from each response's decision to its send's return (the sender
        # thread's queue, then the IPC round trip to the server): a replica's time after its batch
        self.sends = 0
        self.send_seconds = 0.0
        self._closed = not threaded
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._send_loop, name="fmplex-responses", daemon=True)
            self._thread.start()

    # --- deciding responses ------------------------------------------------------
    def final(self, answer: Answer, response: Any, outcome: str) -> bool:
        """Decide ``answer``'s final response; False (and counted) if it had one."""
        with self._lock:
            if answer.answered:
                self._count(answer.task, DUPLICATE)
                return False
            answer.answered = True
            self._count(answer.task, outcome)
            inline = self._closed
            if not inline:
                self._queue.put((answer, response, self.final_flag, time.monotonic()))
        if inline:
            self._send(answer, response, self.final_flag)
        self.on_count()
        return True

    def partial(self, answer: Answer, response: Any) -> bool:
        """A streamed, non-final response; False (and counted) after the final one."""
        with self._lock:
            if answer.answered:
                self._count(answer.task, DUPLICATE)
                return False
            inline = self._closed
            if not inline:
                self._queue.put((answer, response, 0, time.monotonic()))
        if inline:
            self._send(answer, response, 0)
        return True

    def counts(self) -> dict[tuple[str, str], int]:
        """Final responses so far, per (task, outcome), suppressed ones included."""
        with self._lock:
            return dict(self._counts)

    def close(self, timeout: float = 30.0) -> bool:
        """Send everything queued, stop the thread; later responses go inline.
        True if the queue was flushed within ``timeout``."""
        with self._lock:
            if self._closed:
                return True
            self._closed = True
            self._queue.put(None)
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- sending -----------------------------------------------------------------
    def _count(self, task: str, outcome: str) -> None:
        key = (task, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            answer, response, flags, decided = item
            self._send(answer, response, flags)
            self.sends += 1  # only this thread writes them; readers see a total at most one send old
            self.send_seconds += time.monotonic() - decided

    def _send(self, answer: Answer, response: Any, flags: int) -> None:
        try:
            answer.sender.send(response, flags=flags)
        except Exception as exc:  # noqa: BLE001 - e.g. the client went away
            if flags == self.final_flag:
                with self._lock:
                    self._count(answer.task, SEND_FAILED)
            self.on_send_error(answer.task, exc)
