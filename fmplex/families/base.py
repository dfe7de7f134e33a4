"""The interface every backbone family implements (``BackboneFamily``) and the types it uses.

A *backbone family* is everything the control plane must know about one kind
of foundation model (a text encoder, a decoder LM, a multimodal model split
into stages) to turn it into hosts and tasks into vFMs. The CLI's workflows
(``fmplex.control.workflows``) ask the family of a task's backbone and never
branch on the family themselves, so a new family is one new module here plus
its catalog entries in ``fmplex.backbones``.

Control plane only: a serving process never imports this package.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar

import click

from fmplex import registry
from fmplex.registry import Registry, TaskEntry

from .triton_config import CONFIG

Echo = Callable[[str], None]


class OptionError(ValueError):
    """An option that does not fit the task or backbone: a usage error (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """One kind of task a family builds, as ``fmplex task create --help`` lists it."""

    name: str
    summary: str  # what the task is
    usage: str  # what creating one takes, e.g. "--train data.csv"


@dataclasses.dataclass(frozen=True)
class BuiltTask:
    """What ``build_task`` stored: the registry's output family and one line for the user."""

    outputs: str  # TaskEntry.family: which public outputs its vFMs have
    summary: str  # e.g. "classifier outputs, 1.5 KiB"


class BackboneFamily(abc.ABC):
    """The control-plane side of one backbone family.

    A family supplies its host configs (``init_options``, ``init_hosts``),
    its task kinds and their create options (``kinds``, ``create_options``,
    ``build_task``), the artifact check (``check_artifact``), the Triton models
    a task becomes (``write_task_models``, ``task_models``,
    ``remove_task_models``, ``hosts_of``) and its start-up extras
    (``start_up_models``, ``watched_models``). Options are plain click options:
    the CLI adds every family's options to ``fmplex init`` and ``fmplex task
    create`` and refuses one given for a backbone of another family.
    """

    name: ClassVar[str]  # e.g. "encoder"; the value of fmplex.backbones.FAMILY_OF
    summary: ClassVar[str]  # one line for --help
    default_slots: ClassVar[int] = registry.DEFAULT_SLOTS  # slot pool of a new host
    errors: ClassVar[tuple[type[Exception], ...]] = ()  # the family's own user errors: one line, exit 1

    # --- the catalog ---------------------------------------------------------------------

    @abc.abstractmethod
    def backbones(self) -> dict[str, str]:
        """Backbone name -> one-line description, from ``fmplex.backbones``."""

    @abc.abstractmethod
    def host_models(self, backbone: str) -> list[str]:
        """Every Triton host model of a backbone (a streaming twin and stages included)."""

    # --- host configs: what ``fmplex init`` writes ------------------------------------------

    def init_options(self) -> list[click.Option]:
        """Options of ``fmplex init`` that only this family reads (each with an explicit default)."""
        return []

    @abc.abstractmethod
    def init_hosts(self, repo: Path, backbones: list[str], slots: int, options: dict[str, Any], echo: Echo) -> None:
        """Write each backbone's host config(s) once and register its host.

        Safe to run again: a host already in the registry is left untouched
        (rewriting anything under a host's directory reloads its backbone).
        Echoes one line per host.
        """

    # --- tasks -----------------------------------------------------------------------------

    @abc.abstractmethod
    def kinds(self) -> list[TaskKind]:
        """The task kinds this family builds; the first is the default."""

    def create_options(self) -> list[click.Option]:
        """Options of ``fmplex task create`` that only this family reads (each with an explicit default)."""
        return []

    @abc.abstractmethod
    def build_task(
        self, repo: Path, name: str, version: int, backbone: str, kind: str, options: dict[str, Any], echo: Echo
    ) -> BuiltTask:
        """Build and store task NAME's artifact as REPO/NAME/VERSION, checked as the host will load it.

        ``options`` holds every ``task create`` option by parameter name
        (``source``, ``train_csv`` and the family's own). The workflow has
        already checked the name, the host and the kind; it removes the
        version directory if this raises.
        """

    @abc.abstractmethod
    def check_artifact(self, vdir: Path, backbone: str) -> Any:
        """Load an artifact exactly as the host will, so that what the host would
        refuse is refused before anything reaches the running server."""

    def describe_task(self, repo: Path, entry: TaskEntry, manifest: dict[str, Any]) -> list[tuple[str, str]]:
        """Family-specific lines of ``fmplex task show`` (label, value)."""
        return [("source", f"{manifest.get('source', '')}; created {manifest.get('created', '?')}")]

    # --- the Triton models a task becomes ----------------------------------------------------

    def hosts_of(self, entry: TaskEntry, reg: Registry) -> list[str]:
        """Hosts that must be ready before a task's vFMs load."""
        return self.host_models(entry.backbone)

    @abc.abstractmethod
    def write_task_models(self, repo: Path, entry: TaskEntry, reg: Registry) -> list[str]:
        """Write the configs of a deployed task's Triton models; their names, in load order."""

    def task_models(self, name: str) -> list[str]:
        """Every Triton model ``write_task_models`` writes for task NAME, in load order."""
        return [name]

    def remove_task_models(self, repo: Path, name: str) -> None:
        """Remove what ``write_task_models`` wrote (the artifacts stay)."""
        (Path(repo) / name / CONFIG).unlink(missing_ok=True)

    # --- start-up extras ---------------------------------------------------------------------

    def start_up_models(self, reg: Registry) -> list[str]:
        """Models ``fmplex serve`` loads after the registered hosts and deployed vFMs."""
        return []

    def watched_models(self, reg: Registry) -> list[str]:
        """Hosts besides the registered ones that the watchdog reloads when their stub dies."""
        return []

    # --- helpers for implementations ------------------------------------------------------------

    def own_backbones(self, reg: Registry) -> list[str]:
        """This family's backbones that have a host in ``reg``."""
        return [b for b in reg.hosts if b in self.backbones()]
