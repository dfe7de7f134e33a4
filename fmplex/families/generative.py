"""Decoder LMs (SmolLM2): a whole-answer host and its streaming twin, generate/LoRA tasks.

Layout added to a repository::

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
``NAME.stream`` never collides with another task. ``fmplex serve`` loads the
streaming twin and the ``NAME.stream`` vFMs after the rest (start-up extras).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from fmplex import registry
from fmplex.artifacts import ArtifactError, read_manifest, version_dir, write_manifest
from fmplex.backbones import GENERATIVE, STREAM_SUFFIX, get_generative
from fmplex.generative.serving import check_artifact
from fmplex.kinds import TEXT_PREFIX
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

from .base import BackboneFamily, BuiltTask, Echo, OptionError, TaskKind
from .triton_config import CONFIG, Tensor, ensemble_config, parameters, tensor_list, write_atomic, write_host

BACKEND = "fmplex_gen"  # the Python-based backend directory holding generate_host's shim
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
USAGE = {"generate": "nothing to give: fmplex task create chat --backbone smollm2", "lora": "--source PEFT_DIR", "ia3": "--source PEFT_DIR"}

# Host defaults (config parameters; editing a host config reloads the backbone).
DEFAULT_MAX_ROWS = 8  # running sequences per decode step
DEFAULT_PREFILL_TOKENS = 1024  # prompt tokens (rows x padded length) admitted per step
DEFAULT_MAX_CONTEXT = 2048  # prompt + new tokens per sequence
DEFAULT_MAX_TOKENS = 16  # new tokens when a request does not say
MAX_TOKENS_LIMIT = 512  # the most a request may ask for


def stream_name(task: str) -> str:
    return f"{task}{STREAM_SUFFIX}"


def _inputs() -> list[Tensor]:
    return [Tensor(n, t, d, opt) for n, t, d, opt in GEN_INPUTS]


# --- configs -----------------------------------------------------------------------


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
    outs = [Tensor(f"{TEXT_PREFIX}{k}", "TYPE_STRING", "[ -1 ]") for k in range(slots)]
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
{tensor_list(_inputs())}
]
output [
{tensor_list(outs)}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{parameters(params)}
"""


def vfm_config(entry: TaskEntry, host_model: str, model_name: str, streaming: bool) -> str:
    assert entry.slot is not None and entry.deployed_version is not None
    how = "streams (gRPC stream_infer / HTTP generate_stream)" if streaming else "answers whole (plain infer)"
    return ensemble_config(
        name=model_name,
        version=entry.deployed_version,
        host_model=host_model,
        inputs=_inputs(),
        outputs=[Tensor(OUTPUT, "TYPE_STRING", "[ -1 ]")],
        output_map={f"{TEXT_PREFIX}{entry.slot}": OUTPUT},
        task=entry.name,
        kind=entry.kind,
        comment=f"fmplex vFM '{model_name}' (generative {entry.kind} task '{entry.name}') v{entry.deployed_version} on host "
        f"{host_model}, slot {entry.slot}: {how}.\n"
        "Written by 'fmplex deploy'. An ensemble costs no process: requests go straight to the shared host.",
    )


# --- repository operations ------------------------------------------------------------


