"""One tritonserver replica of a backbone, as a Ray Serve deployment class, and how to reach it.

Each replica starts and owns a real tritonserver on the shared repository
exactly as ``fmplex serve`` does (:func:`fmplex.control.serving.start`),
loading only its backbone's host; vFMs are loaded onto it by the placer.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from ray import serve

from fmplex import registry
from fmplex.artifacts import version_dir

from . import reaper
from .config import PLACER, backbone_deployment

# What a replica's tritonserver says of a model it does not hold (the table was stale: try another one).
UNKNOWN_MARKERS = ("unknown model", "is not ready", "not found", "is not available")


@dataclasses.dataclass(frozen=True)
class ReplicaRecord:
    """How to reach one replica's tritonserver (announced by the replica itself)."""

    replica: str
    backbone: str
    host_model: str
    address: str  # node IP
    http_port: int
    grpc_port: int
    metrics_port: int
    api_key: str
    budget_bytes: int
    slots: int
    server_pid: int
    node_id: str
    log_path: str

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"


def _host_settings(repo: Path, host_model: str) -> tuple[int, int]:
    """(extension budget in bytes, slots) from the host's config.pbtxt, as the host reads them."""
    text = (repo / host_model / "config.pbtxt").read_text()

    def param(key: str, default: str) -> str:
        marker = f'key: "{key}" value {{ string_value: "'
        i = text.find(marker)
        return text[i + len(marker) : text.index('"', i + len(marker))] if i >= 0 else default

    return int(float(param("extension_budget_mb", "1024")) * 2**20), int(param("slots", "256"))


def artifact_bytes(repo: Path, entry: registry.TaskEntry) -> int:
    """A task's resident size for placement: the files of its deployed version."""
    vdir = version_dir(repo, entry.name, entry.deployed_version or entry.version)
    return sum(p.stat().st_size for p in vdir.iterdir() if p.is_file()) if vdir.is_dir() else 0


class BackboneReplica:
    """One tritonserver holding one backbone's host; vFMs are loaded onto it by the placer."""

    def __init__(self, repository: str, backbone: str, app_name: str = "fmplex") -> None:
        import ray  # noqa: PLC0415

        from fmplex.control import serving  # noqa: PLC0415
        from fmplex.control.server import generate_key  # noqa: PLC0415
        from fmplex.families import family_for  # noqa: PLC0415

        self.repo = Path(repository)
        reg = registry.load(self.repo)
        if backbone not in reg.hosts:
            raise registry.RegistryError(f"no host for backbone '{backbone}' in {self.repo}")
        host_model = reg.hosts[backbone].model
        budget, slots = _host_settings(self.repo, host_model)
        ctx = serve.get_replica_context()
        replica_id = ctx.replica_id.unique_id
        address = ray.util.get_node_ip_address()
        # On a loopback-only node (tests, 'fmplex cluster up') nothing listens beyond 127.0.0.1.
        bind = ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"] if address.startswith("127.") else []
        logs = Path(tempfile.gettempdir()) / "fmplex-cluster"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{backbone_deployment(backbone)}-{replica_id}.log"
        key = generate_key()
        from fmplex.control.server import Ports, free_ports  # noqa: PLC0415

        fixed = os.environ.get("FMPLEX_TRITON_PORTS")  # one replica per pod: known ports (metrics scraping)
        ports = Ports(*(int(p) for p in fixed.split(","))) if fixed else free_ports()
        self.proc = serving.start(
            self.repo,
            ports,
            log_path=log_path,
            api_key=key,
            watchdog=True,
            backbones=[backbone],
            # its other hosts too (a generative backbone's streaming twin, which NAME.stream vFMs run on)
            more_hosts=[m for m in family_for(backbone).host_models(backbone) if m != host_model],
            load_vfms=False,
            extra_args=bind,
            # its tritonserver and stubs die with it, also when Ray kills it (even while starting) or its node goes
            on_start=lambda p: reaper.spawn(p.proc.pid, label=str(self.repo)) if p.proc is not None else None,
        )
        assert self.proc.proc is not None
        self.record = ReplicaRecord(
            replica=replica_id,
            backbone=backbone,
            host_model=host_model,
            address=address,
            http_port=ports.http,
            grpc_port=ports.grpc,
            metrics_port=ports.metrics,
            api_key=key,
            budget_bytes=budget,
            slots=slots,
            server_pid=self.proc.proc.pid,
            node_id=ray.get_runtime_context().get_node_id(),
            log_path=str(log_path),
        )
        self.placer = serve.get_deployment_handle(PLACER, app_name)
        self._announce()

    def _announce(self) -> None:
        # Fire and forget: the placer also learns from later health checks (it may start after us).
        self._pending = self.placer.register.remote(dataclasses.asdict(self.record))

    def check_health(self) -> None:
        """Serve replaces this replica when its tritonserver is gone (the host watchdog handles a dead stub)."""
        proc = self.proc.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"tritonserver (pid {self.record.server_pid}) exited; see {self.record.log_path}")
        self._announce()

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.record)

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.stop(grace=10)  # the reaper exits once the group is empty


def triton_for(record: ReplicaRecord, timeout: float = 60.0) -> Any:
    from fmplex.control.triton_api import Triton  # noqa: PLC0415

    return Triton(record.grpc_url, timeout=timeout, key=record.api_key)


def is_live(record: ReplicaRecord) -> bool:
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(f"{record.http_url}/v2/health/live", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
