"""The task registry: which task (and version) answers on which host slot.

The control plane owns it; hosts only read it. It is one JSON file at the root
of the model repository (``fmplex.registry.json``) — outside every model
directory, because Triton reloads a model when anything under its directory
changes, and Triton ignores plain files at the repository root. Writes are
atomic (write, fsync, rename), so a host never reads half a file, and
read-modify-write cycles of the CLI hold an advisory lock.

Changing a weight or queue limit is an edit of this file and nothing else: the
host notices the new file (inode/mtime/size) on its next request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

REGISTRY_FILE = "fmplex.registry.json"
LOCK_FILE = "fmplex.registry.lock"
FORMAT = "fmplex-registry/1"
DEFAULT_SLOTS = 256

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class RegistryError(ValueError):
    """A registry operation that cannot be done (bad name, no free slot...)."""


def check_task_name(name: str) -> str:
    """Refuse names that are not plain identifiers (no '/', '..', dots, spaces).

    Task names become directory and Triton model names; anything else could
    escape the repository or collide with a host (hosts are ``fm.<backbone>``).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(
            f"invalid task name {name!r}: use 1-63 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


@dataclasses.dataclass
class TaskEntry:
    name: str
    backbone: str
    kind: str
    version: int  # newest built version
    weight: float = 1.0
    queue_limit: int = 256
    deadline_ms: float | None = None
    deployed_version: int | None = None
    slot: int | None = None
    description: str = ""
    family: str = ""  # embedding | classifier | token (public outputs); "" = derived from kind
    pinned: bool = False  # keep its extension resident whatever the host's memory budget

    @property
    def outputs_family(self) -> str:
        if self.family:
            return self.family
        return "classifier" if self.kind == "classifier" else "embedding"

    @property
    def deployed(self) -> bool:
        return self.slot is not None and self.deployed_version is not None


@dataclasses.dataclass
class HostEntry:
    backbone: str
    model: str  # Triton model name of the host, e.g. fm.minilm
    slots: int = DEFAULT_SLOTS
    next_slot: int = 0  # round-robin cursor: a freed slot is not reused at once


@dataclasses.dataclass
class Registry:
    hosts: dict[str, HostEntry] = dataclasses.field(default_factory=dict)
    tasks: dict[str, TaskEntry] = dataclasses.field(default_factory=dict)
    generation: int = 0

    # --- slots -------------------------------------------------------------
    def slot_map(self, backbone: str) -> dict[int, TaskEntry]:
        return {t.slot: t for t in self.tasks.values() if t.backbone == backbone and t.deployed}  # type: ignore[misc]

    def allocate_slot(self, backbone: str) -> int:
        host = self.hosts.get(backbone)
        if host is None:
            raise RegistryError(f"no host for backbone '{backbone}' in this repository (run 'fmplex init')")
        used = set(self.slot_map(backbone))
        for i in range(host.slots):
            slot = (host.next_slot + i) % host.slots
            if slot not in used:
                host.next_slot = (slot + 1) % host.slots
                return slot
        raise RegistryError(f"all {host.slots} slots of host '{host.model}' are in use: undeploy a task first")

    def task(self, name: str) -> TaskEntry:
        try:
            return self.tasks[name]
        except KeyError:
            raise RegistryError(f"no task named '{name}'") from None

    # --- (de)serialisation -------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generation": self.generation,
            "hosts": {k: dataclasses.asdict(v) for k, v in sorted(self.hosts.items())},
            "tasks": {k: dataclasses.asdict(v) for k, v in sorted(self.tasks.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Registry:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RegistryError(f"not an fmplex registry (format {got!r}, expected {FORMAT!r})")
        return cls(
            hosts={k: HostEntry(**v) for k, v in data.get("hosts", {}).items()},
            tasks={k: TaskEntry(**v) for k, v in data.get("tasks", {}).items()},
            generation=int(data.get("generation", 0)),
        )


def registry_path(repo: Path) -> Path:
    return Path(repo) / REGISTRY_FILE


def load(repo: Path) -> Registry:
    path = registry_path(repo)
    try:
        with open(path, encoding="utf-8") as fh:
            return Registry.from_json(json.load(fh))
    except FileNotFoundError:
        raise RegistryError(f"{repo} is not an fmplex repository (no {REGISTRY_FILE}; run 'fmplex init {repo}')") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None


def save(repo: Path, reg: Registry) -> None:
    """Atomic replace: readers see the old file or the new one, never a mix."""
    reg.generation += 1
    path = registry_path(repo)
    fd, tmp = tempfile.mkstemp(prefix=".registry-", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the server may run as another user
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(reg.to_json(), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def editing(repo: Path) -> Iterator[Registry]:
    """Read-modify-write under an advisory lock; saved only if the block succeeds."""
    lock = Path(repo) / LOCK_FILE
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            reg = load(repo)
            yield reg
            save(repo, reg)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class RegistryView:
    """A host's cached view: re-read only when the file on disk changed.

    One ``os.stat`` per call is the price of never routing a request with a
    stale slot map (a slot can be given to another task after an undeploy).
    """

    def __init__(self, repo: Path) -> None:
        self.repo = Path(repo)
        self._key: tuple[int, int, int] | None = None
        self._reg = Registry()
        self.reloads = 0

    def current(self) -> Registry:
        try:
            st = os.stat(registry_path(self.repo))
        except FileNotFoundError:
            return self._reg
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            try:
                self._reg = load(self.repo)
                self._key = key
                self.reloads += 1
            except RegistryError:
                pass  # keep serving with the last good view
        return self._reg
