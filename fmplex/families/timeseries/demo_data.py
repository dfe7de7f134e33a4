"""Real series that ship inside the statsmodels wheel (no download), for the demo, tests and benchmarks (control plane).

- ``sunspots``: yearly sunspot activity, 1700-2008 (309 values);
- ``co2``: weekly Mauna Loa CO2, 1958-2001 (2284 values, some missing: NaN);
- ``elnino``: monthly sea-surface temperature, 1950-2010 (732 values);
- ``nile``: yearly Nile flow, 1871-1970 (100 values).

:func:`labelled_windows` cuts windows of varying lengths out of the first
three and labels each with its source: a small classification set whose
labels a series embedding should separate.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

NAMES = ("sunspots", "co2", "elnino", "nile")


@functools.cache
def series(name: str) -> np.ndarray:
    """One bundled series as float32 (NaN where the source has gaps)."""
    import statsmodels.api as sm  # noqa: PLC0415 - heavy, control plane only

    if name == "sunspots":
        values = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    elif name == "co2":
        values = sm.datasets.co2.load_pandas().data["co2"].to_numpy()
    elif name == "elnino":
        values = sm.datasets.elnino.load_pandas().data.iloc[:, 1:13].to_numpy().reshape(-1)
    elif name == "nile":
        values = sm.datasets.nile.load_pandas().data["volume"].to_numpy()
    else:
        raise KeyError(f"unknown series {name!r} (known: {', '.join(NAMES)})")
    out = np.asarray(values, dtype=np.float32)
    out.setflags(write=False)
    return out


def labelled_windows(per_label: int = 40, seed: int = 0, lengths: tuple[int, int] = (48, 240)) -> tuple[list[np.ndarray], list[str]]:
    """``per_label`` windows of random lengths from each of sunspots, co2, elnino; labels = the source's name."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for name in ("sunspots", "co2", "elnino"):
        s = series(name)
        for _ in range(per_label):
            n = int(rng.integers(lengths[0], min(lengths[1], len(s)) + 1))
            start = int(rng.integers(0, len(s) - n + 1))
            rows.append(np.array(s[start : start + n]))
            labels.append(name)
    return rows, labels


def write_labelled_csv(path: Path, rows: list[np.ndarray], labels: list[str]) -> Path:
    """The training CSV format: ``label,x1,x2,...`` per row (ragged; an empty field or ``nan`` is missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "values..."])
        for row, label in zip(rows, labels):
            w.writerow([label, *("" if np.isnan(v) else repr(float(v)) for v in row)])
    return path
