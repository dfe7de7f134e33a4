"""What the ``fmplex`` commands do, as functions: init, task create/show, deploy, undeploy, start-up.

Each workflow asks the family of a task's backbone (``fmplex.families``) for
what differs between families and does the rest the same way for every task:
the registry, versions, slots, the order of writes and loads, and rollback
when a load fails. The click commands in ``cli`` only parse and print.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from fmplex import registry
from fmplex.artifacts import ArtifactError, read_manifest, version_dir
from fmplex.families import FAMILIES, family_for
from fmplex.registry import Registry, RegistryError, TaskEntry

from . import repository as repo_ops

Echo = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """What every task has, whatever its family: its share and limits in the scheduler."""

    weight: float = 1.0
    queue_limit: int = 256
    deadline_ms: float | None = None
    description: str = ""


def connect(url: str, repo: Path | None = None, api_key: str | None = None) -> Any:
    """A live server's control client, with the key of a locked server:
    ``api_key`` (--api-key / FMPLEX_API_KEY), else REPO/fmplex.key if present."""
    from .server import read_key_file  # noqa: PLC0415
    from .triton_api import Triton  # noqa: PLC0415

    key = api_key or (read_key_file(repo) if repo is not None else None)
    triton = Triton(url, key=key)
    try:
        triton.require_live()
        triton.check_key()  # before any repository edit: a refused key changes nothing
    except Exception:
        triton.close()
        raise
    return triton


# --- init ----------------------------------------------------------------------------------


def init_repository(
    repo: Path, backbones: list[str], slots: int | None = None, options: dict[str, Any] | None = None, echo: Echo = _quiet
) -> Registry:
    """Write every backbone's hosts (each family its own) and register them; safe to run again.

    ``slots``: None gives each family's default pool. ``options``: the
    families' own init options by parameter name (defaults where missing).
    """
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    if not registry.registry_path(repo).exists():
        registry.save(repo, Registry())
    by_family: dict[str, list[str]] = {}
    for name in backbones:
        by_family.setdefault(family_for(name).name, []).append(name)
    for fam_name, names in by_family.items():
        fam = FAMILIES[fam_name]
        fam.init_hosts(repo, names, slots or fam.default_slots, {**option_defaults(fam.init_options()), **(options or {})}, echo)
    return registry.load(repo)


def option_defaults(options: list[Any]) -> dict[str, Any]:
    """Parameter name -> default of click options (for callers that are not the CLI).

    Families give every option an explicit default (None included): click's
    own marker for "no default" is not a value a family can read."""
    return {opt.name: opt.default for opt in options}


# --- tasks ---------------------------------------------------------------------------------


def create_task(
    repo: Path,
    name: str,
    backbone: str,
    kind: str | None = None,
    options: dict[str, Any] | None = None,
    settings: TaskSettings = TaskSettings(),
    echo: Echo = _quiet,
) -> TaskEntry:
    """Build task NAME on BACKBONE (a new version if it exists) and register it.

    ``kind``: None is the family's first kind. ``options``: ``source``,
    ``train_csv`` and the family's own create options by parameter name.
    """
    registry.check_task_name(name)
    fam = family_for(backbone)
    kinds = [k.name for k in fam.kinds()]
    kind = kind or kinds[0]
    reg = registry.load(repo)
    if backbone not in reg.hosts:
        raise RegistryError(f"repository {repo} has no host for '{backbone}' (run 'fmplex init --backbone {backbone}')")
    if kind not in kinds:
        raise RegistryError(f"kind '{kind}' does not run on {fam.name} backbone '{backbone}' (kinds: {', '.join(kinds)})")
    existing = reg.tasks.get(name)
    if existing is not None and (existing.backbone != backbone or existing.kind != kind):
        raise RegistryError(f"task '{name}' exists as {existing.kind} on {existing.backbone}: delete it or pick another name")
    version = max(repo_ops.task_versions(repo, name) + [0]) + 1
    opts = {**option_defaults(fam.create_options()), "source": None, "train_csv": None, **(options or {})}
    try:
        built = fam.build_task(repo, name, version, backbone, kind, opts, echo)
    except BaseException:
        repo_ops.delete_version(repo, name, version)
        raise
    with registry.editing(repo) as reg:
        entry = reg.tasks.get(name)
        if entry is None:
            entry = reg.tasks[name] = TaskEntry(
                name, backbone, kind, version, settings.weight, settings.queue_limit, settings.deadline_ms,
                description=settings.description, family=built.outputs,
            )  # fmt: skip
        else:
            entry.version = version
            entry.family = built.outputs
        entry = dataclasses.replace(entry)
    echo(f"task {name} v{version} ({kind} on {backbone}, {built.summary}) stored in {version_dir(repo, name, version)}")
    return entry


def show_task(repo: Path, name: str) -> list[tuple[str, str]]:
    """Everything about one task as (label, value) lines: registry entry, then what its family adds."""
    entry = registry.load(repo).task(name)
    fam = family_for(entry.backbone)
    summary = {k.name: k.summary for k in fam.kinds()}.get(entry.kind, "?")
    lines = [
        ("task", entry.name),
        ("kind", f"{entry.kind} ({summary})"),
        ("backbone", f"{entry.backbone} ({fam.name})"),
        ("versions", f"{', '.join(map(str, repo_ops.task_versions(repo, name)))} (newest {entry.version})"),
        ("deployed", f"v{entry.deployed_version} on slot {entry.slot}" if entry.deployed else "no"),
        ("weight", f"{entry.weight:g}"),
        ("queue limit", str(entry.queue_limit)),
        ("deadline", f"{entry.deadline_ms:g} ms" if entry.deadline_ms else "none"),
    ]
    if entry.description:
        lines.append(("description", entry.description))
    manifest = read_manifest(version_dir(repo, name, entry.deployed_version or entry.version))
    return lines + fam.describe_task(repo, entry, manifest)


# --- deploy / undeploy ---------------------------------------------------------------------


def check_deployable(repo: Path, names: list[str], version: int | None = None) -> None:
    """Load every task's artifact as its host will; refuse all if one fails."""
    reg = registry.load(repo)
    for name in names:
        entry = reg.task(name)
        target = version or entry.version
        if target not in repo_ops.task_versions(repo, name):
            raise RegistryError(f"task '{name}' has no version {target}")
        try:
            family_for(entry.backbone).check_artifact(version_dir(repo, name, target), entry.backbone)
        except Exception as exc:  # noqa: BLE001 - any load failure means: do not deploy
            raise ArtifactError(f"task '{name}' v{target} is not deployable: {exc}") from None


