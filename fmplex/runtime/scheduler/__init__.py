"""Request scheduler of the shared-backbone host: which queued requests of
which tasks form the next batch. Pure Python, clock-free (every call takes
``now``), so it can be unit tested and simulated without Triton or a GPU.
"""
from __future__ import annotations

from .fifo import FIFOScheduler
from .interface import (ROW_OVERHEAD_TOKENS, BatchBudget, CostFn, Pending, QueueFull, Scheduler,
                        TaskPolicy, default_cost)
from .wfq import WFQScheduler

POLICIES: dict[str, type[Scheduler]] = {"wfq": WFQScheduler, "fifo": FIFOScheduler}

__all__ = ["BatchBudget", "CostFn", "FIFOScheduler", "POLICIES", "Pending", "QueueFull",
           "ROW_OVERHEAD_TOKENS", "Scheduler", "TaskPolicy", "WFQScheduler", "default_cost",
           "make_scheduler"]


def make_scheduler(policy: str = "wfq", *, cost_fn: CostFn | None = None,
                   default_policy: TaskPolicy | None = None, **budget_kwargs) -> Scheduler:
    """Build a scheduler by policy name; ``budget_kwargs`` go to BatchBudget.

    ``"wfq"``: batch-aware weighted fair queueing (the production policy).
    ``"fifo"``: global arrival order, weights ignored (a baseline).
    """
    try:
        cls = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {policy!r}; "
                         f"expected one of {sorted(POLICIES)}") from None
    return cls(BatchBudget(**budget_kwargs), cost_fn=cost_fn, default_policy=default_policy)
