"""Batch-aware weighted fair queueing (start-time fair queueing, SFQ).

Why SFQ: each task gets a share of the backbone proportional to its weight
whatever its request rate or sizes, a task that goes idle cannot bank credit,
and a newly active task is served at once -- with O(log tasks) work per
request and no knowledge of service times in advance.

Tags. On submit ``S = max(V, last_finish[task])`` and ``F = S + cost/weight``.
``V`` (virtual time) is the largest start tag dispatched so far; when the
system empties it jumps to the largest finish tag dispatched, so an idle
task's next request starts at the current ``V`` and gets no burst.

Batching. Candidates are the per-task queue heads (FIFO within a task),
merged by finish tag. Let ``F_min`` be the smallest head finish tag and
``key`` its request's ``batch_key``.
  1. Preference pass: take requests of ``key`` with ``F <= F_min + max_lag``
     in finish-tag order while the budget allows.
  2. Work-conserving pass: fill the rest in finish-tag order, any key.
A request that does not fit removes its task from this batch (so per-task
FIFO holds) while other tasks keep filling.

Fairness given up for batching. Plain SFQ guarantees, over any interval in
which tasks i and j are both backlogged,
``|W_i/w_i - W_j/w_j| <= c_i/w_i + c_j/w_j`` (W: served cost, c: largest
request cost). Pass 1 only lets a request overtake ones whose finish tags are
smaller by at most ``max_lag``, and pass 2 only lets smaller requests use room
a blocked head could not use in this batch; so the bound loosens by at most
``max_lag`` of virtual time plus one batch of service. ``max_lag = 0`` is
strict finish-tag order. Weight changes (``set_policy``) apply to requests
submitted afterwards; queued requests keep their tags.
"""
from __future__ import annotations

import heapq
from typing import Hashable

from .base import Packer, QueueingScheduler, TaskState
from .interface import BatchBudget, CostFn, Pending, TaskPolicy


class WFQScheduler(QueueingScheduler):
    """Batch-aware start-time fair queueing over per-task FIFO queues."""

    def __init__(self, budget: BatchBudget | None = None, cost_fn: CostFn | None = None,
                 default_policy: TaskPolicy | None = None) -> None:
        super().__init__(budget, cost_fn, default_policy)
        self._v = 0.0
        self._max_finish = 0.0  # largest finish tag ever dispatched

    @property
    def virtual_time(self) -> float:
        return self._v

    def _stamp(self, task: TaskState, req: Pending) -> None:
        req.start_tag = max(self._v, task.last_finish)
        req.finish_tag = task.last_finish = req.start_tag + req.cost / task.policy.weight

    def _select(self, tasks: list[TaskState]) -> Packer:
        caps = self._caps(tasks)
        packer = self._packer(tasks, light=caps is not None if self.budget.share_cap else None)
        nxt = [0] * len(tasks)  # per task: index of its first request not yet taken
        blocked = [False] * len(tasks)
        first = min(tasks, key=lambda t: (t.queue[0].finish_tag, t.order))
        limit = first.queue[0].finish_tag + self.budget.max_lag
        taken = [0] * len(tasks)
        self._merge(tasks, nxt, blocked, packer, limit, first.queue[0].batch_key, True, caps, taken)
        self._merge(tasks, nxt, blocked, packer, float("inf"), None, False, caps, taken)
        return packer

    def _caps(self, tasks: list[TaskState]) -> list[int] | None:
        """Rows each queued task may take in this batch (None: no caps).

        Caps apply only while some queued task is *light* (it queues fewer
        rows than its weighted share of a batch): then the batch carrying
        its request is not stretched to full size by the heavy ones, which
        get their share each. When every queued task could fill its share
        (saturation) nothing is capped, so fair shares of cost are exactly
        those of plain WFQ.
        """
        if not self.budget.share_cap or len(tasks) < 2:
            return None
        caps = self._shares(tasks)
        return caps if self._light_waiting(tasks, caps) else None

    @staticmethod
    def _merge(tasks: list[TaskState], nxt: list[int], blocked: list[bool], packer: Packer,
               limit: float, key: Hashable, match_key: bool, caps: list[int] | None = None,
               taken: list[int] | None = None) -> None:
        """Offer untaken heads in finish-tag order up to ``limit`` (and ``key``)."""
        heap = [(t.queue[nxt[i]].finish_tag, t.order, i) for i, t in enumerate(tasks)
                if not blocked[i] and nxt[i] < len(t.queue)]
        heapq.heapify(heap)
        while heap and not packer.done and heap[0][0] <= limit:
            _, order, i = heapq.heappop(heap)
            queue = tasks[i].queue
            req = queue[nxt[i]]
            if match_key and req.batch_key != key:
                continue  # this task sits out the preference pass only
            if caps is not None and taken is not None and taken[i] and taken[i] + req.rows > caps[i]:
                blocked[i] = True  # its share of this batch is used up
                packer.full = True
                continue
            if not packer.offer(req):
                blocked[i] = True  # nothing behind it may pass it; skip it in pass 2 too
                continue
            nxt[i] += 1
            if taken is not None:
                taken[i] += req.rows
            if nxt[i] < len(queue):
                heapq.heappush(heap, (queue[nxt[i]].finish_tag, order, i))

    def _on_dispatch(self, batch: list[Pending]) -> None:
        self._v = max(self._v, max(r.start_tag for r in batch))
        self._max_finish = max(self._max_finish, max(r.finish_tag for r in batch))

    def _on_task_emptied(self, task: TaskState) -> None:
        # Expired/drained work was never served: do not charge the task for it.
        task.last_finish = task.served_tag

    def _on_idle(self) -> None:
        self._v = max(self._v, self._max_finish)
