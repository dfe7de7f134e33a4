"""The cluster's desired state and the Ray Serve config generated from it.

What the cluster should run (replicas per backbone, placement settings) is a
small JSON file beside the registry, on the same shared storage
(``REPO/fmplex.cluster.json``): it survives any node, and ``fmplex cluster
deploy|undeploy|scale`` edit it and then apply the Serve config generated
from it. Serve compares that config with what runs and only changes the
difference, so scaling a backbone from 2 to 3 replicas keeps the existing two
(and their tritonservers and loaded vFMs). The same generator writes the
``serveConfigV2`` of the Kubernetes RayService (:mod:`fmplex.cluster.kube`).

Pure: no Ray import (the Kubernetes renderer and the unit tests use it alone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fmplex import registry

CLUSTER_FILE = "fmplex.cluster.json"
APP_NAME = "fmplex"
IMPORT_PATH = "fmplex.cluster.deployment:build_app"
PLACER = "Placer"
INGRESS = "Ingress"
TICK_S = 0.5  # placer: liveness checks and hot-task rebalancing; ingress: load reports
HEAD_RESOURCE = "fmplex_head"  # a custom resource only head nodes carry: the placer and ingress live there


def device_resource(group: str) -> str:
    """The custom resource the nodes of one device group carry (a backbone's replicas ask for it)."""
    return f"fmplex_{group}"


def backbone_deployment(backbone: str) -> str:
    """The Serve deployment that runs ``backbone``'s tritonserver replicas."""
    return f"fm-{backbone}"


@dataclasses.dataclass
class ClusterSpec:
    """Replicas per backbone (0 or absent: not deployed) and the placement settings."""

    replicas: dict[str, int] = dataclasses.field(default_factory=dict)
    hot_load: float = 8.0  # requests in flight per holding replica above which a task gets another replica
    cool_load: float = 2.0
    max_replicas_per_task: int = 3
    replica_cpus: float = 0.0  # Ray CPUs reserved per tritonserver replica (0 on a shared test machine)
    replica_gpus: float = 0.0
    one_replica_per_node: bool = True
    devices: dict[str, str] = dataclasses.field(default_factory=dict)  # backbone -> device group (Kubernetes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def spec_path(repo: Path) -> Path:
    return Path(repo) / CLUSTER_FILE


def load_spec(repo: Path) -> ClusterSpec:
    try:
        return ClusterSpec.from_json(json.loads(spec_path(repo).read_text()))
    except FileNotFoundError:
        return ClusterSpec()


def save_spec(repo: Path, spec: ClusterSpec) -> None:
    """Atomic replace, like the registry."""
    path = spec_path(repo)
    fd, tmp = tempfile.mkstemp(prefix=".cluster-", dir=str(path.parent))
    with os.fdopen(fd, "w") as fh:
        json.dump(spec.to_json(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def set_replicas(repo: Path, backbone: str, replicas: int) -> ClusterSpec:
    """Record ``replicas`` for ``backbone`` (checked against the registry); 0 removes it."""
    reg = registry.load(repo)
    if backbone not in reg.hosts:
        known = ", ".join(sorted(reg.hosts)) or "none"
        raise registry.RegistryError(f"no host for backbone '{backbone}' in {repo} (it has: {known})")
    if replicas < 0:
        raise registry.RegistryError("--replicas must be 0 or more")
    spec = load_spec(repo)
    if replicas:
        spec.replicas[backbone] = replicas
    else:
        spec.replicas.pop(backbone, None)
    save_spec(repo, spec)
    return spec


def serve_config(
    repo: str | Path, spec: ClusterSpec, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000
) -> dict[str, Any]:
    """A ``ServeDeploySchema`` document for ``spec`` on the repository at ``repo``.

    ``repo`` is the path every node sees (the shared directory, or the RWX
    volume's mount path on Kubernetes); it is passed as is to the replicas.
    ``host`` is where the proxies listen: loopback locally, 0.0.0.0 in a pod.
    """
    backbones = sorted(b for b, n in spec.replicas.items() if n > 0)
    deployments: list[dict[str, Any]] = [
        {"name": PLACER, "num_replicas": 1},
        {"name": INGRESS, "num_replicas": 1},
    ]
    for b in backbones:
        actor: dict[str, Any] = {"num_cpus": spec.replica_cpus}
        if spec.replica_gpus:
            actor["num_gpus"] = spec.replica_gpus
        if b in spec.devices:  # only nodes of that device group carry the resource
            actor["resources"] = {device_resource(spec.devices[b]): 0.001}
        dep: dict[str, Any] = {"name": backbone_deployment(b), "num_replicas": spec.replicas[b], "ray_actor_options": actor}
        if spec.one_replica_per_node:
            dep["max_replicas_per_node"] = 1
        deployments.append(dep)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {
            "port": grpc_port,
            "grpc_servicer_functions": ["tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"],
        },
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {
                    "repository": str(repo),
                    "backbones": backbones,
                    "hot_load": spec.hot_load,
                    "cool_load": spec.cool_load,
                    "max_replicas_per_task": spec.max_replicas_per_task,
                },
                "deployments": deployments,
            }
        ],
    }
