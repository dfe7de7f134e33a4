"""One trunk pass over the rows of many series tasks, then each task's head on its own rows.

The executor knows torch and the network, nothing of Triton or scheduling.
:meth:`SeriesExecutor.run_batch` takes ``(task, SeriesRequest)`` pairs (one per
request, already decoded and checked by :mod:`.inputs`) and returns one
:class:`BatchResult` per pair, in order, each holding outputs or an error; it
never raises for one task's fault.

The pass (inter-task batching):

1. every row of every task is normalised (its own scale) and the trunk runs
   once over all of them, in chunks of at most ``max_pass_rows`` rows;
2. ``embedding``/``classifier`` rows take the embedding of their hidden states;
3. forecasting rows go through their head, grouped by head: every
   ``forecast`` task shares the backbone's own head (one call for all of
   them), a ``fork`` runs its own head on its rows (intra-task batching);
4. the native head predicts 48 steps. A row asking for more goes round again,
   as in ``FracastModel.forecast_batch``: its context is extended with the
   median just predicted and re-normalised, and the next round's trunk pass
   again mixes the rows of every task that still needs steps.

Every operation of the network is per row, so a row's answer does not depend
on the rows it was batched with (up to float rounding of batched kernels).
On a CPU the trunk runs in chunks of at most 16 rows: a row's activations are
2048 x 64 floats per layer, and larger batches were not faster per row (see
docs/timeseries.md), so the chunks bound memory at no cost; on a GPU the
default is one pass.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from .inputs import SeriesRequest
from .model import Backbone, normalise
from .tasks import ForecastTask, SeriesTask

CPU_PASS_ROWS = 16


@dataclasses.dataclass
class BatchResult:
    outputs: dict[str, np.ndarray] | None = None  # public output name -> array
    error: str | None = None  # one line; the task's fault (its head failed), not the client's


@dataclasses.dataclass
class BatchReport:
    rows: int
    tasks: int
    rounds: int
    trunk_rows: int  # rows through the trunk, all rounds together
    seconds: float


@dataclasses.dataclass
class _Row:
    item: int  # index of its request in the batch
    task: SeriesTask
    source: np.ndarray  # the context so far (grows by the median between rounds)
    horizon: int  # steps to produce (0: not a forecast)
    out: np.ndarray | None = None  # [horizon, Q_all] float32, forecasts only
    produced: int = 0
    embedding: torch.Tensor | None = None


class SeriesExecutor:
    def __init__(self, weights: str = "fp32", device: str = "cpu", max_pass_rows: int | None = -1) -> None:
        self.backbone = Backbone(weights, device)
        self.device = self.backbone.device
        self.max_pass_rows = (CPU_PASS_ROWS if self.device.type == "cpu" else None) if max_pass_rows == -1 else max_pass_rows
        self.last: BatchReport | None = None

    def embed(self, rows: Sequence[np.ndarray]) -> torch.Tensor:
        """The series embeddings ``[rows, 128]`` alone (what ``embedding`` returns; classifiers are trained on it)."""
        out = []
        step = self.max_pass_rows or max(1, len(rows))
        with torch.inference_mode():
            for at in range(0, len(rows), step):
                norm = normalise(rows[at : at + step], self.backbone.width)
                values, valid = self.backbone.tensors(norm)
                out.append(self.backbone.embedding(self.backbone.trunk(values, valid)).cpu())
        return torch.cat(out) if out else torch.zeros((0, 128))

    def run_batch(self, items: Sequence[tuple[SeriesTask, SeriesRequest]]) -> list[BatchResult]:
        t0 = time.perf_counter()
        nq = len(self.backbone.quantiles)
        rows: list[_Row] = []
        for i, (task, req) in enumerate(items):
            for r in req.rows:
                h = int(req.horizon or 0) if task.forecasts else 0
                rows.append(_Row(i, task, r, h, np.empty((h, nq), dtype=np.float32) if h else None))
        errors: dict[int, str] = {}  # id(task) -> its failure
        pending, rounds, trunk_rows = rows, 0, 0
        try:
            with torch.inference_mode():
                while pending:
                    rounds += 1
                    trunk_rows += len(pending)
                    step = self.max_pass_rows or len(pending)
                    for at in range(0, len(pending), step):
                        self._round(pending[at : at + step], errors)
                    pending = [r for r in pending if r.out is not None and r.produced < r.horizon
                               and id(r.task) not in errors]
        except Exception as exc:  # noqa: BLE001 - a failure of the shared pass fails every row of this batch
            msg = _line(f"backbone pass failed: {type(exc).__name__}: {exc}")
            return [BatchResult(error=msg) for _ in items]
        results = self._collect(items, rows, errors)
        self.last = BatchReport(rows=len(rows), tasks=len({id(t) for t, _ in items}), rounds=rounds,
                                trunk_rows=trunk_rows, seconds=time.perf_counter() - t0)
        return results

    # --- one round over a chunk of rows ------------------------------------------------------------
    def _round(self, chunk: list[_Row], errors: dict[int, str]) -> None:
        bb = self.backbone
        norm = normalise([r.source for r in chunk], bb.width)
        values, valid = bb.tensors(norm)
        hidden = bb.trunk(values, valid)
        heads: dict[int, tuple[torch.nn.Module, list[int]]] = {}
        embed_at: list[int] = []
        for j, r in enumerate(chunk):
            if r.out is None:
                embed_at.append(j)
            else:
                head = r.task.head if isinstance(r.task, ForecastTask) and r.task.head is not None else bb.head
                heads.setdefault(id(head), (head, []))[1].append(j)
        if embed_at:
            idx = torch.tensor(embed_at, device=hidden.device)
            emb = bb.embedding(hidden.index_select(0, idx)).cpu()
            for k, j in enumerate(embed_at):
                chunk[j].embedding = emb[k : k + 1]
        for head, at in heads.values():
            try:
                idx = torch.tensor(at, device=hidden.device)
                q = bb.quantiles_of(head, hidden.index_select(0, idx), values.index_select(0, idx), valid.index_select(0, idx))
                block = q.cpu().numpy()
                if block.shape != (len(at), bb.native_horizon, len(bb.quantiles)) or not np.isfinite(block).all():
                    raise RuntimeError(f"the head returned non-finite values or shape {list(block.shape)}")
            except Exception as exc:  # noqa: BLE001 - this head failed: the rows of the tasks using it
                for j in at:
                    t = chunk[j].task
                    errors.setdefault(id(t), _line(f"task '{t.name}' failed: {type(exc).__name__}: {exc}"))
                continue
            for k, j in enumerate(at):
                r = chunk[j]
                # as forecast_batch: denormalise in float64, keep float32, feed the float32 median back
                b = block[k] * norm.span[j] + norm.loc[j]
                n = min(bb.native_horizon, r.horizon - r.produced)
                r.out[r.produced : r.produced + n] = b[:n]
                r.produced += n
                if r.produced < r.horizon:
                    r.source = np.concatenate((r.source[-bb.width :], b[:, bb.median_index].astype(np.float32)))

    # --- answers -----------------------------------------------------------------------------------
    def _collect(self, items: Sequence[tuple[SeriesTask, SeriesRequest]], rows: list[_Row],
                 errors: dict[int, str]) -> list[BatchResult]:
        by_item: dict[int, list[_Row]] = {}
        for r in rows:
            by_item.setdefault(r.item, []).append(r)
        results = []
        med = self.backbone.median_index
        for i, (task, _req) in enumerate(items):
            if id(task) in errors:
                results.append(BatchResult(error=errors[id(task)]))
                continue
            mine = by_item.get(i, [])
            try:
                if isinstance(task, ForecastTask):
                    full = np.stack([r.out for r in mine])  # [rows, H, 9]
                    outputs = {"FORECAST": np.ascontiguousarray(full[:, :, med]),
                               "QUANTILES": np.ascontiguousarray(full[:, :, task.quantile_index.numpy()])}
                else:
                    outputs = task.answer(torch.cat([r.embedding for r in mine]))  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - this task's head failed: its request only
                errors[id(task)] = _line(f"task '{task.name}' failed: {type(exc).__name__}: {exc}")
                results.append(BatchResult(error=errors[id(task)]))
                continue
            results.append(BatchResult(outputs=outputs))
        return results


def _line(text: str) -> str:
    return " ".join(text.split())[:300]
