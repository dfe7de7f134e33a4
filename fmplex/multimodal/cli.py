"""``fmplex multimodal``: stage hosts, tasks and vFMs of multimodal backbones.

Registered on the main ``fmplex`` command; errors are one line, exit status 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from fmplex.control.cli import _connect, _friendly, api_key_option, repo_option, url_option

from . import control
from .models import MULTIMODAL, ModelError
from .placement import PlacementError, parse_cpus


def _clean(fn):  # type: ignore[no-untyped-def]
    """fmplex's error handling plus this package's own errors."""
    wrapped = _friendly(fn)

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return wrapped(*args, **kwargs)
        except (ModelError, PlacementError) as exc:
            raise click.ClickException(str(exc)) from None

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


@click.group("multimodal")
def multimodal() -> None:
    """Multimodal backbones served as stages (encode | lm), and their tasks.

    \b
    Typical session:
      fmplex multimodal init llava-tiny                  # both stage hosts, weights written once
      fmplex multimodal task create caption --backbone llava-tiny --prompt "USER: "
      fmplex serve &                                     # loads the stage hosts with the others
      fmplex multimodal deploy caption                   # ensemble on the lm stage, loaded live
    """


@multimodal.command("init")
@click.argument("backbone", type=click.Choice(sorted(MULTIMODAL)))
@repo_option
@click.option(
    "--placement",
    type=click.Choice(["shared", "split"]),
    default="shared",
    show_default=True,
    help="shared: both stages on one device and all CPUs; split: pinned apart (CPUs halved, or cuda:0 / cuda:1).",
)
@click.option("--encode-device", default=None, help="Torch device of the encode stage (cpu, cuda, cuda:N).")
@click.option("--lm-device", default=None, help="Torch device of the lm stage.")
@click.option("--encode-cpus", default=None, help="CPU list of the encode stage (e.g. 0-3); overrides --placement.")
@click.option("--lm-cpus", default=None, help="CPU list of the lm stage; overrides --placement.")
@click.option("--encode-instances", default=1, show_default=True, type=click.IntRange(1, 64), help="Encode stage processes.")
@click.option("--lm-instances", default=1, show_default=True, type=click.IntRange(1, 64), help="LM stage processes.")
@click.option("--slots", default=control.DEFAULT_SLOTS, show_default=True, type=click.IntRange(1, 1024), help="Task slots of the lm stage.")
@click.option("--max-encode-batch", default=16, show_default=True, type=click.IntRange(1, 1024), help="Images per encoder batch.")
@click.option("--encode-queue-delay-us", default=500, show_default=True, type=click.IntRange(0), help="How long the encoder's batcher waits to fill a batch.")
@_clean
def mm_init(
    backbone: str,
    repo: Path,
    placement: str,
    encode_device: str | None,
    lm_device: str | None,
    encode_cpus: str | None,
    lm_cpus: str | None,
    encode_instances: int,
    lm_instances: int,
    slots: int,
    max_encode_batch: int,
    encode_queue_delay_us: int,
) -> None:
    """Write BACKBONE's two stage hosts (weights once, configs) and register them.

    Safe to run again: existing stages are kept as they are.
    """
    places = control.placements(placement, encode_device, lm_device)
    for stage, cpus in (("encode", encode_cpus), ("lm", lm_cpus)):
        if cpus is not None:
            parse_cpus(cpus)
            places[stage] = control.StagePlacement(places[stage].device, cpus, places[stage].instances)
    places["encode"] = control.StagePlacement(places["encode"].device, places["encode"].cpus, encode_instances)
    places["lm"] = control.StagePlacement(places["lm"].device, places["lm"].cpus, lm_instances)
    reg, fp = control.init_multimodal(repo, backbone, places, slots, max_encode_batch, encode_queue_delay_us)
    for key in (control.encode_key(backbone), backbone):
        host = reg.hosts[key]
        click.echo(f"host {host.model}" + (f": {host.slots} slots" if host.slots else ""))
    click.echo(f"{backbone} ({fp}) ready in {repo}")


@multimodal.group("task")
def mm_task() -> None:
    """Create multimodal tasks (a prompt and generation defaults on a backbone)."""


@mm_task.command("create")
@click.argument("name")
@click.option("--backbone", required=True, type=click.Choice(sorted(MULTIMODAL)))
@click.option("--prompt", default="", help="Text put before every request's TEXT (may hold <image> markers).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 256))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 = greedy.")
@click.option("--weight", default=1.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option("--description", default="")
@repo_option
@_clean
def mm_task_create(
    name: str, backbone: str, prompt: str, max_new_tokens: int, temperature: float, weight: float, description: str, repo: Path
) -> None:
    """Create task NAME on BACKBONE (again: a new version)."""
    entry = control.create_task(repo, name, backbone, prompt, max_new_tokens, temperature, description, weight)
    click.echo(f"task {name} v{entry.version} ({control.KIND}, {backbone}) created")


@multimodal.command("deploy")
@click.argument("names", nargs=-1, required=True)
@click.option("--version", "version", type=click.IntRange(1), help="Version to serve (default: newest).")
@click.option("--offline", is_flag=True, help="Only write the repository; a later 'fmplex serve' loads it.")
@repo_option
@url_option
@api_key_option
@_clean
def mm_deploy(names: tuple[str, ...], version: int | None, offline: bool, repo: Path, url: str, api_key: str | None) -> None:
    """Make multimodal tasks live: slot on the lm stage, ensemble, load.

    'fmplex undeploy' and 'fmplex status' handle them like any vFM.
    """
    triton = None if offline else _connect(url, repo, api_key)
    try:
        for name in names:
            entry = control.deploy_task(repo, name, triton, version)
            where = "loaded" if triton is not None else "written; 'fmplex serve' will load it"
            click.echo(f"{name} v{entry.deployed_version} on fm.{entry.backbone}.lm slot {entry.slot}: {where}")
    finally:
        if triton is not None:
            triton.close()
