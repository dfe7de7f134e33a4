"""Bookkeeping shared by the queueing policies.

Per-task FIFO queues, admission, deadlines, removal and stats live here, so
that WFQ and the FIFO baseline differ only in how they tag a request
(``_stamp``) and which queue heads they pack into a batch (``_select``), and
can be compared on equal terms.
"""
from __future__ import annotations

import heapq
import itertools
from abc import abstractmethod
from collections import deque

from .interface import BatchBudget, CostFn, Pending, QueueFull, Scheduler, TaskPolicy, default_cost


class TaskState:
    """One task's queue, tag state and counters."""

    __slots__ = ("name", "policy", "order", "queue", "last_finish", "served_tag",
                 "submitted", "served_requests", "served_rows", "served_cost",
                 "rejected_full", "expired", "removed", "last_served", "last_rows")

    def __init__(self, name: str, policy: TaskPolicy, order: int) -> None:
        self.name, self.policy, self.order = name, policy, order  # order breaks tag ties
        self.queue: deque[Pending] = deque()
        self.last_finish = 0.0  # finish tag of the newest submitted request
        self.served_tag = 0.0  # finish tag of the newest dispatched request
        self.submitted = self.served_requests = self.served_rows = 0
        self.rejected_full = self.expired = self.removed = 0
        self.served_cost = 0.0
        self.last_served = float("-inf")  # when its newest request was dispatched
        self.last_rows = 0  # rows it took in that batch


class Packer:
    """Greedy batch builder enforcing a BatchBudget on padded volume.

    An empty batch accepts any request, so one that alone exceeds the budget
    is served alone instead of starving; nothing is added after it.
    """

    __slots__ = ("max_rows", "max_tokens", "rows", "width", "items", "full", "done")

    def __init__(self, budget: BatchBudget, limits: tuple[int, int] | None = None) -> None:
        self.max_rows, self.max_tokens = limits or (budget.max_rows, budget.max_tokens)
        self.rows = self.width = 0
        self.items: list[Pending] = []
        self.full = False  # something was refused, or the budget is used up
        self.done = False  # nothing more can be added

    def offer(self, req: Pending) -> bool:
        rows, width = self.rows + req.rows, max(self.width, req.tokens)
        fits = rows <= self.max_rows and rows * width <= self.max_tokens
        if not fits and self.items:
            self.full = True
            return False
        self.rows, self.width = rows, width
        self.items.append(req)
        if not fits or rows >= self.max_rows or rows * width >= self.max_tokens:
            self.full = self.done = True  # any further row would break the budget
        return True