def init_hosts(repo: Path, backbones: list[str], slots: int = registry.DEFAULT_SLOTS, max_rows: int = DEFAULT_MAX_ROWS) -> Registry:
    """Write both host configs of each generative backbone and register the host (once)."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    if not registry.registry_path(repo).exists():
        registry.save(repo, Registry())
    with registry.editing(repo) as reg:
        for name in backbones:
            spec = get_generative(name)
            if name in reg.hosts:
                continue
            for decoupled, model in ((False, spec.host_model), (True, spec.stream_model)):
                write_host(repo, model, host_config(name, slots, decoupled=decoupled, max_rows=max_rows))
            reg.hosts[name] = HostEntry(backbone=name, model=spec.host_model, slots=slots)
    return registry.load(repo)


def write_vfms(repo: Path, entry: TaskEntry, reg: Registry) -> list[Path]:
    """Both ensembles of a deployed generative task (whole answers + streaming)."""
    spec = get_generative(entry.backbone)
    if entry.backbone not in reg.hosts:
        raise RegistryError(f"no host for backbone '{entry.backbone}' (run 'fmplex init --backbone {entry.backbone}')")
    version = entry.deployed_version or entry.version
    read_manifest(version_dir(repo, entry.name, version))  # refuse broken artifacts
    whole = Path(repo) / entry.name / CONFIG
    write_atomic(whole, vfm_config(entry, spec.host_model, entry.name, streaming=False))
    sdir = Path(repo) / stream_name(entry.name)
    for old in sdir.glob("*") if sdir.is_dir() else []:
        if old.is_dir() and old.name.isdigit() and old.name != str(version):
            shutil.rmtree(old, ignore_errors=True)
    (sdir / str(version)).mkdir(parents=True, exist_ok=True)
    (sdir / str(version) / ".keep").touch()
    stream = sdir / CONFIG
    write_atomic(stream, vfm_config(entry, spec.stream_model, stream_name(entry.name), streaming=True))
    return [whole, stream]


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
    from fmplex.generative.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: PLC0415 - torch
    from fmplex.generative.smollm import fingerprint  # noqa: PLC0415

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


class GenerativeFamily(BackboneFamily):
    name = "generative"
    summary = "decoder LMs: text generation with continuous batching, whole answers and a streaming twin"

    def backbones(self) -> dict[str, str]:
        return {n: s.description for n, s in GENERATIVE.items()}

    def host_models(self, backbone: str) -> list[str]:
        spec = get_generative(backbone)
        return [spec.host_model, spec.stream_model]

    def init_hosts(self, repo: Path, backbones: list[str], slots: int, options: dict[str, Any], echo: Echo) -> None:
        reg = init_hosts(repo, backbones, slots)
        for name in backbones:
            spec, host = get_generative(name), reg.hosts[name]
            echo(f"host {spec.stream_model}: streaming twin of {spec.host_model} (same slots)")
            echo(f"host {host.model}: backbone {name}, {host.slots} slots")

    def kinds(self) -> list[TaskKind]:
        return [TaskKind(k, summary, USAGE.get(k, '--source PEFT_DIR')) for k, summary in KINDS.items()]

    def build_task(
        self, repo: Path, name: str, version: int, backbone: str, kind: str, options: dict[str, Any], echo: Echo
    ) -> BuiltTask:
        if options.get("train_csv") is not None:
            raise OptionError("--train fits classifier heads; generative tasks generate text (give a LoRA with --source)")
        build_task(repo, name, backbone, kind, options.get("source"), version, echo)
        return BuiltTask(FAMILY, f"TEXT in -> {OUTPUT} out")

    def check_artifact(self, vdir: Path, backbone: str) -> Any:
        return check_artifact(vdir, backbone)

    def describe_task(self, repo: Path, entry: TaskEntry, manifest: dict[str, Any]) -> list[tuple[str, str]]:
        lines = [
            ("vFMs", f"{entry.name} (TEXT -> {OUTPUT}, whole answers), {stream_name(entry.name)} (streamed)"),
            ("inputs", f"{', '.join(n for n, _, _, _ in GEN_INPUTS)} (or parameters max_tokens, temperature, top_k, top_p, seed, stop)"),
        ]
        vdir = version_dir(repo, entry.name, entry.deployed_version or entry.version)
        if (vdir / "adapter_config.json").is_file():
            cfg = json.loads((vdir / "adapter_config.json").read_text(encoding="utf-8"))
            lora = cfg.get("peft_type") == "LORA"
            what = f"LoRA r={cfg.get('r')} alpha={cfg.get('lora_alpha')}" if lora else str(cfg.get("peft_type"))
            lines.append(("adapter", f"{what} on {cfg.get('target_modules')}"))
        return lines + super().describe_task(repo, entry, manifest)

    def write_task_models(self, repo: Path, entry: TaskEntry, reg: Registry) -> list[str]:
        write_vfms(repo, entry, reg)
        return self.task_models(entry.name)

    def task_models(self, name: str) -> list[str]:
        return [name, stream_name(name)]

    def remove_task_models(self, repo: Path, name: str) -> None:
        super().remove_task_models(repo, name)
        shutil.rmtree(Path(repo) / stream_name(name), ignore_errors=True)

    def start_up_models(self, reg: Registry) -> list[str]:
        """The streaming twins and the ``NAME.stream`` vFMs (``serving.start`` loads hosts and ``NAME`` vFMs)."""
        names = [get_generative(b).stream_model for b in self.own_backbones(reg)]
        names += [stream_name(t.name) for t in sorted(reg.tasks.values(), key=lambda t: t.name) if t.backbone in GENERATIVE and t.deployed]
        return names

    def watched_models(self, reg: Registry) -> list[str]:
        return [get_generative(b).stream_model for b in self.own_backbones(reg)]
