"""Synthetic multimodal request traces, after the Azure LMM inference trace.

Microsoft's public Azure LMM inference trace (released with ModServe, 2025)
has one row per request: ``TIMESTAMP, NumImages, ContextTokens,
GeneratedTokens``. What the ModServe paper reports about it, and what this
generator reproduces, seeded and pure (no clock, no I/O but the CSV helpers):

* **bursts**: arrivals follow a two-state Markov-modulated Poisson process
  (calm / burst, exponential sojourns, the burst rate a multiple of the calm
  one), so counts per second are over-dispersed, unlike a plain Poisson;
* **a shifting mix**: the share of text-only requests (no image) drifts over
  the trace (linearly from ``text_share_start`` to ``text_share_end``, plus an
  optional sinusoid), so an encoder stage sees its load come and go
  independently of the language model's;
* **heavy tails**: images per image request follow a truncated Zipf law
  (most have one, a few carry many); context and generated tokens are
  lognormal (a long right tail), clipped to the model's limits.

Each row also names a ``task`` (a vFM): text-only requests draw from
``text_tasks`` and image requests from ``image_tasks``, by Zipf popularity.
Columns: ``timestamp_s, task, num_images, context_tokens, generated_tokens``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

COLUMNS = ("timestamp_s", "task", "num_images", "context_tokens", "generated_tokens")


@dataclasses.dataclass(frozen=True)
class Request:
    timestamp_s: float
    task: str
    num_images: int
    context_tokens: int
    generated_tokens: int

    @property
    def text_only(self) -> bool:
        return self.num_images == 0


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    duration_s: float = 600.0
    # arrivals: two-state MMPP
    calm_rate: float = 4.0  # requests/s while calm
    burst_factor: float = 5.0  # burst rate = calm_rate x burst_factor
    mean_calm_s: float = 40.0  # mean sojourn in the calm state
    mean_burst_s: float = 8.0  # mean sojourn in the burst state
    # modality mix
    text_share_start: float = 0.7  # share of text-only requests at t = 0
    text_share_end: float = 0.3  # ... at t = duration (linear in between)
    text_share_amplitude: float = 0.0  # optional sinusoid on top
    text_share_period_s: float = 300.0
    # images per image request: P(k) ~ k^-image_zipf, k = 1..max_images
    image_zipf: float = 2.0
    max_images: int = 32
    # tokens: lognormal by median and log-space sigma, clipped
    context_median: float = 600.0
    context_sigma: float = 1.0
    max_context: int = 32768
    image_context_tokens: int = 0  # extra context per image (0: ContextTokens is the text prompt only)
    generated_median: float = 120.0
    generated_sigma: float = 0.9
    max_generated: int = 4096
    # tasks (vFMs) by Zipf popularity
    text_tasks: tuple[str, ...] = ("chat", "summarize", "translate")
    image_tasks: tuple[str, ...] = ("caption", "vqa", "ocr", "chart")
    task_zipf: float = 1.2

    def __post_init__(self) -> None:
        checks = [
            (self.duration_s > 0, "duration_s must be positive"),
            (self.calm_rate > 0 and self.burst_factor >= 1, "need calm_rate > 0 and burst_factor >= 1"),
            (self.mean_calm_s > 0 and self.mean_burst_s > 0, "state sojourns must be positive"),
            (0 <= self.text_share_start <= 1 and 0 <= self.text_share_end <= 1, "text shares lie in [0, 1]"),
            (self.text_share_amplitude >= 0 and self.text_share_period_s > 0, "bad text-share sinusoid"),
            (self.max_images >= 1 and self.image_zipf > 0, "need max_images >= 1 and image_zipf > 0"),
            (self.context_median >= 1 and self.generated_median >= 1, "token medians must be at least 1"),
            (self.context_sigma >= 0 and self.generated_sigma >= 0, "token sigmas must be non-negative"),
            (self.max_context >= 1 and self.max_generated >= 1, "token limits must be at least 1"),
            (bool(self.text_tasks) and bool(self.image_tasks), "text_tasks and image_tasks must name at least one task"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def mean_rate(self) -> float:
        """Long-run mean arrival rate of the MMPP."""
        p_burst = self.mean_burst_s / (self.mean_calm_s + self.mean_burst_s)
        return self.calm_rate * (1 - p_burst + p_burst * self.burst_factor)

    def text_share(self, t: float) -> float:
        frac = min(max(t / self.duration_s, 0.0), 1.0)
        share = self.text_share_start + (self.text_share_end - self.text_share_start) * frac
        share += self.text_share_amplitude * math.sin(2 * math.pi * t / self.text_share_period_s)
        return min(max(share, 0.0), 1.0)


def _zipf_probs(n: int, s: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


def arrivals(cfg: TraceConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times of the MMPP in [0, duration) and whether each fell in a burst."""
    times: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    t = 0.0
    burst = bool(rng.random() < cfg.mean_burst_s / (cfg.mean_calm_s + cfg.mean_burst_s))  # stationary start
    while t < cfg.duration_s:
        stay = rng.exponential(cfg.mean_burst_s if burst else cfg.mean_calm_s)
        end = min(t + stay, cfg.duration_s)
        rate = cfg.calm_rate * (cfg.burst_factor if burst else 1.0)
        n = rng.poisson(rate * (end - t))
        times.append(np.sort(rng.uniform(t, end, n)))
        flags.append(np.full(n, burst))
        t, burst = end, not burst
    return np.concatenate(times) if times else np.zeros(0), np.concatenate(flags) if flags else np.zeros(0, bool)


