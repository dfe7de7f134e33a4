"""Driving Ray Serve for the cluster: start the proxies, apply the generated config, read status.

Used by ``fmplex cluster`` and by the end-to-end test, so both bring the
cluster up the same way. Applying a config goes through the Serve controller's
declarative path (what ``serve deploy`` sends to the dashboard): Serve changes
only what differs, so existing replicas and their loaded vFMs stay. (``serve.run``
from Python would restart every replica.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import APP_NAME, HEAD_RESOURCE, INGRESS, PLACER, ClusterSpec, backbone_deployment, serve_config

LOOPBACK = "127.0.0.1"
_owner = False  # this process started the Ray cluster (init_local), so stopping it is ours to do


class ClusterError(RuntimeError):
    """The cluster could not do what was asked (reported as one line by the CLI)."""


def loopback_only() -> None:
    """Make this process (and the Ray nodes it starts) take 127.0.0.1 as this node's address.

    Ray rewrites a loopback address given to ``ray.init`` into the machine's
    interface address, where a loopback-only GCS does not listen; with this
    it keeps 127.0.0.1, so no byte of the cluster leaves loopback.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants  # noqa: PLC0415

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_local(num_cpus: int = 2, object_store_mb: int = 128) -> Any:
    """Start a one-node Ray cluster owned by this process, on loopback only, carrying the head resource."""
    import ray  # noqa: PLC0415

    global _owner
    loopback_only()
    _owner = True
    return ray.init(
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        resources={HEAD_RESOURCE: 1},
        object_store_memory=object_store_mb * 2**20,
        namespace="fmplex",
        logging_level="warning",
        configure_logging=True,
        log_to_driver=False,
    )


def is_owner() -> bool:
    return _owner


def connect(address: str, auth_mode: str | None = None) -> None:
    """Attach this process to a running Ray cluster.

    ``auth_mode`` is the cluster's ``RAY_AUTH_MODE``: a cluster that
    ``ray.init`` started locally uses token authentication (the token is in
    ``~/.ray/auth_token``), and a driver must say so to be let in.
    """
    if auth_mode and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = auth_mode  # read when ray is first imported
    import ray  # noqa: PLC0415

    if address.split(":")[0] in ("127.0.0.1", "localhost"):
        loopback_only()
    if not ray.is_initialized():
        ray.init(address=address, namespace="fmplex", logging_level="warning", log_to_driver=False)


def start_serve(http_port: int, grpc_port: int, host: str = LOOPBACK) -> None:
    """Start (or attach to) Serve with one HTTP and one gRPC proxy on the head node."""
    from ray import serve  # noqa: PLC0415

    cfg = serve_config("", ClusterSpec(), host=host, http_port=http_port, grpc_port=grpc_port)
    serve.start(proxy_location="HeadOnly", http_options=cfg["http_options"], grpc_options=cfg["grpc_options"])


def apply(repo: Path, spec: ClusterSpec, *, http_port: int, grpc_port: int, host: str = LOOPBACK) -> dict[str, Any]:
    """Deploy ``spec`` declaratively (keeps replicas that stay); the config sent."""
    from ray.serve.context import _get_global_client  # noqa: PLC0415
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415

    config = serve_config(Path(repo).resolve(), spec, host=host, http_port=http_port, grpc_port=grpc_port)
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.parse_obj(config))
    return config


def wait_running(spec: ClusterSpec, timeout: float = 240.0) -> dict[str, int]:
    """Wait until every deployment of ``spec`` runs its target replica count; replicas running per deployment."""
    from ray import serve  # noqa: PLC0415

    want = {PLACER: 1, INGRESS: 1, **{backbone_deployment(b): n for b, n in spec.replicas.items() if n > 0}}
    deadline = time.monotonic() + timeout
    running: dict[str, int] = {}
    last = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            last = f"{app.status}: {app.message}"[:400]
            running = {}
            for name, dep in app.deployments.items():
                running[name] = int(dep.replica_states.get("RUNNING", 0))
            if all(running.get(n, 0) >= k for n, k in want.items()) and str(app.status).endswith("RUNNING"):
                return running
            if str(app.status).endswith("DEPLOY_FAILED"):
                raise ClusterError(f"deploying the fmplex application failed: {last}")
        time.sleep(0.5)
    raise ClusterError(f"the cluster did not reach {want} within {timeout:.0f}s (now {running}; {last})")


def placer_status() -> dict[str, Any]:
    """What the placer knows: replicas with their tasks, bytes, load and health; tasks with their replicas."""
    from ray import serve  # noqa: PLC0415

    return serve.get_deployment_handle(PLACER, APP_NAME).status.remote().result(timeout_s=30)


def wait_replicas_registered(count_by_backbone: dict[str, int], timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the placer knows ``count`` replicas per backbone (they announce themselves)."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = placer_status()
        have: dict[str, int] = {}
        for r in status["replicas"]:
            have[r["backbone"]] = have.get(r["backbone"], 0) + 1
        if all(have.get(b, 0) == n for b, n in count_by_backbone.items()):
            return status
        time.sleep(0.5)
    raise ClusterError(f"replicas did not register with the placer within {timeout:.0f}s: {status.get('replicas')}")
