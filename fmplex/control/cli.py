"""``fmplex``: the control plane's command line.

It edits the model repository (host entries, vFM ensembles, artifacts, the
registry) and drives a running tritonserver through its gRPC repository API.
Every command is a thin click function over a workflow in ``workflows``,
which dispatches to the backbone's family (``fmplex.families``). Every error
is one line on stderr and exit status 1 (2 for a usage error); ``--help``
everywhere.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from fmplex import registry
from fmplex.artifacts import ArtifactError, version_dir
from fmplex.families import FAMILIES, OptionError, all_backbones, all_kinds, family_for
from fmplex.registry import RegistryError, TaskEntry

from . import repository as repo_ops
from . import workflows

DEFAULT_REPO = os.environ.get("FMPLEX_REPO", "model_repository")
DEFAULT_URL = os.environ.get("FMPLEX_URL", "localhost:8001")


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one clear line (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .server import ServerError  # noqa: PLC0415
        from .train import TrainError  # noqa: PLC0415
        from .importers import SourceError  # noqa: PLC0415
        from .triton_api import ControlError  # noqa: PLC0415

        family_errors = tuple(e for fam in FAMILIES.values() for e in fam.errors)
        try:
            return fn(*args, **kwargs)
        except OptionError as exc:
            raise click.UsageError(str(exc)) from None
        except (RegistryError, ArtifactError, ControlError, ServerError, TrainError, SourceError, KeyError, FileNotFoundError, *family_errors) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(msg)) from None
        except ImportError as exc:
            raise click.ClickException(f"missing dependency: {exc}") from None

    return wrapper


def repo_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--repo",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_REPO,
        show_default=True,
        envvar="FMPLEX_REPO",
        help="Model repository (env FMPLEX_REPO).",
    )(fn)


def url_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--url", default=DEFAULT_URL, show_default=True, envvar="FMPLEX_URL", help="Triton gRPC endpoint (env FMPLEX_URL)."
    )(fn)


def _family_options(which: str) -> Callable[[click.Command], click.Command]:
    """Add every family's own options (``init_options`` or ``create_options``) to a
    command, after its common ones; an option name declared twice is added once."""

    def add(cmd: click.Command) -> click.Command:
        names = {p.name for p in cmd.params}
        at = next((i for i, p in enumerate(cmd.params) if p.name == "repo" and isinstance(p, click.Option)), len(cmd.params))
        for fam in FAMILIES.values():
            for opt in getattr(fam, which)():
                if opt.name not in names:
                    names.add(opt.name)
                    cmd.params.insert(at, opt)
                    at += 1
        return cmd

    return add


def _foreign_options(which: str, families: set[str], what: str) -> None:
    """Refuse a family option given on the command line when no backbone of its family is in play."""
    ctx = click.get_current_context()
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    for fam in FAMILIES.values():
        for opt in getattr(fam, which)():
            if fam.name not in families and ctx.get_parameter_source(opt.name) in given:
                raise click.UsageError(f"{opt.opts[0]} is an option of {fam.name} backbones ({', '.join(fam.backbones())}), not of {what}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fmplex")
def main() -> None:
    """fmplex: many tasks, one shared foundation model, inside Triton.

    Each task is a virtual foundation model (vFM): an ordinary Triton model
    to its clients, served by one shared host per backbone whose fair
    scheduler batches all tasks' requests together.

    \b
    Typical session:
      fmplex init                                   # repository with the minilm host
      fmplex task create sentiment --kind classifier --train data.csv
      fmplex serve &                                # real tritonserver
      fmplex deploy sentiment                       # ensemble + slot, loaded live
      fmplex status

    \b
    Other backbone families work the same way, e.g.:
      fmplex init --backbone smollm2 --backbone llava-tiny
      fmplex task create chat --backbone smollm2
      fmplex task create caption --backbone llava-tiny --prompt "USER: "
    """


# --- init ----------------------------------------------------------------------


def _slots_help() -> str:
    defaults = {f.default_slots: [] for f in FAMILIES.values()}
    for fam in FAMILIES.values():
        defaults[fam.default_slots].append(fam.name)
    return "Slot pool per host (default: " + "; ".join(f"{n} for {', '.join(fams)}" for n, fams in defaults.items()) + ")."


def _backbones_help() -> str:
    return "Backbone(s) to host (repeatable): " + "; ".join(
        f"{fam.name}: {', '.join(fam.backbones())}" for fam in FAMILIES.values()
    ) + "."


@_family_options("init_options")
@main.command()
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_REPO, required=False)
@click.option("--backbone", "backbones", multiple=True, default=["minilm"], show_default=True, type=click.Choice(all_backbones()),
              help=_backbones_help())
@click.option("--slots", default=None, type=click.IntRange(1, 4096), help=_slots_help())
@_friendly
def init(repo: Path, backbones: tuple[str, ...], slots: int | None, **options: Any) -> None:
    """Create a model repository with the host(s) of each backbone.

    Each backbone family writes its own hosts: one for an encoder, a host
    and its streaming twin for a generative LM, an encode and an lm stage
    host (with their weights) for a multimodal model. Safe to run again:
    existing hosts and tasks are kept.
    """
    _foreign_options("init_options", {family_for(b).name for b in backbones}, f"{', '.join(backbones)}")
    workflows.init_repository(repo, list(dict.fromkeys(backbones)), slots, options, click.echo)
    click.echo(f"repository ready: {repo}")


# --- tasks ---------------------------------------------------------------------


@main.group()
def task() -> None:
    """Create, inspect, re-weight and delete tasks."""


def _kind_help() -> str:
    return "Task kind (default: the family's first). " + " ".join(
        f"On {', '.join(fam.backbones())} ({fam.name}): " + "; ".join(f"{k.name}: {k.summary}" for k in fam.kinds()) + "."
        for fam in FAMILIES.values()
    )


def _create_help() -> str:
    lines = []
    for fam in FAMILIES.values():
        lines.append(f"{fam.name} ({', '.join(fam.backbones())}):")
        lines += [f"  {k.name:<11} {k.usage}" for k in fam.kinds()]
    return (
        "Build a task (a new version if NAME exists) and store its artifact.\n\n"
        "Every kind of every backbone family, and what creating one takes:\n\n\b\n" + "\n".join(lines) + "\n\n"
        "The artifact (manifest.json, weights, files) goes to REPO/NAME/<version>/. "
        "Deploy it with 'fmplex deploy NAME'. Options named after a family apply to its backbones only."
    )


@_family_options("create_options")
@task.command("create", help=_create_help())
@click.argument("name")
@click.option("--backbone", default="minilm", show_default=True, type=click.Choice(all_backbones()))
@click.option("--kind", default=None, type=click.Choice(all_kinds()), help=_kind_help())
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    help="An existing fine-tune to import: a PEFT adapter dir (lora, ia3, prompt), an adapter .safetensors (adapter), "
    "a transformers checkpoint dir or a fine-tuned .safetensors state dict (fork), an .onnx file (onnx).",
)
@click.option(
    "--train",
    "train_csv",
    type=click.Path(path_type=Path),
    help="Labelled training data: fit a linear head on the task's own embeddings. Text (classifier, lora, ia3, adapter, "
    "prompt): a text,label CSV; images: DIR/<label>/*.png|jpg or a path,label CSV; series: a label,x1,x2,... CSV.",
)
@click.option("--weight", default=1.0, show_default=True, type=click.FloatRange(min=0.001), help="Fair-share weight.")
@click.option("--queue-limit", default=256, show_default=True, type=click.IntRange(1), help="Max queued requests.")
@click.option("--deadline-ms", type=click.FloatRange(min=0.1), help="Fail requests queued longer than this.")
@click.option("--description", default="", help="Free text shown by 'task show'.")
@repo_option
@_friendly
def task_create(
    name: str,
    backbone: str,
    kind: str | None,
    weight: float,
    queue_limit: int,
    deadline_ms: float | None,
    description: str,
    repo: Path,
    **options: Any,
) -> None:
    fam = family_for(backbone)
    _foreign_options("create_options", {fam.name}, f"{backbone} ({fam.name}) tasks")
    settings = workflows.TaskSettings(weight, queue_limit, deadline_ms, description)
    workflows.create_task(repo, name, backbone, kind, options, settings, click.echo)


@task.command("list")
@repo_option
@_friendly
def task_list(repo: Path) -> None:
    """One line per task: kind, backbone, versions, weight, deployment."""
    reg = registry.load(repo)
    if not reg.tasks:
        click.echo("no tasks (create one with 'fmplex task create')")
        return
    click.echo(f"{'TASK':<20} {'KIND':<11} {'BACKBONE':<9} {'VER':>4} {'WEIGHT':>7} {'DEPLOYED':<16}")
    for t in sorted(reg.tasks.values(), key=lambda t: t.name):
        dep = f"v{t.deployed_version} slot {t.slot}" if t.deployed else "-"
        click.echo(f"{t.name:<20} {t.kind:<11} {t.backbone:<9} {t.version:>4} {t.weight:>7g} {dep:<16}")


@task.command("show")
@click.argument("name")
@repo_option
@_friendly
def task_show(name: str, repo: Path) -> None:
    """Everything about one task: registry entry and artifact manifest."""
    for label, value in workflows.show_task(repo, name):
        click.echo(f"{label + ':':<13}{value}")


@task.command("set-weight")
@click.argument("name")
@click.argument("weight", type=click.FloatRange(min=0.001))
@click.option("--queue-limit", type=click.IntRange(1), help="Also change the queue limit.")
@click.option("--deadline-ms", type=click.FloatRange(min=0.0), help="Also change the deadline (0 = none).")
@repo_option
@_friendly
def task_set_weight(name: str, weight: float, queue_limit: int | None, deadline_ms: float | None, repo: Path) -> None:
    """Change a task's fair-share weight (and limits) — live, no reload.

    It is a registry edit: the host picks it up on its next request.
    """
    with registry.editing(repo) as reg:
        entry = reg.task(name)
        old = entry.weight
        entry.weight = weight
        if queue_limit is not None:
            entry.queue_limit = queue_limit
        if deadline_ms is not None:
            entry.deadline_ms = deadline_ms or None
    click.echo(f"task {name}: weight {old:g} -> {weight:g}")


@task.command("pin")
@click.argument("name")
@click.option("--off", is_flag=True, help="Unpin instead.")
@repo_option
@_friendly
def task_pin(name: str, off: bool, repo: Path) -> None:
    """Keep a task's extension resident whatever the host's memory budget.

    Unpinned extensions are evicted least-recently-used first when the host's
    extension_budget_mb is exceeded, and reloaded on their next request.
    """
    with registry.editing(repo) as reg:
        reg.task(name).pinned = not off
    click.echo(f"task {name}: {'unpinned' if off else 'pinned'}")


@task.command("export-onnx")
@click.argument("name")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@repo_option
@_friendly
def task_export_onnx(name: str, out: Path, repo: Path) -> None:
    """Export a classifier task's linear head to ONNX (input: pooled [rows, hidden]).

    The file can be served again as an 'onnx' task:
    fmplex task create NAME2 --kind onnx --source OUT --labels ...
    """
    from .export_onnx import export_task  # noqa: PLC0415

    try:
        path = export_task(repo, name, out)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported {name} head to {path}")


def api_key_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--api-key`` of the commands that call the locked repository API."""
    return click.option(
        "--api-key",
        envvar="FMPLEX_API_KEY",
        default=None,
        metavar="KEY",
        help="Key of a locked server (env FMPLEX_API_KEY; default: REPO/fmplex.key as 'fmplex serve' wrote it).",
    )(fn)


