"""The synthetic LMM trace: seeded, bursty, heavy-tailed, with a shifting mix.

Statistical checks use fixed seeds and long traces; the margins are several
standard errors wide, so they fail only when the property itself is lost.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fmplex import trace
from fmplex.trace import TraceConfig

LONG = TraceConfig(duration_s=3600.0)


@pytest.fixture(scope="module")
def rows() -> list[trace.Request]:
    return trace.generate(LONG, seed=7)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    cfg = TraceConfig(duration_s=120.0)
    assert trace.generate(cfg, seed=3) == trace.generate(cfg, seed=3)
    assert trace.generate(cfg, seed=3) != trace.generate(cfg, seed=4)


def test_rows_are_ordered_in_range_and_well_formed(rows: list[trace.Request]) -> None:
    ts = np.array([r.timestamp_s for r in rows])
    assert (np.diff(ts) >= 0).all() and ts[0] >= 0 and ts[-1] < LONG.duration_s
    assert all(r.num_images >= 0 and 1 <= r.context_tokens <= LONG.max_context for r in rows)
    assert all(1 <= r.generated_tokens <= LONG.max_generated and r.num_images <= LONG.max_images for r in rows)
    for r in rows:  # text-only requests go to text tasks, image requests to image tasks
        assert r.task in (LONG.text_tasks if r.text_only else LONG.image_tasks)


def test_mean_rate_matches_the_mmpp(rows: list[trace.Request]) -> None:
    rate = len(rows) / LONG.duration_s
    assert rate == pytest.approx(LONG.mean_rate, rel=0.15)  # ~60 calm/burst cycles in an hour


def test_arrivals_are_bursty_and_poisson_without_bursts(rows: list[trace.Request]) -> None:
    bursty = trace.summary(rows)["dispersion"]
    flat = trace.summary(trace.generate(dataclasses.replace(LONG, burst_factor=1.0), seed=7))["dispersion"]
    assert bursty > 3.0  # counts per second far more variable than Poisson
    assert 0.85 < flat < 1.15  # a plain Poisson process: variance == mean
    # and the busiest seconds are bursts: the top 1% of 1-s windows carry well over the mean rate
    counts = np.bincount(np.array([r.timestamp_s for r in rows]).astype(int))
    assert np.percentile(counts, 99) > 2.5 * counts.mean()


def test_image_counts_are_heavy_tailed(rows: list[trace.Request]) -> None:
    imgs = np.array([r.num_images for r in rows if r.num_images > 0])
    share = lambda k: float((imgs == k).mean())  # noqa: E731
    assert share(1) > 0.5  # most image requests carry one image
    assert share(1) > share(2) > share(3) > share(4)
    # ... but a power-law tail: many images happen, far more often than a geometric law with the same mean would give
    tail = float((imgs >= 16).mean())
    p = 1 / imgs.mean()  # geometric on 1, 2, ... with this mean: P(k >= 16) = (1 - p)^15
    assert tail > 0.01 and tail > 10 * (1 - p) ** 15
    assert imgs.max() >= 20


def test_token_counts_are_heavy_tailed(rows: list[trace.Request]) -> None:
    s = trace.summary(rows)
    assert s["context_p50"] == pytest.approx(LONG.context_median, rel=0.1)
    assert s["generated_p50"] == pytest.approx(LONG.generated_median, rel=0.1)
    assert s["context_p99"] > 6 * s["context_p50"]  # lognormal sigma=1: p99/p50 = e^2.33 ~ 10
    assert s["generated_p99"] > 5 * s["generated_p50"]
    ctx = np.array([r.context_tokens for r in rows], dtype=float)
    assert ctx.mean() > 1.3 * np.median(ctx)  # right-skewed


def test_text_only_share_shifts_over_time(rows: list[trace.Request]) -> None:
    n = len(rows)
    first = np.mean([r.text_only for r in rows[: n // 5]])
    last = np.mean([r.text_only for r in rows[-n // 5 :]])
    assert first > 0.6 and last < 0.4  # 0.7 -> 0.3 configured
    swapped = trace.generate(dataclasses.replace(LONG, text_share_start=0.2, text_share_end=0.9), seed=7)
    m = len(swapped)
    assert np.mean([r.text_only for r in swapped[: m // 5]]) < np.mean([r.text_only for r in swapped[-m // 5 :]]) - 0.4


def test_text_share_sinusoid() -> None:
    cfg = TraceConfig(duration_s=1200.0, text_share_start=0.5, text_share_end=0.5, text_share_amplitude=0.4, text_share_period_s=600.0)
    assert cfg.text_share(150.0) == pytest.approx(0.9)
    assert cfg.text_share(450.0) == pytest.approx(0.1)
    rows = trace.generate(cfg, seed=1)
    peak = [r.text_only for r in rows if 100 <= r.timestamp_s % 600 <= 200]
    trough = [r.text_only for r in rows if 400 <= r.timestamp_s % 600 <= 500]
    assert np.mean(peak) > 0.75 and np.mean(trough) < 0.25


def test_image_context_tokens_add_per_image() -> None:
    base = trace.generate(TraceConfig(duration_s=200.0), seed=2)
    more = trace.generate(TraceConfig(duration_s=200.0, image_context_tokens=576), seed=2)
    for a, b in zip(base, more):
        assert b.context_tokens == min(a.context_tokens + 576 * a.num_images, 32768)


def test_csv_round_trip(tmp_path: Path, rows: list[trace.Request]) -> None:
    path = trace.write_csv(rows[:500], tmp_path / "t.csv")
    assert path.read_text().splitlines()[0] == ",".join(trace.COLUMNS)
    assert trace.read_csv(path) == rows[:500]


def test_read_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_s,task,num_images\n0.1,a,1\n")
    with pytest.raises(ValueError, match="missing column"):
        trace.read_csv(bad)
    bad.write_text(",".join(trace.COLUMNS) + "\n0.1,a,x,3,4\n")
    with pytest.raises(ValueError, match=":2: bad row"):
        trace.read_csv(bad)
    bad.write_text(",".join(trace.COLUMNS) + "\n0.1,a,-1,3,4\n")
    with pytest.raises(ValueError, match="negative"):
        trace.read_csv(bad)


@pytest.mark.parametrize(
    "change",
    [
        {"duration_s": 0},
        {"calm_rate": 0},
        {"burst_factor": 0.5},
        {"text_share_start": 1.5},
        {"max_images": 0},
        {"context_sigma": -1},
        {"image_tasks": ()},
    ],
)
def test_bad_configs_are_refused(change: dict) -> None:
    with pytest.raises(ValueError):
        TraceConfig(**change)
