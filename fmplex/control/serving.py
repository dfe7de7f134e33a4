"""Bringing a repository up: server, hosts, then every deployed vFM.

Shared by ``fmplex serve``, the demo and the end-to-end tests, so that all
three start fmplex the same way. Hosts are loaded at server start (the
backbone takes seconds); vFMs are loaded one by one through the repository
API afterwards, so one broken task is reported and skipped instead of
stopping the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fmplex import registry

from .server import Ports, TritonProcess
from .triton_api import Triton


def start(
    repo: Path,
    ports: Ports,
    *,
    prefer: str = "auto",
    log_path: Path | None = None,
    torch_threads: int | None = None,
    inherit_output: bool = False,
    ready_timeout: float = 300.0,
    echo: Callable[[str], None] = lambda _msg: None,
    api_key: str | None = None,
    watchdog: bool = False,
    backbones: list[str] | None = None,
    more_hosts: list[str] | None = None,
    load_vfms: bool = True,
    extra_args: list[str] | None = None,
    on_start: Callable[[TritonProcess], None] | None = None,
) -> TritonProcess:
    """Start tritonserver on ``repo`` and load what the registry says is deployed.

    ``api_key`` locks the server's control APIs (see ``server``); the vFMs are
    then loaded with it. None serves unlocked. A cluster replica passes
    ``backbones`` (the hosts it owns; default all), ``more_hosts`` (host models
    loaded at start beside the registered ones, e.g. a generative backbone's
    streaming twin) and ``load_vfms=False``: it loads vFMs on demand, where
    placement puts them. ``on_start`` is called
    once the process exists, before it is ready (a replica ties the server's
    lifetime to its own there, so that a replica killed during start-up leaves nothing).
    """
    reg = registry.load(repo)
    if backbones is not None:
        missing = sorted(set(backbones) - set(reg.hosts))
        if missing:
            raise registry.RegistryError(f"no host for backbone(s) {', '.join(missing)} in {repo}")
        reg.hosts = {b: h for b, h in reg.hosts.items() if b in backbones}
        reg.tasks = {n: t for n, t in reg.tasks.items() if t.backbone in backbones}
    proc = TritonProcess(
        repo,
        ports,
        prefer=prefer,
        load=[h.model for h in reg.hosts.values()] + list(more_hosts or []),
        extra_args=extra_args,
        log_path=log_path,
        torch_threads=torch_threads,
        inherit_output=inherit_output,
        api_key=api_key,
    )
    proc.start()
    try:
        if on_start is not None:
            on_start(proc)
        proc.wait_ready(timeout=ready_timeout)
        echo(f"hosts ready: {', '.join(h.model for h in reg.hosts.values())}")
        with Triton(f"127.0.0.1:{ports.grpc}", key=api_key) as triton:
            for entry in sorted(reg.tasks.values(), key=lambda t: t.name):
                if not entry.deployed or not load_vfms:
                    continue
                try:
                    triton.load(entry.name)
                    echo(f"  vFM {entry.name} v{entry.deployed_version} ({entry.kind}, slot {entry.slot}) ready")
                except Exception as exc:  # noqa: BLE001 - report and keep serving the others
                    echo(f"  vFM {entry.name} failed to load: {exc}")
        if watchdog:  # reload a host whose stub process died (Triton would not)
            from .watchdog import HostWatchdog  # noqa: PLC0415
            from .workflows import watched_models  # noqa: PLC0415

            watched = watched_models(reg)  # the registered hosts and, e.g., a generative backbone's streaming twin
            proc.watchdog = HostWatchdog(
                f"127.0.0.1:{ports.grpc}",
                f"http://127.0.0.1:{ports.metrics}/metrics",
                watched,
                echo=echo,
                api_key=api_key,
            )
            proc.watchdog.start()
    except BaseException:
        proc.stop()
        raise
    return proc
