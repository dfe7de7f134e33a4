"""Fitting a ``classifier`` series task: a linear probe on the series embedding (control plane).

The training file is a CSV with one labelled series per line:
``label,x1,x2,...`` (rows may have different lengths; an empty field or
``nan`` inside is a missing value, trailing ones are padding; a first
line whose first field is ``label`` is a header). Every series goes through
the host's own normalisation and trunk (:meth:`..executor.SeriesExecutor.embed`),
so the probe is trained on exactly the embedding it is served on. The fit
and the held-out printout are the text trainer's
(:func:`fmplex.control.train.fit_softmax`, a fixed 80/20 split when there are
at least 20 series, then a fit on all).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .model import MIN_FINITE

Echo = Callable[[str], None]


class TrainError(ValueError):
    """The training data cannot be used (one line)."""


def _value(field: str, path: Path, n: int) -> float:
    f = field.strip()
    if f == "" or f.lower() == "nan":
        return float("nan")
    try:
        v = float(f)
    except ValueError:
        raise TrainError(f"{path}: row {n} has a value that is not a number: {f[:40]!r}") from None
    if not np.isfinite(v):
        raise TrainError(f"{path}: row {n} has an infinite value")
    return v


def read_labelled_series(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """(series, labels) from a ``label,x1,x2,...`` CSV."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            lines = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise TrainError(f"training file {path} does not exist") from None
    except UnicodeDecodeError:
        raise TrainError(f"training file {path} is not UTF-8") from None
    if lines and lines[0][0].strip().lower() == "label":
        lines = lines[1:]
    rows, labels = [], []
    for n, line in enumerate(lines, start=1):
        label = line[0].strip()
        if not label:
            raise TrainError(f"{path}: row {n} has an empty label")
        fields = list(line[1:])
        while fields and not fields[-1].strip():
            fields.pop()
        row = np.array([_value(f, path, n) for f in fields], dtype=np.float32)
        present = np.flatnonzero(~np.isnan(row))
        row = row[: present[-1] + 1] if present.size else row[:0]  # trailing NaN pads, as in SERIES
        if int(np.isfinite(row).sum()) < MIN_FINITE:
            raise TrainError(f"{path}: row {n} has {int(np.isfinite(row).sum())} values; a series needs at least {MIN_FINITE}")
        rows.append(row)
        labels.append(label)
    if len(set(labels)) < 2:
        raise TrainError(f"{path}: need at least two different labels, found {sorted(set(labels))}")
    return rows, labels


def train_probe(executor: Any, rows: list[np.ndarray], labels: list[str], echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fit the probe on the embeddings of ``rows``: (manifest fields, tensors)."""
    from fmplex.control.train import fit_probe, probe_artifact  # noqa: PLC0415 - control plane, torch-heavy

    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels])
    echo(f"embedding {len(rows)} series with backbone 'fm.fracast'")
    x = executor.embed(rows).clone()  # leave inference mode: the head is fitted with autograd
    head, acc, holdout = fit_probe(x, y, len(names), echo)
    return probe_artifact(head, names, len(rows), acc, holdout)


def train_classifier(executor: Any, source: Path, echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    rows, labels = read_labelled_series(source)
    echo(f"reading {len(rows)} series ({len(set(labels))} labels) from {source}")
    return train_probe(executor, rows, labels, echo)