@task.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Undeploy first if it is deployed.")
@repo_option
@url_option
@api_key_option
@_friendly
def task_delete(name: str, force: bool, repo: Path, url: str, api_key: str | None) -> None:
    """Delete a task and all its versions."""
    entry = registry.load(repo).task(name)
    if entry.deployed:
        if not force:
            raise RegistryError(f"task '{name}' is deployed: 'fmplex undeploy {name}' first, or pass --force")
        _undeploy(name, repo, url, offline=False, api_key=api_key)
    with registry.editing(repo) as reg:
        reg.tasks.pop(name, None)
    repo_ops.delete_task_files(repo, name)
    click.echo(f"task {name} deleted")


# --- deploy / undeploy ---------------------------------------------------------


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--version", "version", type=click.IntRange(1), help="Version to serve (default: newest).")
@click.option("--offline", is_flag=True, help="Only write the repository; a later 'fmplex serve' loads it.")
@repo_option
@url_option
@api_key_option
@_friendly
def deploy(names: tuple[str, ...], version: int | None, offline: bool, repo: Path, url: str, api_key: str | None) -> None:
    """Make tasks live as vFMs: slot + registry, ensemble config, then load.

    Any task of any backbone family: its family writes its Triton models (a
    generative task also gets NAME.stream; a multimodal one runs on its lm
    stage host). The registry is written before Triton loads the ensemble, so
    the host knows the slot before the first request can reach it.
    Redeploying a task rolls it to VERSION (or the newest) on a fresh slot.
    """
    workflows.check_deployable(repo, list(names), version)  # before connecting: a bad task is the first thing to hear about
    triton = None if offline else _connect(url, repo, api_key)
    try:
        workflows.deploy(repo, list(names), version, triton, click.echo, check=False)
    finally:
        if triton is not None:
            triton.close()


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--offline", is_flag=True, help="Only update the repository (no server).")
@repo_option
@url_option
@api_key_option
@_friendly
def undeploy(names: tuple[str, ...], offline: bool, repo: Path, url: str, api_key: str | None) -> None:
    """Take vFMs out of service; the shared host keeps running.

    Triton unloads the ensemble once its in-flight requests are answered;
    only then is the slot freed in the registry.
    """
    for name in names:
        _undeploy(name, repo, url, offline, api_key)
        click.echo(f"undeployed {name}")


