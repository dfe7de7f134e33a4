"""A local multi-node cluster on one machine, for the end-to-end test and the calibration benchmark.

Both start it the same way: a ``ray.cluster_utils.Cluster`` (a head carrying
the head resource, plus worker nodes; all on 127.0.0.1), Serve with one HTTP
and one gRPC proxy, and the fmplex application applied from a
:class:`~fmplex.cluster.config.ClusterSpec`. Leaving the context shuts Serve,
the driver and every node down (and with them every tritonserver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from fmplex import registry

from . import local
from .config import HEAD_RESOURCE, ClusterSpec

OUTPUT = {"classifier": "LOGITS", "embedding": "EMBEDDING"}  # the output a task of each family answers on


def add_tasks(repo: Path, extra: int) -> dict[str, str]:
    """Register ``extra`` tasks that reuse the repository's deployed classifier and embedding tasks'
    artifacts, deploy them through ``fmplex deploy --offline`` (the single-server path), and return
    every deployed classifier and embedding task's output name."""
    reg = registry.load(repo)
    sources = sorted(n for n, t in reg.tasks.items() if t.deployed and t.outputs_family in OUTPUT)
    names = []
    with registry.editing(repo) as reg:
        for i in range(extra):
            src = reg.tasks[sources[i % len(sources)]]
            name = f"task{i:02d}"
            shutil.copytree(repo / src.name / str(src.deployed_version), repo / name / "1")
            reg.tasks[name] = dataclasses.replace(src, name=name, version=1, slot=None, deployed_version=None)
            names.append(name)
    if names:
        fmplex = str(Path(sys.executable).parent / "fmplex")
        subprocess.run([fmplex, "deploy", "--offline", *names, "--repo", str(repo)], check=True, capture_output=True, timeout=300)
    reg = registry.load(repo)
    return {n: OUTPUT[t.outputs_family] for n, t in reg.tasks.items() if t.deployed and t.outputs_family in OUTPUT}


@dataclasses.dataclass
class LocalCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    repo: Path
    spec: ClusterSpec
    http_port: int
    grpc_port: int

    def apply(self) -> None:
        """Apply ``spec`` (after editing it) and wait until it runs."""
        local.apply(self.repo, self.spec, http_port=self.http_port, grpc_port=self.grpc_port)
        local.wait_running(self.spec, timeout=240)
        local.wait_replicas_registered({b: n for b, n in self.spec.replicas.items()})


TAG_VAR = "FMPLEX_TEST_TAG"  # set by a test; every process it starts inherits it (Ray, tritonserver, stubs, reapers)


def tagged_processes(tag: str) -> dict[int, str]:
    """Live processes (not zombies, not this one) whose environment has ``FMPLEX_TEST_TAG=tag``: pid -> command line.

    The environment is inherited down every chain a test starts (Ray's raylets
    and workers, a replica's tritonserver and its Python stubs, a reaper), and
    kept by a process that lost its parent, so an orphan is found too.
    """
    want = f"{TAG_VAR}={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if want not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found[int(entry)] = cmd[:200]
    return found


def wait_none_left(tag: str, timeout: float = 30.0) -> dict[int, str]:
    """Wait until no process carries ``tag`` (see :func:`tagged_processes`); what is still left."""
    deadline = time.monotonic() + timeout
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@contextlib.contextmanager
def local_cluster(repo: Path, spec: ClusterSpec, workers: int = 2) -> Iterator[LocalCluster]:
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    from fmplex.control.server import free_ports  # noqa: PLC0415

    local.loopback_only()
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 78 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, "resources": {HEAD_RESOURCE: 1}, **node})
    try:
        for _ in range(workers):
            cluster.add_node(**node)
        ray.init(address=cluster.address, namespace="fmplex", log_to_driver=False)
        ports = free_ports()
        local.start_serve(ports.http, ports.grpc)
        lc = LocalCluster(cluster, repo, spec, ports.http, ports.grpc)
        lc.apply()
        yield lc
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