def deploy(
    repo: Path, names: list[str], version: int | None = None, triton: Any | None = None, echo: Echo = _quiet, check: bool = True
) -> list[TaskEntry]:
    """Make tasks live: slot + registry, the family's Triton models, then (with a server) load them.

    Every artifact is checked (``check_deployable``; ``check=False``: the
    caller already did) before the registry or the server is touched. The
    registry is written before Triton loads a vFM, so the host knows the slot
    before the first request can reach it. A load that fails leaves the task
    undeployed. Without ``triton`` only the repository is written.
    """
    if check:
        check_deployable(repo, names, version)
    deployed = []
    for name in names:
        with registry.editing(repo) as reg:
            entry = reg.task(name)
            fam = family_for(entry.backbone)
            target = version or entry.version
            if target not in repo_ops.task_versions(repo, name):
                raise RegistryError(f"task '{name}' has no version {target}")
            old_slot = entry.slot if entry.deployed else None
            entry.slot = reg.allocate_slot(entry.backbone)
            entry.deployed_version = target
            models = fam.write_task_models(repo, entry, reg)
            hosts = fam.hosts_of(entry, reg)
            host = reg.hosts[entry.backbone].model
            done = dataclasses.replace(entry)
        if triton is not None:
            try:
                for h in hosts:
                    if not triton.ready(h):
                        echo(f"loading host {h} ...")
                        triton.load(h)
                secs = triton.load(models[0])
                for extra in models[1:]:  # e.g. a generative task's streaming vFM NAME.stream
                    triton.load(extra)
            except Exception:
                forget(repo, name)  # leave the repository as the server sees it: not deployed
                raise
            echo(f"deployed {name} v{target} on {host} slot {done.slot} ({secs * 1000:.0f} ms)")
        else:
            echo(f"{name} v{target} on {host} slot {done.slot}: written; 'fmplex serve' will load it")
        if old_slot is not None and old_slot != done.slot:
            echo(f"  (slot {old_slot} retired)")
        deployed.append(done)
    return deployed


def forget(repo: Path, name: str) -> None:
    """Mark a task undeployed and remove its Triton models' configs (the artifacts stay)."""
    with registry.editing(repo) as reg:
        entry = reg.tasks.get(name)
        if entry is not None:
            entry.slot = entry.deployed_version = None
    if entry is not None:
        family_for(entry.backbone).remove_task_models(repo, name)


def undeploy(repo: Path, name: str, triton: Any | None = None) -> None:
    """Unload a task's Triton models (the shared hosts keep running), then free its slot."""
    entry = registry.load(repo).task(name)
    if not entry.deployed:
        raise RegistryError(f"task '{name}' is not deployed")
    if triton is not None:
        for model in reversed(family_for(entry.backbone).task_models(name)):
            triton.unload(model)
    forget(repo, name)


# --- serve ---------------------------------------------------------------------------------


def start_up_models(repo: Path) -> list[str]:
    """What every family loads after the hosts and vFMs that ``serving.start`` loads."""
    reg = registry.load(repo)
    return [m for fam in FAMILIES.values() for m in fam.start_up_models(reg)]


def watched_models(reg: Registry) -> list[str]:
    """Hosts the watchdog reloads when their stub dies: the registered ones and every family's extras."""
    return [h.model for h in reg.hosts.values()] + [m for fam in FAMILIES.values() for m in fam.watched_models(reg)]


def start_up(url: str, repo: Path, api_key: str | None, echo: Echo = _quiet) -> list[str]:
    """At ``fmplex serve``, after ``serving.start``: load the families' start-up models
    (a generative backbone's streaming twin and its ``NAME.stream`` vFMs). Returns what
    was loaded; a failure is reported and the others still load."""
    from .triton_api import Triton  # noqa: PLC0415

    names = start_up_models(repo)
    done: list[str] = []
    if not names:
        return done
    with Triton(url, key=api_key, timeout=600.0) as triton:
        for model in names:
            try:
                triton.load(model)
                done.append(model)
                echo(f"  {'host' if model.startswith('fm.') else 'vFM'} {model} ready")
            except Exception as exc:  # noqa: BLE001 - report and keep serving the others
                echo(f"  {model} failed to load: {exc}")
    return done