def _undeploy(name: str, repo: Path, url: str, offline: bool, api_key: str | None = None) -> None:
    if not registry.load(repo).task(name).deployed:
        raise RegistryError(f"task '{name}' is not deployed")
    if offline:
        workflows.undeploy(repo, name)
        return
    with _connect(url, repo, api_key) as triton:
        workflows.undeploy(repo, name, triton)


def _connect(url: str, repo: Path | None = None, api_key: str | None = None) -> Any:
    """A live server's control client (see ``workflows.connect``)."""
    return workflows.connect(url, repo, api_key)


# --- serve ---------------------------------------------------------------------


@main.command()
@repo_option
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--server",
    "prefer",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "system", "bundled"]),
    help="auto: a system tritonserver if present, else the one in nvidia-pytriton.",
)
@click.option("--torch-threads", type=click.IntRange(1), help="Torch threads per host (default: the host config's, 1).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the server log here.")
@click.option("--verbose", is_flag=True, help="Print Triton's log to stdout.")
@click.option(
    "--api-key",
    envvar="FMPLEX_API_KEY",
    default=None,
    metavar="KEY",
    help="Key that unlocks the control APIs (env FMPLEX_API_KEY; default: a random one written to REPO/fmplex.key).",
)
@click.option("--no-lock", is_flag=True, help="Leave the control APIs open to anyone who reaches the ports (unsafe).")
@click.option(
    "--no-watchdog",
    is_flag=True,
    help="Do not reload a host whose Python stub process died (Triton itself leaves it failing every request).",
)
@_friendly
def serve(
    repo: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    prefer: str,
    torch_threads: int | None,
    log_path: Path | None,
    verbose: bool,
    api_key: str | None,
    no_lock: bool,
    no_watchdog: bool,
) -> None:
    """Run tritonserver on REPO in the foreground (Ctrl-C stops it cleanly).

    Explicit model control: the hosts and every deployed vFM are loaded at
    start; later deploys load and unload vFMs through the repository API.

    \b
    Locked by default: loading, unloading and listing models, and shared
    memory, trace and log settings, need the key (HTTP header fmplex-key,
    gRPC metadata triton-grpc-protocol-fmplex-key). Without --api-key (or
    FMPLEX_API_KEY) a random key is written to REPO/fmplex.key (mode 0600),
    where deploy, undeploy, status and task delete find it. Inference,
    health, metadata, model configs and statistics stay open.
    """
    from . import serving  # noqa: PLC0415
    from .server import KEY_FILE, Ports, generate_key, remove_key_file, restricted_api_args, write_key_file  # noqa: PLC0415

    registry.load(repo)  # a missing or broken repository is reported before any key is written
    if no_lock:
        if click.get_current_context().get_parameter_source("api_key") == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("--api-key and --no-lock contradict each other")
        api_key = None
        remove_key_file(repo)  # a stale key would only mislead
        click.secho(
            "WARNING: --no-lock: the repository API is OPEN: anyone who reaches the ports can load, unload "
            "and reconfigure models",
            fg="red",
            bold=True,
            err=True,
        )
    elif api_key:
        restricted_api_args(api_key)  # a malformed key is refused before anything starts
        remove_key_file(repo)  # a stale key would only mislead
        click.echo(f"repository API locked with the given key (header fmplex-key); {KEY_FILE} not written")
    else:
        api_key = generate_key()
        path = write_key_file(repo, api_key)
        click.echo(f"repository API locked: key written to {path} (mode 0600)")

    log = None if verbose else (log_path or Path(repo).resolve().parent / "fmplex-server.log")
    click.echo(f"starting tritonserver on {Path(repo).resolve()}: http :{http_port} grpc :{grpc_port} metrics :{metrics_port}")
    if log:
        click.echo(f"  log: {log}")
    stop = {"now": False}

    def _interrupt(signum: int, frame: Any) -> None:
        stop["now"] = True

    def launch() -> Any:
        proc = serving.start(  # Ctrl-C while starting: KeyboardInterrupt stops the server
            repo,
            Ports(http_port, grpc_port, metrics_port),
            prefer=prefer,
            log_path=log,
            torch_threads=torch_threads,
            inherit_output=verbose,
            echo=click.echo,
            api_key=api_key,
            watchdog=not no_watchdog,
        )
        try:  # the families' start-up extras, e.g. a generative backbone's streaming twin and NAME.stream vFMs
            workflows.start_up(f"127.0.0.1:{grpc_port}", repo, api_key, echo=click.echo)
        except BaseException:
            proc.stop()
            raise
        return proc

    from .supervise import Supervisor  # noqa: PLC0415

    t0 = time.monotonic()
    proc = launch()
    supervisor = Supervisor(launch, lambda: stop["now"], first=proc, echo=click.echo)  # a dead tritonserver is started again
    old = signal.signal(signal.SIGINT, _interrupt), signal.signal(signal.SIGTERM, _interrupt)
    try:
        click.echo(f"{proc.install.kind} tritonserver {proc.install.binary} up in {time.monotonic() - t0:.1f}s")
        click.echo("serving; Ctrl-C to stop")
        supervisor.run()
    finally:
        click.echo("stopping tritonserver ...")
        code = supervisor.current.stop() if supervisor.current is not None else None
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
        click.echo(f"tritonserver stopped (exit code {code})")


