"""Typed host settings, read from a Triton model config in one place.

A host's tunables are ``parameters { key: "..." value { string_value: "..." } }``
entries of its ``config.pbtxt`` (written by the control plane; editing one
reloads the host). Each host declares them as a frozen dataclass whose field
names are the parameter keys and whose defaults are the host's defaults;
:func:`read_settings` fills it, converting each string to the field's type,
and names the parameter in its error when a value does not convert, so a bad
config fails the host's load with one clear line instead of a stack trace
from deep inside ``initialize``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, TypeVar

from .scheduler import CostFn, Scheduler, make_scheduler

S = TypeVar("S")

TORCH_THREADS_ENV = "FMPLEX_TORCH_THREADS"  # overrides torch_threads (tests, benchmarks)


def config_parameters(config: dict[str, Any]) -> dict[str, str]:
    """The string parameters of a parsed model config, by key."""
    return {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


@dataclasses.dataclass(frozen=True)
class HostSettings:
    """What every fmplex host reads (subclass it to add a host's own)."""

    slots: int = 256  # slot outputs the host declares (its pool of tasks)
    torch_threads: int = 1  # intra-op threads of this process (one on a shared CPU)
    repository: str = ""  # the model repository; "" = the one Triton loaded the host from
    device: str = "cpu"  # cpu, or cuda[:n] on a GPU machine


@dataclasses.dataclass(frozen=True)
class SchedulerSettings(HostSettings):
    """What every host that batches requests through the fmplex scheduler reads (the encoder, vision
    and time-series hosts): one set of parameter names, one meaning and one way to the scheduler's
    ``BatchBudget``, so a knob such as batch growth works the same on every such host. A host's
    subclass changes the defaults and adds its own fields."""

    policy: str = "wfq"  # wfq, or fifo (a baseline)
    max_batch_rows: int = 16  # rows of one batch while a light task waits
    saturated_batch_rows: int = 0  # rows a batch may grow to while no task is light (<= max_batch_rows: off)
    light_window_ms: float = 1000.0  # a task served this recently with less than its share still counts as light
    max_lag: float = 4096.0  # how far (virtual time) WFQ may look past the smallest finish tag to batch well
    max_queue_delay_us: float = 0.0  # wait to fill a batch (0: work-conserving)
    workers: str = "auto"  # batches run at once (see worker_count)

    def make_scheduler(self, parallel: int, max_tokens: int, cost_fn: CostFn | None = None) -> Scheduler:
        """The scheduler these settings describe, for ``parallel`` workers; ``max_tokens`` bounds
        the padded volume of a ``max_batch_rows`` batch (the host's own unit: tokens, or cost)."""
        return make_scheduler(
            self.policy,
            cost_fn=cost_fn,
            max_rows=self.max_batch_rows,
            max_tokens=max_tokens,
            max_lag=self.max_lag,
            max_queue_delay_s=self.max_queue_delay_us / 1e6,
            saturated_rows=self.saturated_batch_rows,
            light_window_s=self.light_window_ms / 1000.0,
            parallel=parallel,
        )


def read_settings(config: dict[str, Any], cls: type[S], **defaults: Any) -> S:
    """An instance of the dataclass ``cls`` from ``config``'s parameters.

    ``defaults`` replace field defaults that are only known at run time (for
    example the repository Triton loaded the host from). Unknown parameters
    are ignored: a config may carry settings for the control plane too.
    """
    params = config_parameters(config)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = params.get(field.name)
        if field.name == "torch_threads" and os.environ.get(TORCH_THREADS_ENV):
            raw = os.environ[TORCH_THREADS_ENV]
        if raw is None or raw == "":
            if field.name in defaults:
                values[field.name] = defaults[field.name]
            continue
        values[field.name] = _convert(field.name, raw, hints[field.name])
    return cls(**values)


def _convert(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"host parameter {name}={raw!r} is not a valid {kind.__name__}") from None
    return raw


def worker_count(value: str, device: str) -> int:
    """Batches run at once. On a CPU each worker is one torch thread running
    its own batch (ops release the GIL), so "auto" = one per core this
    process may use, up to 4: a single worker left the second core of a
    2-core machine idle while isolated per-task models used both. On a GPU
    one worker keeps the device busy with larger batches."""
    if value != "auto":
        n = int(value)
        if n < 1:
            raise ValueError(f"workers must be >= 1 or 'auto', got {value}")
        return n
    if device != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 4))