def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, cap: int, n: int) -> np.ndarray:
    x = rng.lognormal(math.log(median), sigma, n) if sigma > 0 else np.full(n, median)
    return np.clip(np.rint(x), 1, cap).astype(np.int64)


def generate(cfg: TraceConfig = TraceConfig(), seed: int = 0) -> list[Request]:
    """A trace of requests ordered by time; the same seed gives the same trace."""
    rng = np.random.default_rng(seed)
    ts, _ = arrivals(cfg, rng)
    n = len(ts)
    share = np.array([cfg.text_share(t) for t in ts])
    text_only = rng.random(n) < share
    images = rng.choice(np.arange(1, cfg.max_images + 1), size=n, p=_zipf_probs(cfg.max_images, cfg.image_zipf))
    images = np.where(text_only, 0, images)
    context = _lognormal_int(rng, cfg.context_median, cfg.context_sigma, cfg.max_context, n)
    if cfg.image_context_tokens:
        context = np.minimum(context + images * cfg.image_context_tokens, cfg.max_context)
    generated = _lognormal_int(rng, cfg.generated_median, cfg.generated_sigma, cfg.max_generated, n)
    text_pick = rng.choice(len(cfg.text_tasks), size=n, p=_zipf_probs(len(cfg.text_tasks), cfg.task_zipf))
    image_pick = rng.choice(len(cfg.image_tasks), size=n, p=_zipf_probs(len(cfg.image_tasks), cfg.task_zipf))
    out = []
    for i in range(n):
        task = cfg.text_tasks[text_pick[i]] if text_only[i] else cfg.image_tasks[image_pick[i]]
        out.append(Request(round(float(ts[i]), 6), task, int(images[i]), int(context[i]), int(generated[i])))
    return out


# --- CSV ---------------------------------------------------------------------------


def write_csv(rows: Iterable[Request], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([f"{r.timestamp_s:.6f}", r.task, r.num_images, r.context_tokens, r.generated_tokens])
    return path


def read_csv(path: Path) -> list[Request]:
    """Rows of a trace CSV (ours, or one with the same columns); one-line errors."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (want {', '.join(COLUMNS)})")
        for i, row in enumerate(reader, start=2):
            try:
                r = Request(
                    float(row["timestamp_s"]), row["task"], int(row["num_images"]),
                    int(row["context_tokens"]), int(row["generated_tokens"]),
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{i}: bad row: {exc}") from None
            if r.num_images < 0 or r.context_tokens < 0 or r.generated_tokens < 0 or not r.task:
                raise ValueError(f"{path}:{i}: negative counts or an empty task")
            out.append(r)
    return out


def summary(rows: Sequence[Request], window_s: float = 1.0) -> dict[str, float]:
    """Statistics a trace is judged by (used by the tests and ``fmplex trace``)."""
    if not rows:
        return {"requests": 0}
    ts = np.array([r.timestamp_s for r in rows])
    span = max(float(ts[-1]), window_s)
    counts = np.bincount((ts // window_s).astype(int))
    imgs = np.array([r.num_images for r in rows])
    ctx = np.array([r.context_tokens for r in rows])
    gen = np.array([r.generated_tokens for r in rows])
    with_img = imgs[imgs > 0]
    return {
        "requests": float(len(rows)),
        "rate_per_s": len(rows) / span,
        "dispersion": float(counts.var() / counts.mean()) if counts.mean() > 0 else 0.0,  # 1 for Poisson
        "text_only_share": float((imgs == 0).mean()),
        "images_mean": float(with_img.mean()) if len(with_img) else 0.0,
        "images_max": float(imgs.max()),
        "context_p50": float(np.median(ctx)),
        "context_p99": float(np.percentile(ctx, 99)),
        "generated_p50": float(np.median(gen)),
        "generated_p99": float(np.percentile(gen, 99)),
    }