# --- status --------------------------------------------------------------------


@main.command()
@repo_option
@url_option
@click.option("--metrics-url", default=None, help="Triton metrics URL (default: same host, port 8002).")
@api_key_option
@_friendly
def status(repo: Path, url: str, metrics_url: str | None, api_key: str | None) -> None:
    """Per-task state, weight, slot, version, requests and latency.

    Counts and latencies are Triton's own statistics of each vFM; queue depth
    comes from the host's fmplex_* metrics.
    """
    from .triton_api import scrape_metrics  # noqa: PLC0415

    reg = registry.load(repo)
    with _connect(url, repo, api_key) as triton:
        index = triton.index()
        if metrics_url is None:
            host = url.rsplit(":", 1)[0]
            metrics_url = f"http://{host}:8002/metrics"
        metrics = scrape_metrics(metrics_url)
        for h in sorted(reg.hosts.values(), key=lambda h: h.model):
            state = index.get(h.model, {}).get("state", "UNKNOWN")
            used = len(reg.slot_map(h.backbone))
            click.echo(f"host {h.model}: {state}, {used}/{h.slots} slots used")
        def metric(name: str, task: str) -> float:
            return sum(v for (n, labels), v in metrics.items() if n == name and ("task", task) in labels)

        click.echo(
            f"{'TASK':<20} {'KIND':<10} {'STATE':<12} {'VER':>4} {'SLOT':>5} {'WEIGHT':>7} {'QUEUE':>6} {'OK':>8} {'FAIL':>6} {'AVG ms':>8} {'EXT KiB':>9}"
        )
        for t in sorted(reg.tasks.values(), key=lambda t: t.name):
            state = index.get(t.name, {}).get("state", "") or ("NOT LOADED" if t.deployed else "-")
            st = triton.statistics(t.name) if t.deployed else {}
            queue = metric("fmplex_task_queue_depth", t.name)
            ext = metric("fmplex_task_extension_bytes", t.name)
            ext_text = f"{ext / 1024:.1f}" if ext else f"({_artifact_bytes(repo, t) / 1024:.1f})"
            click.echo(
                f"{t.name:<20} {t.kind:<10} {state:<12} {t.deployed_version or '-':>4} {t.slot if t.deployed else '-':>5} "
                f"{t.weight:>7g}{'*' if t.pinned else ' '}{int(queue):>5} {st.get('success', 0):>8} {st.get('fail', 0):>6} "
                f"{st.get('ms_request', 0.0):>8.2f} {ext_text:>9}"
            )
        res = sum(v for (n, _), v in metrics.items() if n == "fmplex_extension_resident_bytes")
        budget = sum(v for (n, _), v in metrics.items() if n == "fmplex_extension_budget_bytes")
        evictions = sum(v for (n, _), v in metrics.items() if n == "fmplex_extension_evictions_total")
        reload_s = sum(v for (n, _), v in metrics.items() if n == "fmplex_extension_reload_seconds_total")
        click.echo(
            f"extensions: {res / 2**20:.1f} of {budget / 2**20:.0f} MiB resident, {evictions:.0f} evictions, "
            f"{reload_s * 1000:.0f} ms reloading (* pinned; EXT KiB in parentheses: on disk, not resident)"
        )


