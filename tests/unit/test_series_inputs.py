"""SERIES/LENGTHS/HORIZON decoding: what is accepted, and a one-line RequestError for everything else."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fmplex.families.timeseries.inputs import RequestError, SeriesLimits, decode_request


@dataclasses.dataclass
class FakeTask:
    name: str = "t"
    context_width: int = 2048
    min_context: int = 8
    missing: str = "mask"
    forecasts: bool = True
    horizon: int = 24
    max_horizon: int = 96


def ramp(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) + 1.0


def padded(*lengths: int) -> np.ndarray:
    out = np.full((len(lengths), max(lengths)), np.nan, dtype=np.float32)
    for i, n in enumerate(lengths):
        out[i, :n] = ramp(n)
    return out


def refused(match: str, *args, **kw) -> str:
    with pytest.raises(RequestError, match=match) as exc:
        decode_request(*args, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_nan_padding_gives_each_row_its_length_and_default_horizon():
    req = decode_request(FakeTask(), padded(10, 30, 20))
    assert [len(r) for r in req.rows] == [10, 30, 20]
    assert req.horizon == 24
    np.testing.assert_array_equal(req.rows[2], ramp(20))


def test_lengths_input_overrides_padding_and_ignores_what_lies_beyond():
    s = padded(30, 30)
    s[0, 12:] = 99.0  # not padding, but beyond LENGTHS[0]
    s[1, 25:] = np.inf
    req = decode_request(FakeTask(), s, lengths=np.array([12, 25], dtype=np.int32))
    assert [len(r) for r in req.rows] == [12, 25]
    assert np.isfinite(req.rows[1]).all()
    req = decode_request(FakeTask(), s[:1], lengths=np.array([[10]], dtype=np.int64))
    assert len(req.rows[0]) == 10


def test_nan_inside_is_missing_for_a_mask_task_and_refused_for_a_reject_task():
    s = padded(20)
    s[0, 5] = np.nan
    req = decode_request(FakeTask(missing="mask"), s)
    assert len(req.rows[0]) == 20 and np.isnan(req.rows[0][5])
    msg = refused("row 0 has NaN at step 5 inside", FakeTask(missing="reject"), s)
    assert "task 't'" in msg


def test_infinite_values_are_refused():
    s = padded(20, 20)
    s[1, 7] = -np.inf
    refused("row 1 has an infinite value at step 7", FakeTask(), s)


def test_too_short_context_is_refused():
    refused("row 1 has 5 observed values in its last 2048 steps; task 't' needs at least 8", FakeTask(), padded(9, 5))
    refused("needs at least 32", FakeTask(min_context=32), padded(31))
    s = padded(12)
    s[0, :6] = np.nan  # 12 long, 6 observed
    refused("row 0 has 6 observed values", FakeTask(), s)
    # only the last W steps count
    s = padded(40)
    s[0, 30:39] = np.nan
    refused("has 1 observed values in its last 10 steps", FakeTask(context_width=10), s)
    refused("row 0 holds no values", FakeTask(), np.full((1, 9), np.nan, dtype=np.float32))


@pytest.mark.parametrize("h, match", [(97, "HORIZON 97 is outside 1..96"), (0, "HORIZON 0 is outside"), (-3, "outside")])
def test_horizon_out_of_range_is_refused(h, match):
    refused(match, FakeTask(), padded(20), horizon=np.array([h], dtype=np.int32))


def test_horizon_in_range_is_used():
    assert decode_request(FakeTask(), padded(20), horizon=np.array([[96]], dtype=np.int64)).horizon == 96
    assert decode_request(FakeTask(), padded(20), horizon=np.array([1], dtype=np.int32)).horizon == 1


def test_horizon_type_and_count_and_non_forecasting_tasks():
    refused("HORIZON must be INT32 or INT64, got float32", FakeTask(), padded(20), horizon=np.array([3.0], np.float32))
    refused("HORIZON must be one value, got 2", FakeTask(), padded(20), horizon=np.array([3, 4], np.int32))
    refused("does not forecast", FakeTask(forecasts=False), padded(20), horizon=np.array([3], np.int32))
    assert decode_request(FakeTask(forecasts=False), padded(20)).horizon is None


@pytest.mark.parametrize(
    "series, match",
    [
        (np.ones((2, 20), dtype=np.float64), "SERIES must be FP32, got float64"),
        (np.ones((2, 20), dtype=np.int32), "SERIES must be FP32"),
        (np.ones(20, dtype=np.float32), r"SERIES must be \[rows, T\], got shape \[20\]"),
        (np.ones((1, 2, 20), dtype=np.float32), r"got shape \[1, 2, 20\]"),
        (np.ones((0, 20), dtype=np.float32), "SERIES is empty"),
        (np.ones((1, 0), dtype=np.float32), "SERIES is empty"),
        (None, "SERIES is required"),
    ],
)
def test_wrong_dtype_or_shape_is_refused(series, match):
    refused(match, FakeTask(), series)


def test_limits_on_rows_and_steps():
    refused("SERIES has 5 rows; at most 4", FakeTask(), padded(9, 9, 9, 9, 9), limits=SeriesLimits(max_rows=4))
    refused("at most 16", FakeTask(), padded(17), limits=SeriesLimits(max_steps=16))


def test_bad_lengths_are_refused():
    s = padded(20, 20)
    refused(r"LENGTHS must be \[rows\] = \[2\]", FakeTask(), s, lengths=np.array([20], np.int32))
    refused(r"LENGTHS\[1\] = 21 is outside 1..20", FakeTask(), s, lengths=np.array([20, 21], np.int32))
    refused(r"LENGTHS\[0\] = 0 is outside", FakeTask(), s, lengths=np.array([0, 20], np.int32))
    refused("LENGTHS must be INT32 or INT64", FakeTask(), s, lengths=np.array([20.0, 20.0], np.float32))
