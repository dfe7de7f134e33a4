"""``fmplex cluster``: scale out on Ray Serve (up, deploy, undeploy, scale, status).

Thin click commands over :mod:`fmplex.cluster.local` and :mod:`fmplex.cluster.config`.
Ray is imported only when a command runs, so ``fmplex --help`` stays fast and
works without the ``cluster`` extra.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from fmplex import registry

from .config import ClusterSpec, load_spec, set_replicas

ENDPOINT_FILE = "fmplex.cluster.endpoint.json"  # written by 'cluster up': where the other commands attach


def _repo_option(fn: Any) -> Any:
    return click.option(
        "--repo",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("model_repository"),
        show_default=True,
        help="The fmplex repository on storage every node sees (shared directory / RWX volume).",
    )(fn)


def _address_option(fn: Any) -> Any:
    return click.option(
        "--address",
        envvar="RAY_ADDRESS",
        default=None,
        help="Ray cluster address (env RAY_ADDRESS; default: the one 'fmplex cluster up' wrote to REPO).",
    )(fn)


def _endpoint(repo: Path) -> dict[str, Any]:
    try:
        return json.loads((repo / ENDPOINT_FILE).read_text())
    except FileNotFoundError:
        return {}


def _attach(repo: Path, address: str | None) -> dict[str, Any]:
    from . import local  # noqa: PLC0415

    ep = _endpoint(repo)
    address = address or ep.get("address")
    if not address:
        raise click.ClickException(f"no cluster: run 'fmplex cluster up --repo {repo}' first, or pass --address")
    try:
        local.connect(address, ep.get("auth_mode") if address == ep.get("address") else None)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise click.ClickException(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return ep


def _apply(repo: Path, spec: ClusterSpec, ep: dict[str, Any], wait: bool) -> None:
    from . import local  # noqa: PLC0415

    http_port, grpc_port = int(ep.get("http_port", 8000)), int(ep.get("grpc_port", 9000))
    local.start_serve(http_port, grpc_port, host=ep.get("host", local.LOOPBACK))
    local.apply(repo, spec, http_port=http_port, grpc_port=grpc_port, host=ep.get("host", local.LOOPBACK))
    if wait:
        t0 = time.monotonic()
        running = local.wait_running(spec)
        click.echo(f"running: {', '.join(f'{k} x{v}' for k, v in sorted(running.items()))} ({time.monotonic() - t0:.1f}s)")


@click.group("cluster")
def cluster() -> None:
    """Scale out on Ray Serve: tritonserver replicas per backbone, tasks placed where their backbone lives.

    \b
    Tasks are deployed on the shared repository as usual ('fmplex deploy --offline NAME');
    the cluster loads each vFM on one replica of its backbone at its first request,
    adds replicas for a hot task and takes them back, and answers every vFM
    through one HTTP and one gRPC endpoint (unchanged tritonclient clients).
    """


@cluster.command("up")
@_repo_option
@click.option("--address", default=None, help="Attach to this running Ray cluster instead of starting one.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=9000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--num-cpus", default=2, show_default=True, type=click.IntRange(1), help="CPUs of the local Ray node.")
def up(repo: Path, address: str | None, http_port: int, grpc_port: int, num_cpus: int) -> None:
    """Start a local Ray cluster (127.0.0.1 only) with the fmplex endpoint; Ctrl-C stops it.

    With --address, attach to an existing Ray cluster instead; Ctrl-C then
    removes the fmplex application and leaves the cluster running. The
    backbones recorded in REPO/fmplex.cluster.json are deployed at once.
    """
    from ray import serve  # noqa: PLC0415

    from . import local  # noqa: PLC0415
    from .config import APP_NAME  # noqa: PLC0415

    registry.load(repo)  # a missing repository is reported before anything starts
    repo = repo.resolve()
    if address:
        local.connect(address)
    else:
        ctx = local.init_local(num_cpus=num_cpus)
        address = ctx.address_info["gcs_address"]
    ep = {
        "address": address,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "host": local.LOOPBACK,
        "auth_mode": os.environ.get("RAY_AUTH_MODE", "disabled"),  # ray.init turns token auth on for a new cluster
    }
    (repo / ENDPOINT_FILE).write_text(json.dumps(ep) + "\n")
    stop = {"now": False}

    def _interrupt(signum: int, frame: Any) -> None:
        stop["now"] = True

    old = signal.signal(signal.SIGINT, _interrupt), signal.signal(signal.SIGTERM, _interrupt)
    try:
        spec = load_spec(repo)
        _apply(repo, spec, ep, wait=bool(spec.replicas))
        click.echo(f"Ray cluster at {address}; endpoint http 127.0.0.1:{http_port}, grpc 127.0.0.1:{grpc_port}")
        click.echo("Ctrl-C to stop")
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        click.echo("stopping ...")
        if local.is_owner():
            serve.shutdown()
            import ray  # noqa: PLC0415

            ray.shutdown()
        else:
            serve.delete(APP_NAME)
        (repo / ENDPOINT_FILE).unlink(missing_ok=True)
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
        click.echo("stopped")


@cluster.command("deploy")
@click.argument("backbone")
@click.option("--offline", is_flag=True, help="Only record it in REPO/fmplex.cluster.json ('cluster up' and 'cluster k8s' use it).")
@click.option("--replicas", "-n", default=1, show_default=True, type=click.IntRange(1), help="tritonserver replicas.")
@_repo_option
@_address_option
@click.option("--no-wait", is_flag=True, help="Return once Serve accepted the config.")
def deploy(backbone: str, offline: bool, replicas: int, repo: Path, address: str | None, no_wait: bool) -> None:
    """Run BACKBONE on N replicas (declarative: replicas that stay are kept)."""
    _record_and_apply(repo, backbone, replicas, offline=offline, address=address, wait=not no_wait)
    click.echo(f"{backbone}: {replicas} replica(s)")


@cluster.command("scale")
@click.argument("backbone")
@click.option("--offline", is_flag=True, help="Only record it in REPO/fmplex.cluster.json ('cluster up' and 'cluster k8s' use it).")
@click.option("--replicas", "-n", required=True, type=click.IntRange(1), help="tritonserver replicas.")
@_repo_option
@_address_option
@click.option("--no-wait", is_flag=True, help="Return once Serve accepted the config.")
def scale(backbone: str, offline: bool, replicas: int, repo: Path, address: str | None, no_wait: bool) -> None:
    """Change a deployed BACKBONE's replica count; existing replicas and their tasks stay."""
    if backbone not in load_spec(repo).replicas:
        raise click.ClickException(f"backbone '{backbone}' is not deployed on the cluster: 'fmplex cluster deploy {backbone}' first")
    _record_and_apply(repo, backbone, replicas, offline=offline, address=address, wait=not no_wait)
    click.echo(f"{backbone}: {replicas} replica(s)")