def _artifact_bytes(repo: Path, entry: TaskEntry) -> int:
    vdir = version_dir(repo, entry.name, entry.deployed_version or entry.version)
    return sum(p.stat().st_size for p in vdir.iterdir() if p.is_file()) if vdir.is_dir() else 0


from fmplex.cluster.cli import cluster as _cluster  # noqa: E402 - scale-out on Ray Serve (the 'cluster' extra)

main.add_command(_cluster)


# --- scaling (fmplex/control/scale.py, autoscale.py) -----------------------------


@main.command("scale")
@click.argument("stage")
@click.option("--instances", "-n", required=True, type=int, help="Instances the stage host should run (at least 1).")
@repo_option
@url_option
@api_key_option
@_friendly
def scale_cmd(stage: str, instances: int, repo: Path, url: str, api_key: str | None) -> None:
    """Set a stage host's instance count, in place (STAGE: a host model, e.g. fm.minilm).

    Triton adds or removes instances of the running host; the others keep
    serving and the vFMs stay loaded. Each instance is a process with its own
    backbone copy and scheduler. The override is the host's config.pbtxt from
    REPO with the new count (what Triton can apply in place); the count lasts
    until the server restarts.
    """
    from .scale import check_count, scale  # noqa: PLC0415

    check_count(instances)  # before connecting: a bad count is the first thing to hear about
    with _connect(url, repo, api_key) as triton:
        result = scale(triton, stage, instances, repository=repo if Path(repo).is_dir() else None)
    click.echo(result.summary())


