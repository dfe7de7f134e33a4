"""A series request's inputs -> checked rows; every refusal is one line and fails only its own request.

Inputs (as the host receives them):

- ``SERIES`` FP32 ``[rows, T]``. Rows of different lengths are padded at the
  end with NaN: without ``LENGTHS`` a row ends at its last non-NaN value.
- ``LENGTHS`` (optional) INT32/INT64 ``[rows]`` (or ``[rows, 1]``): row ``i`` is
  ``SERIES[i, :LENGTHS[i]]``; what lies beyond is ignored, whatever it holds.
- ``HORIZON`` (optional) INT32/INT64, one value: steps to forecast, at most the
  task's ``max_horizon``; without it the task's default ``horizon``.

Inside a row, NaN is a missing observation, which Fracast masks, unless the
task was created with ``missing="reject"``. Infinite values are refused
everywhere (Fracast would silently mask them too, but an infinity is a
client's bug, not a gap). Only the last ``W`` (2048) steps reach the model;
they must hold at least the task's ``min_context`` finite values (Fracast's
own minimum is 8).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fmplex.runtime.validation import RequestError

__all__ = ["RequestError", "SeriesLimits", "SeriesRequest", "decode_request"]


@dataclasses.dataclass(frozen=True)
class SeriesLimits:
    max_rows: int = 256  # rows in one request
    max_steps: int = 65536  # T: steps in one row as sent (only the last W reach the model)


@dataclasses.dataclass
class SeriesRequest:
    """A decoded request: one float32 array per row (its own length) and the horizon to answer."""

    rows: list[np.ndarray]
    horizon: int | None  # None for tasks that do not forecast


def _int_values(name: str, arr: Any) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        raise RequestError(f"{name} must be INT32 or INT64, got {a.dtype}")
    return a.astype(np.int64)


def decode_request(task: Any, series: Any, lengths: Any = None, horizon: Any = None,
                   limits: SeriesLimits = SeriesLimits()) -> SeriesRequest:
    """Check and split a request for ``task`` (anything with the attributes of :class:`..tasks.SeriesTask`)."""
    if series is None:
        raise RequestError("SERIES is required: FP32 [rows, T]")
    s = np.asarray(series)
    if s.dtype != np.float32:
        raise RequestError(f"SERIES must be FP32, got {s.dtype}")
    if s.ndim != 2:
        raise RequestError(f"SERIES must be [rows, T], got shape {list(s.shape)}")
    rows, steps = int(s.shape[0]), int(s.shape[1])
    if rows < 1 or steps < 1:
        raise RequestError(f"SERIES is empty (shape {list(s.shape)})")
    if rows > limits.max_rows:
        raise RequestError(f"SERIES has {rows} rows; at most {limits.max_rows} per request")
    if steps > limits.max_steps:
        raise RequestError(f"SERIES has {steps} steps per row; at most {limits.max_steps}")

    if lengths is not None:
        ln = _int_values("LENGTHS", lengths)
        if ln.ndim == 2 and ln.shape[1] == 1:
            ln = ln[:, 0]
        if ln.shape != (rows,):
            raise RequestError(f"LENGTHS must be [rows] = [{rows}], got shape {list(np.asarray(lengths).shape)}")
        bad = np.flatnonzero((ln < 1) | (ln > steps))
        if bad.size:
            raise RequestError(f"LENGTHS[{bad[0]}] = {ln[bad[0]]} is outside 1..{steps}")
        ends = ln
    else:
        present = ~np.isnan(s)
        ends = np.where(present.any(axis=1), steps - np.argmax(present[:, ::-1], axis=1), 0)
        empty = np.flatnonzero(ends == 0)
        if empty.size:
            raise RequestError(f"SERIES row {empty[0]} holds no values (all NaN)")

    out: list[np.ndarray] = []
    width, need = int(task.context_width), int(task.min_context)
    for i in range(rows):
        row = s[i, : int(ends[i])]
        inf = np.flatnonzero(np.isinf(row))
        if inf.size:
            raise RequestError(f"SERIES row {i} has an infinite value at step {inf[0]}")
        if task.missing == "reject":
            nan = np.flatnonzero(np.isnan(row))
            if nan.size:
                raise RequestError(
                    f"SERIES row {i} has NaN at step {nan[0]} inside the series; task '{task.name}' takes no missing "
                    "values (NaN may only pad the end of a row)"
                )
        seen = int(np.isfinite(row[-width:]).sum())
        if seen < need:
            raise RequestError(
                f"SERIES row {i} has {seen} observed values in its last {width} steps; task '{task.name}' needs at least {need}"
            )
        out.append(np.ascontiguousarray(row, dtype=np.float32))

    h: int | None = None
    if task.forecasts:
        h = int(task.horizon)
        if horizon is not None:
            hv = _int_values("HORIZON", horizon).reshape(-1)
            if hv.size != 1:
                raise RequestError(f"HORIZON must be one value, got {hv.size}")
            h = int(hv[0])
            if h < 1 or h > int(task.max_horizon):
                raise RequestError(f"HORIZON {h} is outside 1..{task.max_horizon} for task '{task.name}'")
    elif horizon is not None:
        raise RequestError(f"task '{task.name}' does not forecast; HORIZON is not one of its inputs")
    return SeriesRequest(out, h)
