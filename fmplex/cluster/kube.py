"""Kubernetes manifests for the cluster: a KubeRay ``RayService`` and what goes around it.

A Helm-less renderer: plain Python data turned into one multi-document YAML.
It writes

- a ``RayService`` (ray.io/v1): a head group (the Serve controller, proxies,
  placer and ingress: it carries the ``fmplex_head`` resource and no CPUs for
  replicas) and one worker group per device type (each node carries
  ``fmplex_<device>``; a backbone's replicas ask for their device's resource),
  with ``serveConfigV2`` generated from the fmplex repository by the same
  :func:`fmplex.cluster.config.serve_config` that ``fmplex cluster`` applies;
- the artifact volume: a ReadWriteMany ``PersistentVolumeClaim`` mounted at the
  same path on every pod (the repository: registry, host configs, task artifacts);
- ``Service`` objects for the HTTP (KServe v2) and gRPC endpoints, and a headless
  one over the worker pods' tritonserver metrics port;
- a ``ServiceMonitor`` (Prometheus operator) scraping those metrics.

Each worker pod runs one tritonserver replica (``max_replicas_per_node: 1``)
on fixed ports (``FMPLEX_TRITON_PORTS``), so the metrics port is known.
No Kubernetes API is needed to render or to check: ``make test`` validates the
core kinds, and the RayService's pod templates as ``PodTemplate``s, with
``kubernetes-validate``'s bundled schemas, and ``serveConfigV2`` with Ray's own
``ServeDeploySchema``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fmplex import registry

from .config import HEAD_RESOURCE, ClusterSpec, device_resource, serve_config

RAY_IMAGE_DEFAULT = "fmplex:0.1.0"  # an image with fmplex installed with the 'cluster' extra
MOUNT = "/repository"
TRITON_PORTS = (8100, 8101, 8102)  # http, grpc, metrics of the tritonserver in each worker pod
HTTP_PORT, GRPC_PORT = 8000, 9000


@dataclasses.dataclass(frozen=True)
class DeviceGroup:
    """One worker group: pods of one device type."""

    name: str  # e.g. "cpu", "gpu"
    pods: int = 2
    max_pods: int = 8
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0  # nvidia.com/gpu per pod


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fmplex", "app.kubernetes.io/component": name}


def _container(name: str, image: str, cpu: str, memory: str, gpus: int, ports: list[dict[str, Any]], env: list[dict[str, str]]) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
            {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
            *env,
        ],
        "ports": ports,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "repository", "mountPath": MOUNT}],
    }


def _pod_template(component: str, container: dict[str, Any], claim: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": _labels(component)},
        "spec": {
            "containers": [container],
            "volumes": [{"name": "repository", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def render(
    repo: Path,
    spec: ClusterSpec,
    *,
    name: str = "fmplex",
    namespace: str = "default",
    image: str = RAY_IMAGE_DEFAULT,
    groups: tuple[DeviceGroup, ...] = (DeviceGroup("cpu"),),
    device_of: dict[str, str] | None = None,
    storage: str = "20Gi",
    storage_class: str | None = None,
) -> list[dict[str, Any]]:
    """The manifests for ``spec`` (replicas per backbone) on the repository ``repo``.

    ``device_of`` maps a backbone to a device group (default: the first group).
    The repository is read here only to check the backbones; pods read it
    from the volume at ``MOUNT``.
    """
    reg = registry.load(repo)
    unknown = sorted(set(spec.replicas) - set(reg.hosts))
    if unknown:
        raise registry.RegistryError(f"backbone(s) {', '.join(unknown)} have no host in {repo}")
    group_names = [g.name for g in groups]
    device_of = {b: (device_of or {}).get(b, group_names[0]) for b in spec.replicas}
    bad = sorted({d for d in device_of.values() if d not in group_names})
    if bad:
        raise ValueError(f"device group(s) {', '.join(bad)} not among the worker groups {group_names}")
    kube_spec = dataclasses.replace(spec, devices=device_of, replica_cpus=0.0)
    config = serve_config(MOUNT, kube_spec, host="0.0.0.0", http_port=HTTP_PORT, grpc_port=GRPC_PORT)
    import yaml  # noqa: PLC0415

    claim = f"{name}-repository"
    head_ports = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": HTTP_PORT, "name": "serve"},
        {"containerPort": GRPC_PORT, "name": "grpc"},
        {"containerPort": 8080, "name": "ray-metrics"},
    ]
    head = _pod_template("head", _container("ray-head", image, "2", "4Gi", 0, head_ports, []), claim)
    workers = []
    for g in groups:
        ports = [{"containerPort": p, "name": n} for p, n in zip(TRITON_PORTS, ("triton-http", "triton-grpc", "triton-metrics"))]
        env = [{"name": "FMPLEX_TRITON_PORTS", "value": ",".join(str(p) for p in TRITON_PORTS)}]
        tmpl = _pod_template(f"worker-{g.name}", _container("ray-worker", image, g.cpu, g.memory, g.gpus, ports, env), claim)
        workers.append(
            {
                "groupName": g.name,
                "replicas": g.pods,
                "minReplicas": 0,
                "maxReplicas": g.max_pods,
                "rayStartParams": {"resources": f'"{{\\"{device_resource(g.name)}\\": 1}}"'},
                "template": tmpl,
            }
        )
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels("rayservice")},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {
                        "dashboard-host": "0.0.0.0",
                        "num-cpus": "0",  # no replica on the head; the placer and ingress ask for fmplex_head
                        "resources": f'"{{\\"{HEAD_RESOURCE}\\": 1}}"',
                    },
                    "template": head,
                },
                "workerGroupSpecs": workers,
            },
        },
    }
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace, "labels": _labels("repository")},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": storage}}},
    }
    if storage_class:
        pvc["spec"]["storageClassName"] = storage_class
    # KubeRay labels the head pod ray.io/node-type=head and names it after the RayService's cluster.
    head_selector = {"ray.io/node-type": "head", **_labels("head")}
    services = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-http", "namespace": namespace, "labels": _labels("http")},
            "spec": {"selector": head_selector, "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-grpc", "namespace": namespace, "labels": _labels("grpc")},
            "spec": {
                "selector": head_selector,
                "ports": [{"name": "grpc", "port": 8001, "targetPort": GRPC_PORT, "protocol": "TCP", "appProtocol": "grpc"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-triton-metrics", "namespace": namespace, "labels": _labels("triton-metrics")},
            "spec": {
                "clusterIP": "None",
                "selector": {"app.kubernetes.io/name": "fmplex", "ray.io/node-type": "worker"},
                "ports": [{"name": "metrics", "port": TRITON_PORTS[2], "targetPort": TRITON_PORTS[2], "protocol": "TCP"}],
            },
        },
    ]
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": f"{name}-triton", "namespace": namespace, "labels": _labels("metrics")},
        "spec": {
            "selector": {"matchLabels": _labels("triton-metrics")},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }
    return [pvc, rayservice, *services, monitor]


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    import yaml  # noqa: PLC0415

    header = "# Rendered by 'fmplex cluster k8s' (fmplex/cluster/kube.py); edit the inputs, not this file.\n"
    return header + "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in manifests)


def validate(manifests: list[dict[str, Any]], k8s_version: str = "1.37.0") -> list[str]:
    """Check offline; the names of what was checked. Raises on the first invalid object.

    Core kinds go through ``kubernetes-validate`` (strict: unknown fields are
    errors); the RayService's pod templates are checked as ``PodTemplate``s; its
    ``serveConfigV2`` by Ray Serve's ``ServeDeploySchema``. Custom kinds without a
    bundled schema (RayService, ServiceMonitor) get the structural checks here.
    """
    import kubernetes_validate  # noqa: PLC0415
    import yaml  # noqa: PLC0415
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415

    checked = []
    for m in manifests:
        kind = m["kind"]
        if m["apiVersion"] in ("v1", "apps/v1"):
            kubernetes_validate.validate(m, k8s_version, strict=True)
            checked.append(f"{kind}/{m['metadata']['name']}")
        elif kind == "RayService":
            cluster = m["spec"]["rayClusterConfig"]
            groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
            for group, g in groups:
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{m['metadata']['name']}-{group}"}, "template": g["template"]}
                kubernetes_validate.validate(pod, k8s_version, strict=True)
                if not all(isinstance(v, str) for v in g["rayStartParams"].values()):
                    raise ValueError(f"rayStartParams of group {group} must be strings")
                checked.append(f"RayService/{m['metadata']['name']} group {group} (PodTemplate)")
            ServeDeploySchema.parse_obj(yaml.safe_load(m["spec"]["serveConfigV2"]))
            checked.append(f"RayService/{m['metadata']['name']} serveConfigV2 (ServeDeploySchema)")
        elif kind == "ServiceMonitor":
            endpoints = m["spec"]["endpoints"]
            if not endpoints or not all("port" in e for e in endpoints) or "matchLabels" not in m["spec"]["selector"]:
                raise ValueError("ServiceMonitor needs a selector.matchLabels and endpoints with a port")
            checked.append(f"ServiceMonitor/{m['metadata']['name']}")
        else:
            raise ValueError(f"no check for {m['apiVersion']} {kind}")
    return checked
