"""Per-row changes to shared Linears inside one batch (segmented LoRA, IA3, adapters).

Rows (encoder) or flat tokens (decoder) of many tasks go through one shared
``y = x W^T + b``. Each task changes the result of its own rows only: the
shared product is computed once for all rows, then every task's rows are
gathered by index, changed, and scattered back (the segmented-gather idea of
Punica/LoRAX, in plain torch). Which rows belong to which task is a
:class:`Segments`, built once per batch by the caller and passed explicitly to
every projection, as LoRAX passes its adapter batch metadata; nothing is kept
in thread-local state. Both families use this module: the encoder's
executor (:mod:`fmplex.triton_backend.segments`) and the decoder's engine
(:mod:`fmplex.generative.forward`).

A task ("owner") is anything with a ``deltas`` mapping from a projection key
(whatever the family uses to name its Linears) to a :class:`RowDelta`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F


class RowDelta(Protocol):
    """What a task makes of a shared Linear's output for its own rows."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The task's result for these rows, given their input ``x`` and shared output ``y``."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class LoraDelta:
    """PEFT ``lora.Linear``: ``y + scale · B (A x)`` (dropout is off at inference)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    def __call__(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return y + F.linear(F.linear(x, self.a), self.b) * self.scale

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclasses.dataclass(frozen=True, eq=False)
class Ia3Delta:
    """PEFT ``ia3.Linear``: a learned vector scales the input of a feed-forward
    Linear (``W (l ⊙ x) + b``) or the output of any other (``l ⊙ (W x + b)``)."""

    vector: torch.Tensor  # [in] if feedforward else [out]
    feedforward: bool

    def __call__(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.feedforward:
            return F.linear(x * self.vector, weight, bias)
        return y * self.vector

    @property
    def nbytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()


@dataclasses.dataclass(frozen=True)
class Segments:
    """Which rows of a batch belong to which owner (owners without deltas left out)."""

    groups: tuple[tuple[Mapping[Hashable, RowDelta], torch.Tensor], ...] = ()

    @classmethod
    def of_rows(cls, owners: Sequence[Any], device: torch.device | str | None = None) -> Segments:
        """``owners[i]`` owns row i (None: a plain row)."""
        by_owner: dict[int, tuple[Any, list[int]]] = {}
        for i, owner in enumerate(owners):
            if owner is not None and owner.deltas:
                by_owner.setdefault(id(owner), (owner, []))[1].append(i)
        return cls(tuple((o.deltas, torch.tensor(rows, dtype=torch.long, device=device)) for o, rows in by_owner.values()))

    @classmethod
    def of_tokens(cls, owners: Sequence[Any], row_of_token: torch.Tensor) -> Segments:
        """A flat batch of tokens: ``row_of_token[t]`` is the row (index into ``owners``) of token t."""
        by_row = cls.of_rows(owners)
        return cls(
            tuple((d, torch.nonzero(torch.isin(row_of_token, rows), as_tuple=True)[0]) for d, rows in by_row.groups)
        )

    def __bool__(self) -> bool:
        return bool(self.groups)


NO_SEGMENTS = Segments()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: Hashable, segments: Segments) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with each owner's delta for ``key`` on its own rows (dim 0 of ``x``)."""
    y = F.linear(x, weight, bias)
    for deltas, idx in segments.groups:
        delta = deltas.get(key)
        if delta is not None:
            y.index_copy_(0, idx, delta(x.index_select(0, idx), y.index_select(0, idx), weight, bias))
    return y
