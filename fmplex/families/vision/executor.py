"""One backbone pass over the rows of many vision tasks, then each task's head on its own rows.

The executor knows torch and the network, nothing of Triton or scheduling.
:meth:`VisionExecutor.run_batch` takes ``(task, pixels)`` pairs (one per
request, pixels already decoded and checked by :mod:`.preprocess`) and
returns one :class:`BatchResult` per pair, in order, each holding outputs or
an error; it never raises for one task's fault.

The pass (inter-task batching):

1. the stem runs once on every row;
2. stage by stage, the rows still in the shared pass run the shared stage;
   before stage ``s``, the rows of tasks forked at ``s`` leave it and run the
   task's own stages, all rows of a task together (intra-task batching) —
   so the shared pass stops below the lowest fork point for those rows only;
3. inside a shared block, the rows of a LoRA task get that task's delta on
   the block's 1x1 convolutions (computed on those rows alone);
4. global average pooling, then each task's head on its own rows.

Rows of a request stay together and in order, so each request's answer is
the slice of its task's output that it sent.

On a CPU the shared pass runs in chunks of at most ``max_pass_rows`` rows
(default 8; a task's rows may span chunks, its head still runs once on all of
them): every operation of the network in eval mode is per row, so the answers
do not depend on the chunking, while the early stages' activation maps
(~5 MB per row) of a large batch outgrow the CPU caches (see docs/vision.md
for the measurement). On a GPU the default is one pass.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import model as net
from .tasks import TaskOutputs, VisionTask

CPU_PASS_ROWS = 8


@dataclasses.dataclass
class BatchResult:
    outputs: TaskOutputs | None = None
    error: str | None = None  # one line; the task's fault (its body or head failed), not the client's


@dataclasses.dataclass
class BatchReport:
    rows: int
    tasks: int
    seconds: float


@dataclasses.dataclass
class _Group:
    """The rows of one task in this batch: its requests, contiguous."""

    task: VisionTask
    members: list[int]  # indexes into the batch's items
    counts: list[int]  # rows per member
    pooled: torch.Tensor | None = None
    error: str | None = None

    @property
    def rows(self) -> int:
        return sum(self.counts)


class VisionExecutor:
    def __init__(self, device: str = "cpu", state: dict[str, Any] | None = None, max_pass_rows: int | None = -1) -> None:
        self.device = torch.device(device)
        self.model = net.build_model(state).to(self.device)
        self.max_pass_rows = (CPU_PASS_ROWS if self.device.type == "cpu" else None) if max_pass_rows == -1 else max_pass_rows
        self.last: BatchReport | None = None

    def pooled_features(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The backbone's pooled features alone (what ``embedding`` returns; heads are trained on them)."""
        with torch.inference_mode():
            return net.features(self.model, self._tensor(pixels)).cpu()

    def _tensor(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        return t.to(self.device, torch.float32)

    def run_batch(self, items: Sequence[tuple[VisionTask, torch.Tensor | np.ndarray]]) -> list[BatchResult]:
        t0 = time.perf_counter()
        groups: dict[int, _Group] = {}
        for i, (task, pixels) in enumerate(items):
            g = groups.setdefault(id(task), _Group(task, [], []))
            g.members.append(i)
            g.counts.append(int(pixels.shape[0]))
        order = list(groups.values())
        pixels = torch.cat([self._tensor(items[i][1]) for g in order for i in g.members]) if items else None
        results = [BatchResult() for _ in items]
        if pixels is None or pixels.shape[0] == 0:
            return results
        try:
            with torch.inference_mode():
                self._forward_in_chunks(pixels, order)
        except Exception as exc:  # noqa: BLE001 - a failure of the shared pass fails every row of this batch
            msg = _line(f"backbone pass failed: {type(exc).__name__}: {exc}")
            return [BatchResult(error=msg) for _ in items]
        for g in order:
            self._answer(g, items, results)
        self.last = BatchReport(rows=int(pixels.shape[0]), tasks=len(order), seconds=time.perf_counter() - t0)
        return results

    # --- the pass ------------------------------------------------------------------------------
    def _forward_in_chunks(self, pixels: torch.Tensor, order: list[_Group]) -> None:
        """:meth:`_forward` over chunks of at most ``max_pass_rows`` rows; each group's pooled rows joined again."""
        k = self.max_pass_rows
        if not k or pixels.shape[0] <= k:
            self._forward(pixels, order)
            return
        chunks: list[list[tuple[_Group, int, int]]] = []  # (group, first row in pixels, rows)
        chunk: list[tuple[_Group, int, int]] = []
        room, at = k, 0
        for g in order:
            left = g.rows
            while left:
                n = min(left, room)
                chunk.append((g, at, n))
                at, left, room = at + n, left - n, room - n
                if room == 0:
                    chunks.append(chunk)
                    chunk, room = [], k
        if chunk:
            chunks.append(chunk)
        parts: dict[int, list[torch.Tensor]] = {id(g): [] for g in order}
        for chunk in chunks:
            sub = [_Group(g.task, [], [n]) for g, _, n in chunk]
            self._forward(torch.cat([pixels[a : a + n] for _, a, n in chunk]), sub)
            for (g, _, _), s in zip(chunk, sub):
                if s.error is not None:
                    g.error = g.error or s.error
                elif s.pooled is not None:
                    parts[id(g)].append(s.pooled)
        for g in order:
            if g.error is None:
                g.pooled = torch.cat(parts[id(g)])

    def _forward(self, pixels: torch.Tensor, order: list[_Group]) -> None:
        x = net.stem(self.model, pixels)
        shared = list(order)  # groups whose rows are in x, in x's row order
        for s in range(net.N_STAGES + 1):
            leaving = [g for g in shared if g.task.fork_point == s]
            if leaving:
                keep, starts = [], _starts(shared)
                for g, start in zip(shared, starts):
                    if g in leaving:
                        self._fork(g, x[start : start + g.rows])
                    else:
                        keep.append(torch.arange(start, start + g.rows, device=x.device))
                shared = [g for g in shared if g not in leaving]
                if not shared:
                    return
                x = x.index_select(0, torch.cat(keep))
            if s == net.N_STAGES:
                break
            x = net.run_stage(self.model, s, x, self._hook(shared, s))
        pooled = net.pool(x)
        for g, start in zip(shared, _starts(shared)):
            g.pooled = pooled[start : start + g.rows]

    def _fork(self, g: _Group, x: torch.Tensor) -> None:
        try:
            g.pooled = net.pool(g.task.run_own(x))
        except Exception as exc:  # noqa: BLE001 - this task's own stages failed: its rows only
            g.error = _line(f"task '{g.task.manifest.get('task', '?')}' failed: {type(exc).__name__}: {exc}")

    def _hook(self, shared: list[_Group], stage: int) -> net.PointwiseHook | None:
        with_delta = [(g, start) for g, start in zip(shared, _starts(shared)) if stage in g.task.lora_blocks]
        if not with_delta:
            return None

        def hook(block: int, which: str, x_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for g, start in with_delta:
                if g.error is not None:
                    continue
                try:
                    delta = g.task.pointwise_delta(block, which, x_in[start : start + g.rows])
                except Exception as exc:  # noqa: BLE001 - this task's delta failed: its rows only (they ride on, unanswered)
                    g.error = _line(f"task '{g.task.manifest.get('task', '?')}' failed: {type(exc).__name__}: {exc}")
                    continue
                if delta is not None:
                    y[start : start + g.rows] += delta  # y is this convolution's fresh output
            return y

        return hook

    def _answer(self, g: _Group, items: Sequence[Any], results: list[BatchResult]) -> None:
        out: TaskOutputs | None = None
        if g.error is None and g.pooled is not None:
            try:
                out = g.task.head(g.pooled)
                if out.out.shape[0] != g.rows:
                    raise ValueError(f"head returned {out.out.shape[0]} rows for {g.rows}")
            except Exception as exc:  # noqa: BLE001 - the task's head failed: its rows only
                g.error = _line(f"task '{g.task.manifest.get('task', '?')}' failed: {type(exc).__name__}: {exc}")
        start = 0
        for i, n in zip(g.members, g.counts):
            if g.error is not None:
                results[i] = BatchResult(error=g.error)
            else:
                assert out is not None
                results[i] = BatchResult(outputs=TaskOutputs(
                    out=out.out[start : start + n], txt=None if out.txt is None else out.txt[start : start + n]
                ))
            start += n


def _starts(groups: list[_Group]) -> list[int]:
    starts, at = [], 0
    for g in groups:
        starts.append(at)
        at += g.rows
    return starts


def _line(text: str) -> str:
    return " ".join(text.split())[:300]