@cluster.command("undeploy")
@click.argument("backbone")
@click.option("--offline", is_flag=True, help="Only record it in REPO/fmplex.cluster.json ('cluster up' and 'cluster k8s' use it).")
@_repo_option
@_address_option
def undeploy(backbone: str, offline: bool, repo: Path, address: str | None) -> None:
    """Stop BACKBONE's replicas (its tasks stay deployed in the registry)."""
    if backbone not in load_spec(repo).replicas:
        raise click.ClickException(f"backbone '{backbone}' is not deployed on the cluster")
    _record_and_apply(repo, backbone, 0, offline=offline, address=address, wait=False)
    click.echo(f"{backbone}: undeployed")


def _record_and_apply(repo: Path, backbone: str, replicas: int, *, offline: bool, address: str | None, wait: bool) -> None:
    """Record BACKBONE's replica count in REPO/fmplex.cluster.json and, unless offline, apply it to the cluster.

    The cluster is attached first, so an unreachable cluster changes nothing on disk.
    """
    ep = {} if offline else _attach(repo, address)
    try:
        spec = set_replicas(repo, backbone, replicas)
    except registry.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    if not offline:
        _apply(repo.resolve(), spec, ep, wait=wait)


@cluster.command("status")
@_repo_option
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print the placer's full status as JSON.")
def status(repo: Path, address: str | None, as_json: bool) -> None:
    """Per replica: its tasks, bytes, load and health; per task: where it is."""
    from . import local  # noqa: PLC0415

    _attach(repo, address)
    st = local.placer_status()
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(f"{'replica':<10} {'backbone':<10} {'healthy':<8} {'load':>6} {'bytes':>10} {'budget':>10} tasks")
    for r in st["replicas"]:
        click.echo(
            f"{r['replica']:<10} {r['backbone']:<10} {'yes' if r['healthy'] else 'NO':<8} {r['load']:>6.1f} "
            f"{r['bytes']:>10} {r['budget_bytes']:>10} {', '.join(r['tasks']) or '-'}"
        )
    waiting = [n for n, t in st["tasks"].items() if not t["replicas"]]
    if waiting:
        click.echo(f"not placed yet (loaded at their first request): {', '.join(waiting)}")


@cluster.command("k8s")
@_repo_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here (default: stdout).")
@click.option("--image", default="fmplex:0.1.0", show_default=True, help="Image with fmplex[cluster] installed.")
@click.option("--namespace", default="default", show_default=True)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="NAME=PODS[:GPUS]",
    help="A worker group per device type, e.g. cpu=2 or gpu=4:1 (default: cpu=2).",
)
@click.option("--device", "devices", multiple=True, metavar="BACKBONE=GROUP", help="Run BACKBONE's replicas on GROUP.")
@click.option("--storage-class", default=None, help="StorageClass of the ReadWriteMany artifact volume.")
def k8s(repo: Path, out: Path | None, image: str, namespace: str, groups: tuple[str, ...], devices: tuple[str, ...], storage_class: str | None) -> None:
    """Render the KubeRay RayService, Services, artifact volume and ServiceMonitor for REPO.

    The replicas per backbone come from REPO/fmplex.cluster.json ('fmplex cluster
    deploy' writes it); serveConfigV2 is generated from it as 'fmplex cluster' applies it.
    """
    from .kube import DeviceGroup, render, to_yaml  # noqa: PLC0415

    parsed = []
    for g in groups or ("cpu=2",):
        try:
            name, rest = g.split("=", 1)
            pods, _, gpus = rest.partition(":")
            parsed.append(DeviceGroup(name, pods=int(pods), gpus=int(gpus or 0)))
        except ValueError:
            raise click.BadParameter(f"{g!r}: use NAME=PODS or NAME=PODS:GPUS", param_hint="--group") from None
    try:
        device_of = dict(d.split("=", 1) for d in devices)
    except ValueError:
        raise click.BadParameter("use BACKBONE=GROUP", param_hint="--device") from None
    spec = load_spec(repo)
    if not spec.replicas:
        raise click.ClickException(f"no backbone deployed in {repo}/fmplex.cluster.json: 'fmplex cluster deploy BACKBONE' first")
    try:
        text = to_yaml(render(repo, spec, namespace=namespace, image=image, groups=tuple(parsed), device_of=device_of, storage_class=storage_class))
    except (registry.RegistryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}")