@main.command("autoscale")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    metavar="NAME[:MIN:MAX]",
    help="A stage host to scale and its bounds (repeatable; default: every host in REPO's registry).",
)
@click.option("--min", "min_instances", default=1, show_default=True, type=click.IntRange(1), help="Default lower bound.")
@click.option("--max", "max_instances", default=4, show_default=True, type=click.IntRange(1), help="Default upper bound.")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds between polls.")
@click.option("--once", is_flag=True, help="Poll twice (one interval apart), decide and act once, then exit.")
@click.option("--dry-run", is_flag=True, help="Print the decisions; change nothing.")
@click.option("--down-window", default=60.0, show_default=True, type=click.FloatRange(min=0.0), help="Seconds of low load before a step down.")
@click.option("--cooldown", default=60.0, show_default=True, type=click.FloatRange(min=0.0), help="Seconds after a change before a step down.")
@click.option("--metrics-url", default=None, help="Triton metrics URL (default: same host, port 8002).")
@repo_option
@url_option
@api_key_option
@_friendly
def autoscale_cmd(
    stages: tuple[str, ...],
    min_instances: int,
    max_instances: int,
    interval: float,
    once: bool,
    dry_run: bool,
    down_window: float,
    cooldown: float,
    metrics_url: str | None,
    repo: Path,
    url: str,
    api_key: str | None,
) -> None:
    """Scale each stage host within its bounds from Triton's metrics: fast up, slow down.

    Every INTERVAL it reads per-stage arrivals, service time and queue depth
    (Triton's metrics and the hosts' fmplex_* metrics), and scales a stage up
    as soon as it runs hot or queues (several instances at once if needed),
    down one instance at a time after DOWN-WINDOW seconds of low load and
    COOLDOWN seconds after its last change. Ctrl-C stops it.
    """
    import dataclasses as _dc  # noqa: PLC0415

    from . import autoscale as auto  # noqa: PLC0415
    from .scale import current_instances, scale, server_config, workers_per_instance  # noqa: PLC0415

    if max_instances < min_instances:
        raise click.UsageError(f"--max {max_instances} is below --min {min_instances}")
    default = auto.Bounds(min_instances, max_instances)
    try:
        bounds = auto.parse_stages(stages, default)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not bounds:
        bounds = {h.model: default for h in registry.load(repo).hosts.values()}
        if not bounds:
            raise click.ClickException(f"no hosts in {repo}'s registry: name stages with --stage")
    if metrics_url is None:
        metrics_url = f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
    config = _dc.replace(auto.PolicyConfig(), down_window_s=down_window, down_cooldown_s=cooldown)
    with _connect(url, repo, api_key) as triton:
        for name in bounds:
            current_instances(triton, name)  # an unknown stage fails here, in one line
        repository = repo if Path(repo).is_dir() else None
        scaler = auto.Autoscaler(
            bounds,
            scrape_fn=lambda: auto.scrape(metrics_url),
            instances_of=lambda name: current_instances(triton, name),
            apply=lambda name, n: scale(triton, name, n, repository=repository),
            config=config,
            workers_of=lambda name: workers_per_instance(server_config(triton, name)),
            dry_run=dry_run,
            echo=click.echo,
        )
        what = ", ".join(f"{n} [{b.min}..{b.max}]" for n, b in bounds.items())
        click.echo(f"autoscaling {what} every {interval:g}s{' (dry run)' if dry_run else ''}; Ctrl-C stops")
        try:
            scaler.run(interval, once=once)
        except KeyboardInterrupt:
            click.echo("autoscaler stopped (a scale already sent to the server completes there)")
        except OSError as exc:
            raise click.ClickException(f"reading metrics from {metrics_url} failed: {exc}") from None


