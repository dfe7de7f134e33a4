"""Fitting a ``classifier`` vision task: a linear probe on the pooled features (control plane).

Training images come from a folder (``DIR/<label>/*.png|jpg|jpeg``, one
sub-folder per label) or a CSV of ``path,label`` (header optional; relative
paths are relative to the CSV's folder). Every image goes through the host's
own preprocessing and backbone (:class:`..executor.VisionExecutor`), so the
probe is trained on exactly the features it is served on. The fit and the
held-out printout are the text trainer's (:func:`fmplex.control.train.fit_softmax`,
a fixed 80/20 split when there are at least 20 images, then a fit on all).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fmplex.runtime.validation import RequestError

from .preprocess import decode_image

Echo = Callable[[str], None]
SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH = 32


class TrainError(ValueError):
    """The training data cannot be used (one line)."""


def read_folder(root: Path) -> tuple[list[Path], list[str]]:
    paths, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        paths += files
        labels += [sub.name] * len(files)
    return paths, labels


def read_csv(path: Path) -> tuple[list[Path], list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise TrainError(f"training file {path} is not UTF-8") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    paths, labels = [], []
    for n, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise TrainError(f"{path}: row {n} must be path,label (both non-empty)")
        p = Path(row[0].strip())
        paths.append(p if p.is_absolute() else path.parent / p)
        labels.append(row[1].strip())
    return paths, labels


def read_labelled_images(source: Path) -> tuple[list[Path], list[str]]:
    """(image paths, labels) from a labelled folder or a path,label CSV."""
    if source.is_dir():
        paths, labels = read_folder(source)
        if not paths:
            raise TrainError(f"{source}: no images; expected {source}/<label>/*.png|jpg")
    elif source.is_file():
        paths, labels = read_csv(source)
    else:
        raise TrainError(f"training data {source} does not exist")
    if len(set(labels)) < 2:
        raise TrainError(f"{source}: need at least two different labels, found {sorted(set(labels))}")
    return paths, labels


def load_pixels(paths: list[Path]) -> np.ndarray:
    out = np.empty((len(paths), 3, 224, 224), dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            out[i] = decode_image(p.read_bytes(), str(p))
        except FileNotFoundError:
            raise TrainError(f"training image {p} does not exist") from None
        except RequestError as exc:
            raise TrainError(str(exc)) from None
    return out


def train_probe(executor: Any, pixels: np.ndarray, labels: list[str], echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fit the probe on ``pixels`` (``[rows, 3, 224, 224]``): (manifest fields, tensors)."""
    from fmplex.control.train import fit_probe, probe_artifact  # noqa: PLC0415 - control plane, torch-heavy

    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels])
    echo(f"embedding {len(labels)} images with backbone 'fm.efficientnet'")
    x = torch.cat([executor.pooled_features(pixels[i : i + BATCH]) for i in range(0, len(labels), BATCH)]).clone()
    head, acc, holdout = fit_probe(x, y, len(names), echo)
    return probe_artifact(head, names, len(labels), acc, holdout)


def train_classifier(executor: Any, source: Path, echo: Echo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    paths, labels = read_labelled_images(source)
    echo(f"reading {len(paths)} images ({len(set(labels))} labels) from {source}")
    return train_probe(executor, load_pixels(paths), labels, echo)
