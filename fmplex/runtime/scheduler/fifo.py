"""Global FIFO baseline: one arrival order over all tasks, weights ignored.

Same budget, admission, deadline and delay rules as WFQ, so simulations
compare only the ordering policy. Strictly FIFO: a request that does not fit
ends the batch (nothing overtakes it), which is the head-of-line blocking a
plain queue has.
"""
from __future__ import annotations

import heapq
import itertools

from .base import Packer, QueueingScheduler, TaskState
from .interface import BatchBudget, CostFn, Pending, TaskPolicy


class FIFOScheduler(QueueingScheduler):
    """Serves requests in submission order across all tasks."""

    def __init__(self, budget: BatchBudget | None = None, cost_fn: CostFn | None = None,
                 default_policy: TaskPolicy | None = None) -> None:
        super().__init__(budget, cost_fn, default_policy)
        self._counter = itertools.count(1)
        self._last = 0.0

    @property
    def virtual_time(self) -> float:
        """Submission number of the newest dispatched request."""
        return self._last

    def _stamp(self, task: TaskState, req: Pending) -> None:
        req.start_tag = req.finish_tag = float(next(self._counter))

    def _select(self, tasks: list[TaskState]) -> Packer:
        packer = self._packer(tasks)
        nxt = [0] * len(tasks)
        heap = [(t.queue[0].finish_tag, i) for i, t in enumerate(tasks)]
        heapq.heapify(heap)
        while heap and not packer.done:
            _, i = heap[0]
            queue = tasks[i].queue
            if not packer.offer(queue[nxt[i]]):
                break
            nxt[i] += 1
            if nxt[i] < len(queue):
                heapq.heapreplace(heap, (queue[nxt[i]].finish_tag, i))
            else:
                heapq.heappop(heap)
        return packer

    def _on_dispatch(self, batch: list[Pending]) -> None:
        self._last = batch[-1].finish_tag