@main.command("trace")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--duration", default=600.0, show_default=True, type=click.FloatRange(min=1.0), help="Seconds of trace.")
@click.option("--rate", default=4.0, show_default=True, type=click.FloatRange(min=0.001), help="Calm arrival rate (requests/s).")
@click.option("--burst-factor", default=5.0, show_default=True, type=click.FloatRange(min=1.0), help="Burst rate / calm rate.")
@click.option("--text-share", default=(0.7, 0.3), show_default=True, type=(click.FloatRange(0, 1), click.FloatRange(0, 1)),
              help="Share of text-only requests at the start and at the end.")
@click.option("--seed", default=0, show_default=True, type=int)
def trace_cmd(out: Path, duration: float, rate: float, burst_factor: float, text_share: tuple[float, float], seed: int) -> None:
    """Write a synthetic multimodal request trace (CSV) after the Azure LMM trace.

    Columns: timestamp_s, task, num_images, context_tokens, generated_tokens.
    Bursty arrivals, a text-only share that drifts, heavy-tailed image counts
    and token lengths; the same seed gives the same trace.
    """
    from fmplex import trace  # noqa: PLC0415

    cfg = trace.TraceConfig(
        duration_s=duration, calm_rate=rate, burst_factor=burst_factor, text_share_start=text_share[0], text_share_end=text_share[1]
    )
    rows = trace.generate(cfg, seed=seed)
    trace.write_csv(rows, out)
    s = trace.summary(rows)
    click.echo(
        f"{out}: {len(rows)} requests over {duration:g}s ({s.get('rate_per_s', 0):.2f}/s, dispersion {s.get('dispersion', 0):.1f}), "
        f"{100 * s.get('text_only_share', 0):.0f}% text-only, up to {s.get('images_max', 0):.0f} images, "
        f"context p50/p99 {s.get('context_p50', 0):.0f}/{s.get('context_p99', 0):.0f} tokens"
    )


# --- perf ----------------------------------------------------------------------


