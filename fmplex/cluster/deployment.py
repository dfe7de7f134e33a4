"""The Ray Serve application: tritonserver replicas per backbone, one placer, one endpoint.

Three deployments make one Serve application (``fmplex``):

- ``fm-<backbone>`` (:class:`BackboneReplica`): each replica starts and owns a
  real tritonserver on the shared repository, exactly as ``fmplex serve`` does
  (:func:`fmplex.control.serving.start`: same backend assembly, host settings
  from the host's config, locked repository API, host watchdog), but loads
  only its backbone's host and no vFM. It announces itself to the placer and
  fails Serve's health check when its tritonserver is gone, so Serve replaces it.
  Its tritonserver dies with it (a reaper process), also on a killed node.
- ``Placer`` (:class:`Placer`, one replica): the one place where placement is
  decided, so that concurrent first requests for a new task load it once. It
  keeps the table of which replica holds which vFM, loads and unloads vFMs
  through each replica's repository API (the same ``Triton.load`` call as
  ``fmplex deploy``; the slot, ensemble and artifact check were done by
  ``fmplex deploy --offline`` on the shared repository), evicts by the host's
  byte budget and slots, gives hot tasks more replicas and takes them back,
  and drops replicas whose tritonserver stops answering.
- ``Ingress`` (:class:`Ingress`): the one endpoint. Serve's HTTP proxy hands it
  every KServe v2 HTTP request and Serve's gRPC proxy every
  ``inference.GRPCInferenceService`` call (registered with Triton's own
  servicer), so unchanged ``tritonclient.http`` and ``tritonclient.grpc``
  clients reach any vFM by its name. It forwards each call to a replica that
  holds the vFM (least in flight first), from a cached copy of the placer's
  table; a call that finds its replica gone is retried once elsewhere
  (inference is idempotent), else answered UNAVAILABLE / 503.

Why not Serve's multiplexing: see :mod:`fmplex.cluster.placement`. Serve still
does what it is good at: replica lifecycle, health checks, declarative
scaling, the proxies, and restarting what dies.
"""

from __future__ import annotations

from __future__ import annotations

from typing import Any

from ray import serve

from .config import HEAD_RESOURCE, INGRESS, PLACER, backbone_deployment
from .ingress import Ingress
from .placer import Placer
from .replica import BackboneReplica


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path`` of the generated config)."""
    repository = str(args["repository"])
    backbones = list(args.get("backbones", []))
    head = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}
    replicas = []
    for b in backbones:
        dep = serve.deployment(
            name=backbone_deployment(b),
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=2,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=15,
        )(BackboneReplica)
        replicas.append(dep.bind(repository, b))
    placer = serve.deployment(name=PLACER, ray_actor_options=head, max_ongoing_requests=1000)(Placer).bind(
        repository,
        *replicas,
        hot_load=float(args.get("hot_load", 8.0)),
        cool_load=float(args.get("cool_load", 2.0)),
        max_replicas_per_task=int(args.get("max_replicas_per_task", 3)),
    )
    return serve.deployment(name=INGRESS, ray_actor_options=head, max_ongoing_requests=1000)(Ingress).bind(placer, repository)
