"""Building task artifacts: fitting a classifier head on backbone embeddings.

The head is a softmax regression on the pooled, normalised sentence vector —
the same vector the host computes (we embed through the host's own executor).
Fitting is full-batch L-BFGS on fixed embeddings: seconds on CPU for a few
thousand rows, deterministic, and no hyper-parameters worth exposing beyond the
L2 penalty.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from fmplex.artifacts import write_manifest, write_weights
from fmplex.backbones import fingerprint, get_backbone

Echo = Callable[[str], None]


class TrainError(ValueError):
    """The training data cannot be used."""


@dataclasses.dataclass
class FitReport:
    rows: int
    labels: list[str]
    train_accuracy: float
    holdout_accuracy: float | None
    steps: int


def read_labelled_csv(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV with columns text,label (header optional)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise TrainError(f"training file {path} does not exist") from None
    except IsADirectoryError:
        raise TrainError(f"training file {path} is a directory; text tasks train from a text,label CSV") from None
    except UnicodeDecodeError:
        raise TrainError(f"training file {path} is not UTF-8") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["text", "label"]:
        rows = rows[1:]
    texts, labels = [], []
    for n, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise TrainError(
                f"{path}: row {n} has {len(row)} columns; each row needs exactly text,label (quote texts that contain commas)"
            )
        if not row[0].strip() or not row[1].strip():
            raise TrainError(f"{path}: row {n} has an empty {'text' if not row[0].strip() else 'label'}")
        texts.append(row[0].strip())
        labels.append(row[1].strip())
    if len(set(labels)) < 2:
        raise TrainError(f"{path}: need at least two different labels, found {sorted(set(labels))}")
    return texts, labels


def fit_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3, steps: int = 100) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def train_classifier(
    backbone: str,
    texts: list[str],
    labels: list[str],
    echo: Echo,
    progress: Callable[[int], None] | None = None,
    extension: Any = None,
    executor: Any = None,
) -> tuple[torch.nn.Linear, FitReport]:
    """Fit a linear head on the pooled vectors of the backbone — with the
    task's own body (LoRA, adapter, prompt) applied when ``extension`` is given."""
    from fmplex.triton_backend.executor import Executor, set_threads  # noqa: PLC0415 - torch-heavy

    set_threads(1)
    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels])
    echo(f"embedding {len(texts)} rows with backbone '{backbone}'")
    executor = executor or Executor(get_backbone(backbone))
    with torch.inference_mode():
        x = executor.embed(texts, progress=progress, extension=extension)
    x = x.clone()  # leave inference mode: the head is fitted with autograd
    head, acc, holdout = fit_probe(x, y, len(names), echo)
    return head, FitReport(len(texts), names, acc, holdout, 100)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, echo: Echo) -> tuple[torch.nn.Linear, float, float | None]:
    """(head, training accuracy, held-out accuracy or None): the linear probe every family trains.

    A fixed 80/20 split (20 rows or more) tells the user whether the head
    generalises; then the head that ships is fitted on every row.
    """
    holdout = None
    if len(y) >= 20:
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(y), generator=g)
        cut = int(0.8 * len(y))
        tr, te = perm[:cut], perm[cut:]
        probe = fit_softmax(x[tr], y[tr], classes)
        with torch.no_grad():
            holdout = float((probe(x[te]).argmax(1) == y[te]).float().mean())
        echo(f"held-out accuracy (80/20 split): {holdout:.3f}")
    head = fit_softmax(x, y, classes)
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean())
    echo(f"training accuracy: {acc:.3f} over {classes} labels")
    return head, acc, holdout


def probe_artifact(head: torch.nn.Linear, names: list[str], rows: int, acc: float, holdout: float | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest fields and tensors of a linear probe over a backbone's features (vision, series)."""
    fields = {
        "head": {"type": "linear"},
        "labels": names,
        "training": {"rows": rows, "train_accuracy": round(acc, 4), "holdout_accuracy": None if holdout is None else round(holdout, 4)},
    }
    return fields, {"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}


def write_artifact(
    out_dir: Path,
    task: str,
    version: int,
    backbone: str,
    kind: str,
    fields: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    files: dict[str, Path],
    source: str,
) -> dict[str, Any]:
    """manifest.json + weights.safetensors (+ copied files) in a version dir."""
    import shutil  # noqa: PLC0415

    manifest = {
        "task": task,
        "version": version,
        "kind": kind,
        "backbone": backbone,
        "backbone_fingerprint": fingerprint(backbone),
        "source": source,
        **fields,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if tensors:
        write_weights(out_dir, tensors)
    for name, src in files.items():
        shutil.copyfile(src, out_dir / name)
    write_manifest(out_dir, manifest)
    return manifest


def head_fields(head: torch.nn.Linear, report: FitReport) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest fields and tensors of a fitted linear head."""
    fields = {
        "head": {"type": "linear"},
        "labels": report.labels,
        "training": {
            "rows": report.rows,
            "train_accuracy": round(report.train_accuracy, 4),
            "holdout_accuracy": None if report.holdout_accuracy is None else round(report.holdout_accuracy, 4),
        },
    }
    return fields, {"head.weight": head.weight.detach(), "head.bias": head.bias.detach()}