@main.command("perf", context_settings={"show_default": True})
@click.argument("names", nargs=-1, required=True)
@click.option("--url", default=None, help="Triton endpoint. [default: fmplex serve's: localhost:8001 (grpc, or env FMPLEX_URL), localhost:8000 (http)]")
@click.option("--protocol", "-i", default="grpc", type=click.Choice(["grpc", "http"]), help="How perf_analyzer talks to the server.")
@click.option("--concurrency-range", metavar="START[:END[:STEP]]", help="Closed loop: requests in flight per model. [default: 1]")
@click.option("--request-rate-range", metavar="START[:END[:STEP]]", help="Open loop: requests/s per model (instead of --concurrency-range).")
@click.option("--measurement-interval", "-p", type=click.IntRange(1), metavar="MS", help="Window length in ms. [default: 5000]")
@click.option("--measurement-mode", type=click.Choice(["time_windows", "count_windows"]), help="How windows are delimited.")
@click.option("--measurement-request-count", type=click.IntRange(1), help="Requests per window in count_windows mode.")
@click.option("--request-count", type=click.IntRange(1), help="Send exactly this many requests per load level, then stop (no stability search).")
@click.option("--percentile", type=click.IntRange(1, 99), help="Stabilize on (and report) this latency percentile instead of the average.")
@click.option("--stability-percentage", "-s", type=click.FloatRange(min=0), help="Allowed variation between windows. [default: 10]")
@click.option("--max-trials", "-r", type=click.IntRange(1), help="Windows tried before giving up on stability. [default: 10]")
@click.option("-f", "csv_file", type=click.Path(dir_okay=False, path_type=Path), help="perf_analyzer's CSV report (several models: FILE.MODEL.csv).")
@click.option("--streaming", is_flag=True, help="Generative tasks: measure the NAME.stream twin over a gRPC stream; reports time to first response.")
@click.option("--max-tokens", default=16, type=click.IntRange(1), help="New tokens per generative request.")
@click.option("--rows", default=1, type=click.IntRange(1), help="Sentences per request for text tasks.")
@click.option("--input-data", "input_file", type=click.Path(dir_okay=False, path_type=Path), help="Use this perf_analyzer input file for every model instead of generated ones.")
@click.option("--write-input-data", type=click.Path(file_okay=False, path_type=Path), help="Keep the generated input files here (DIR/MODEL.json).")
@click.option("--pa-arg", "pa_args", multiple=True, metavar="ARGS", help="More perf_analyzer arguments, shell-quoted (repeatable), e.g. --pa-arg '--max-threads 8'.")
def perf_cmd(names: tuple[str, ...], url: str | None, protocol: str, **opts: Any) -> None:
    """Run Triton's perf_analyzer against deployed vFMs NAMES, all at once.

    Finds the perf_analyzer installed with tritonclient and the CUDA runtime
    library it needs, and writes a realistic input file from each model's own
    config: sentences of several lengths for text tasks, prompts with
    MAX_TOKENS for generative ones. Prints perf_analyzer's own report for each
    model, then throughput per model and load level, and with several names
    their sum. Exits with perf_analyzer's status and error when it fails.

    \b
      fmplex perf sentiment --concurrency-range 4
      fmplex perf sentiment topic intent --concurrency-range 1:8:2 -f out.csv
      fmplex perf chat --streaming --max-tokens 32 --request-count 20
    """
    import shlex  # noqa: PLC0415

    from . import perf as perf_ops  # noqa: PLC0415

    if opts["concurrency_range"] and opts["request_rate_range"]:
        raise click.UsageError("--concurrency-range and --request-rate-range exclude each other")
    if opts["streaming"] and protocol != "grpc":
        raise click.UsageError("--streaming needs --protocol grpc (perf_analyzer streams over gRPC only)")
    options = perf_ops.PerfOptions(
        url=url or (DEFAULT_URL if protocol == "grpc" else perf_ops.default_url(protocol)),
        protocol=protocol,
        concurrency_range=opts["concurrency_range"],
        request_rate_range=opts["request_rate_range"],
        measurement_interval_ms=opts["measurement_interval"],
        measurement_mode=opts["measurement_mode"],
        measurement_request_count=opts["measurement_request_count"],
        request_count=opts["request_count"],
        percentile=opts["percentile"],
        stability_percentage=opts["stability_percentage"],
        max_trials=opts["max_trials"],
        csv_file=opts["csv_file"],
        extra=tuple(a for chunk in opts["pa_args"] for a in shlex.split(chunk)),
    )
    inputs = perf_ops.InputOptions(rows=opts["rows"], max_tokens=opts["max_tokens"])
    try:
        perf_ops.perf(list(names), options, inputs, streaming=opts["streaming"], input_file=opts["input_file"],
                      write_input_data=opts["write_input_data"], echo=click.echo, live=sys.stdout)
    except perf_ops.PerfError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.returncode)


if __name__ == "__main__":  # pragma: no cover
    main()
