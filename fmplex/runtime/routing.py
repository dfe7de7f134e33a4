"""Slot routing: which task a request is for, from the outputs Triton asks of the host.

A vFM is an ensemble with one step on its host that requests the host
outputs of the slot the control plane gave its task (``OUT_17``, ``TXT_17``,
``GEN_TEXT_17`` ...). The host maps the slot to the task through the
registry; on an unknown slot it rereads the registry at once (a task deployed
a moment ago). A request must name the outputs of exactly one slot, so a
client cannot reach another task's slot through a vFM. Pure Python (no Triton).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from fmplex.registry import Registry, RegistryView, TaskEntry

from .validation import RequestError


@dataclasses.dataclass(frozen=True)
class Route:
    """A request's task: its registry entry, slot and the slot outputs wanted."""

    entry: TaskEntry
    slot: int
    wanted: frozenset[str]

    @property
    def version(self) -> int:
        return int(self.entry.deployed_version or self.entry.version)


@dataclasses.dataclass(eq=False)
class Job:
    """What a scheduled host's scheduler carries for one routed request (its opaque payload)."""

    request: Any
    answer: Any  # the request's ledger Answer
    entry: TaskEntry
    slot: int
    wanted: frozenset[str]
    data: Any  # the host's decoded request: the encoder's Rows, a family's decoded inputs
    task: Any = None  # the loaded task, when decoding needed it


class SlotRouter:
    """Maps ``requested_output_names()`` to a :class:`Route` of one host.

    ``slot_of`` parses an output name (None: not a slot output); ``pattern``
    names the accepted outputs in errors; ``single_output`` demands exactly one
    output (a text-generation host answers on one tensor).
    """

    def __init__(self, view: RegistryView, backbone: str, host: str, slots: int,
                 slot_of: Callable[[str], int | None], pattern: str, single_output: bool = False) -> None:  # fmt: skip
        self.view = view
        self.backbone = backbone
        self.host = host
        self.slots = slots
        self.slot_of = slot_of
        self.pattern = pattern
        self.single_output = single_output

    def route(self, names: Iterable[str], reg: Registry) -> Route:
        wanted = frozenset(names)
        slots = {self.slot_of(n) for n in wanted}
        if self.single_output and (len(wanted) != 1 or None in slots):
            raise RequestError(f"request exactly one slot output {self.pattern} (call a task's vFM), got {sorted(wanted)}")
        if not wanted or None in slots or len(slots) != 1:
            raise RequestError(f"request slot outputs of one task ({self.pattern}), got {sorted(wanted)}")
        slot = slots.pop()
        assert slot is not None
        if not 0 <= slot < self.slots:
            raise RequestError(f"slot {slot} is outside this host's {self.slots} slots")
        entry = reg.slot_map(self.backbone).get(slot)
        if entry is None:  # at once on an unknown slot: the task may have just been deployed
            entry = self.view.current().slot_map(self.backbone).get(slot)
        if entry is None:
            raise RequestError(f"no task is deployed on slot {slot} of {self.host}")
        return Route(entry, slot, wanted)