class QueueingScheduler(Scheduler):
    """Scheduler skeleton; subclasses supply the tagging and packing policy."""

    def __init__(self, budget: BatchBudget | None = None, cost_fn: CostFn | None = None,
                 default_policy: TaskPolicy | None = None) -> None:
        self.budget = budget or BatchBudget()
        self._cost_fn = cost_fn or default_cost
        self._default_policy = default_policy or TaskPolicy()
        self._tasks: dict[str, TaskState] = {}
        self._seq = itertools.count()
        self._queued = 0
        self._queued_rows = 0
        self._inflight_rows = 0  # dispatched, not yet finished (batch growth)
        self._batches = 0
        self.batch_rows: dict[int, int] = {}  # batches dispatched, by rows
        # Deadline heap with lazy deletion: entries whose request is no longer
        # in ``_timed`` (dispatched or removed) are skipped when popped.
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._timed: set[Pending] = set()
        # Requests expired inside next_batch, kept for the next expire() call
        # so the host still answers each of them.
        self._expired: list[Pending] = []
        self._now = 0.0  # the time of the next_batch call in progress

    # -- policy hooks ------------------------------------------------------
    @abstractmethod
    def _stamp(self, task: TaskState, req: Pending) -> None:
        """Set ``req``'s start/finish tags at submit."""

    @abstractmethod
    def _select(self, tasks: list[TaskState]) -> Packer:
        """Pack queue heads of the non-empty ``tasks`` (per-task FIFO kept)."""

    @property
    @abstractmethod
    def virtual_time(self) -> float:
        """The policy's notion of progress, for stats."""

    def _on_dispatch(self, batch: list[Pending]) -> None:
        """Called after a batch left the queues."""

    def _on_task_emptied(self, task: TaskState) -> None:
        """Called when a task's queue empties without being served (expire/drain)."""

    def _on_idle(self) -> None:
        """Called when the last queued request left the system."""

    # -- Scheduler API -----------------------------------------------------
    def _task(self, name: str) -> TaskState:
        task = self._tasks.get(name)
        if task is None:  # auto-create: a request for an unknown task gets defaults
            task = self._tasks[name] = TaskState(name, self._default_policy, next(self._seq))
        return task

    def set_policy(self, task: str, policy: TaskPolicy) -> None:
        """Already-queued requests keep the tags and deadline they got at submit."""
        self._task(task).policy = policy

    def submit(self, req: Pending, now: float) -> None:
        if req.rows < 1 or req.tokens < 1:
            raise ValueError(f"request for task '{req.task}' needs rows >= 1 and tokens >= 1, "
                             f"got rows={req.rows} tokens={req.tokens}")
        if not req.cost:
            req.cost = float(self._cost_fn(req))
        if not req.cost > 0:  # a free request would let a task take the backbone
            raise ValueError(f"request cost must be > 0, got {req.cost!r}")
        task = self._task(req.task)
        if len(task.queue) >= task.policy.queue_limit:
            task.rejected_full += 1
            raise QueueFull(req.task, task.policy.queue_limit)
        self._stamp(task, req)
        task.queue.append(req)
        task.submitted += 1
        self._queued += 1
        self._queued_rows += req.rows
        deadline, limit_s = req.deadline, task.policy.deadline_s
        if limit_s is not None:
            deadline = min(req.arrival + limit_s, deadline if deadline is not None else float("inf"))
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), req))
            self._timed.add(req)
            if len(self._deadlines) > 2 * len(self._timed) + 64:  # drop stale entries
                self._deadlines = [e for e in self._deadlines if e[2] in self._timed]
                heapq.heapify(self._deadlines)

    def next_batch(self, now: float) -> list[Pending]:
        self._collect_expired(now)  # an expired request is never served
        if not self._queued:
            return []
        self._now = now
        packer = self._select([t for t in self._tasks.values() if t.queue])
        delay = self.budget.max_queue_delay_s
        if delay > 0 and not packer.full and now < self._oldest_arrival() + delay:
            return []
        batch = packer.items
        for req in batch:  # picks are queue heads in per-task FIFO order
            task = self._tasks[req.task]
            task.queue.popleft()
            task.served_requests += 1
            task.served_rows += req.rows
            task.served_cost += req.cost
            task.served_tag = req.finish_tag
            if task.last_served != now:
                task.last_served, task.last_rows = now, 0
            task.last_rows += req.rows
            self._timed.discard(req)
        self._queued -= len(batch)
        rows = sum(r.rows for r in batch)
        self._queued_rows -= rows
        self._inflight_rows += rows
        self.batch_rows[rows] = self.batch_rows.get(rows, 0) + 1
        self._batches += 1
        self._on_dispatch(batch)
        if not self._queued:
            self._on_idle()
        return batch

    def finished(self, batch: list[Pending]) -> None:
        self._inflight_rows = max(0, self._inflight_rows - sum(r.rows for r in batch))

    def expire(self, now: float) -> list[Pending]:
        self._collect_expired(now)
        out, self._expired = self._expired, []
        return out

    def next_wakeup(self, now: float) -> float | None:
        """Assumes the host just ran ``next_batch``; times past are clamped to now."""
        if self._expired:
            return now
        heap = self._deadlines
        while heap and heap[0][2] not in self._timed:
            heapq.heappop(heap)
        wake = heap[0][0] if heap else None
        if self.budget.max_queue_delay_s > 0 and self._queued:
            fill = self._oldest_arrival() + self.budget.max_queue_delay_s
            wake = fill if wake is None else min(wake, fill)
        return None if wake is None else max(wake, now)

    def remove_task(self, task: str) -> list[Pending]:
        """Forget the task entirely (policy and counters too); unknown -> []."""
        state = self._tasks.pop(task, None)
        if state is None or not state.queue:
            return []
        out = list(state.queue)
        self._timed.difference_update(out)
        self._queued -= len(out)
        self._queued_rows -= sum(r.rows for r in out)
        if not self._queued:
            self._on_idle()
        return out

    def drain(self) -> list[Pending]:
        """Everything queued, plus expired requests not yet handed out by expire()."""
        out, self._expired = self._expired, []
        for task in self._tasks.values():
            if task.queue:
                task.removed += len(task.queue)
                out.extend(task.queue)
                task.queue.clear()
                self._on_task_emptied(task)
        self._deadlines.clear()
        self._timed.clear()
        self._queued_rows = 0
        if self._queued:
            self._queued = 0
            self._on_idle()
        return out

    def queued(self, task: str | None = None) -> int:
        if task is None:
            return self._queued
        state = self._tasks.get(task)
        return len(state.queue) if state else 0

    def stats(self) -> dict[str, dict]:
        """Per task: submitted == served_requests + expired + removed + queued
        (rejected_full are not submitted; remove_task drops a task's counters)."""
        tasks = {t.name: {"queued": len(t.queue), "submitted": t.submitted,
                          "served_requests": t.served_requests, "served_rows": t.served_rows,
                          "served_cost": t.served_cost, "rejected_full": t.rejected_full,
                          "expired": t.expired, "removed": t.removed, "weight": t.policy.weight}
                 for t in self._tasks.values()}
        return {"tasks": tasks, "global": {"batches": self._batches, "queued": self._queued,
                                           "queued_rows": self._queued_rows,
                                           "inflight_rows": self._inflight_rows,
                                           "virtual_time": self.virtual_time}}

    # -- helpers -----------------------------------------------------------
    def _shares(self, tasks: list[TaskState]) -> list[int]:
        """Each queued task's weighted share of a ``max_rows`` batch (>= 1 row)."""
        total = sum(t.policy.weight for t in tasks)
        return [max(1, int(self.budget.max_rows * t.policy.weight / total)) for t in tasks]

    def _light_waiting(self, tasks: list[TaskState], shares: list[int]) -> bool:
        """A queued task has fewer rows waiting than its share: it must not
        wait behind full-size batches of the others."""
        return len(tasks) > 1 and any(sum(r.rows for r in t.queue) < share for t, share in zip(tasks, shares))

    def _recently_light(self, tasks: list[TaskState]) -> bool:
        """A task not queued now that was served within ``light_window_s`` and
        took less than its share then: a closed-loop light client between
        two requests (see BatchBudget)."""
        since = self._now - self.budget.light_window_s
        queued = {t.name for t in tasks}
        weights = sum(t.policy.weight for t in tasks)
        for t in self._tasks.values():
            if t.name in queued or t.last_served < since:
                continue
            share = max(1, int(self.budget.max_rows * t.policy.weight / (weights + t.policy.weight)))
            if t.last_rows < share:
                return True
        return False

    def _packer(self, tasks: list[TaskState], light: bool | None = None) -> Packer:
        """An empty batch with this moment's limits (grown under saturation)."""
        if light is None:
            light = self._light_waiting(tasks, self._shares(tasks))
        if not light and self.budget.saturated_rows > self.budget.max_rows:
            # Queued tasks of unequal weights keep max_rows batches: a grown
            # batch holds about everything queued (each worker takes its share
            # of the rows in the host), so each task would be served as fast as
            # its clients send and weights would stop deciding anything.
            light = len({t.policy.weight for t in tasks}) > 1 or self._recently_light(tasks)
        return Packer(self.budget, self.budget.limits(self._queued_rows + self._inflight_rows, light))

    def _oldest_arrival(self) -> float:
        return min(t.queue[0].arrival for t in self._tasks.values() if t.queue)

    def _collect_expired(self, now: float) -> None:
        heap, hit = self._deadlines, []
        while heap and heap[0][0] <= now:
            req = heapq.heappop(heap)[2]
            if req in self._timed:
                self._timed.remove(req)
                hit.append(req)
        if not hit:
            return
        dead = set(hit)
        for name in dict.fromkeys(r.task for r in hit):
            task = self._tasks[name]
            before = len(task.queue)
            task.queue = deque(r for r in task.queue if r not in dead)
            task.expired += before - len(task.queue)
            if not task.queue:
                self._on_task_emptied(task)
        self._queued -= len(hit)
        self._queued_rows -= sum(r.rows for r in hit)
        self._expired.extend(hit)
        if not self._queued:
            self._on_idle()
