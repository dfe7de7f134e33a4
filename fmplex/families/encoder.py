"""Text encoders (MiniLM): one ``fmplex`` host per backbone, classifier/embedding/PEFT tasks.

Layout in a repository::

    fm.minilm/config.pbtxt      the host: backend "fmplex", written once by 'fmplex init'
    fm.minilm/1/                (empty: the code lives in the backend directory)
    sentiment/config.pbtxt      the vFM: an ensemble with one step on fm.minilm,
                                written at deploy, removed at undeploy
    sentiment/1/manifest.json   the task's artifact, one directory per version
    sentiment/1/weights.safetensors

A host's directory never changes after ``init``: Triton reloads a model when
anything under its directory changes, and reloading the backbone is exactly
what fmplex exists to avoid.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fmplex import registry
from fmplex.artifacts import read_manifest, version_dir
from fmplex.backbones import BACKBONES, get_backbone
from fmplex.kinds import HOST_INPUTS, KINDS, SLOT_OUTPUTS, family_of, get_kind, outputs_of
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

from .base import BackboneFamily, BuiltTask, Echo, OptionError, TaskKind
from .triton_config import CONFIG, Tensor, ensemble_config, parameters, tensor_list, write_atomic, write_host

# Rows per batch: a light task waits for the batch in flight, and small
# batches cut its p99 under a flood for a little saturated throughput (the
# raw forward is nearly flat on a CPU; see docs/benchmarks). Raise it where
# throughput matters more, and on a GPU.
DEFAULT_BATCH_ROWS = 16

# How each kind is created (``fmplex task create --help``).
USAGE = {
    "embedding": "nothing to give: fmplex task create vec --kind embedding",
    "classifier": "--train data.csv: fmplex task create mood --train mood.csv",
    "lora": "--source PEFT_DIR [--train data.csv for a linear head; a SEQ_CLS/TOKEN_CLS adapter brings its trained head]",
    "ia3": "--source PEFT_DIR [--train data.csv]",
    "prompt": "--source PEFT_DIR [--train data.csv]",
    "adapter": "--source adapter.safetensors [--train data.csv]",
    "fork": "--source CHECKPOINT_DIR (a fine-tuned BertModel / ...ForSequenceClassification / ...ForTokenClassification "
    "of the same backbone)",
    "onnx": "--source head.onnx --labels a,b [--onnx-input hidden] [--onnx-family token]",
}


def _host_inputs() -> list[Tensor]:
    return [Tensor(n, t, d, optional=True) for n, t, d in HOST_INPUTS]


def _workers(value: str) -> str:
    if value != "auto" and not (value.isdigit() and 1 <= int(value) <= 64):
        raise click.BadParameter(f"'{value}' is neither 'auto' nor a number from 1 to 64")
    return value


def host_config(
    backbone: str,
    slots: int,
    torch_threads: int = 1,
    instances: int = 1,
    extension_budget_mb: float = 1024,
    max_batch_rows: int = DEFAULT_BATCH_ROWS,
    workers: str = "auto",
) -> str:
    spec = get_backbone(backbone)
    outs = [Tensor(f"{prefix}{k}", dtype, dims) for k in range(slots) for prefix, dtype, dims in SLOT_OUTPUTS]
    params = {
        "slots": slots,
        "torch_threads": torch_threads,
        "max_batch_rows": max_batch_rows,
        "saturated_batch_rows": max(64, max_batch_rows),
        "light_window_ms": 1000,
        "max_batch_tokens": 8192,
        "max_lag": 4096,
        "max_queue_delay_us": 0,
        "max_rows_per_request": 256,
        "max_text_bytes": 16384,
        "extension_budget_mb": f"{extension_budget_mb:g}",
        "policy": "wfq",
        "workers": workers,
    }
    return f"""# fmplex host (physical FM) for backbone '{backbone}': {spec.description}.
# Written once by 'fmplex init'; editing anything under this directory reloads the backbone.
# Slot pool: {slots} slots. Slot k answers on outputs OUT_k (FP32), TXT_k (BYTES) and TOK_k (FP32 per token);
# the registry (../{registry.REGISTRY_FILE}) says which task owns each slot.
# execute() only enqueues: the fmplex scheduler batches rows of all tasks together.
name: "{spec.host_model}"
backend: "fmplex"
max_batch_size: 0
input [
{tensor_list(_host_inputs())}
]
output [
{tensor_list(outs)}
]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
{parameters(params)}
"""


def vfm_config(entry: TaskEntry, host_model: str) -> str:
    assert entry.slot is not None and entry.deployed_version is not None
    public = outputs_of(entry.outputs_family)
    return ensemble_config(
        name=entry.name,
        version=entry.deployed_version,
        host_model=host_model,
        inputs=_host_inputs(),
        outputs=[Tensor(o.name, o.data_type, o.dims) for o in public],
        output_map={f"{o.host_prefix}{entry.slot}": o.name for o in public},
        task=entry.name,
        kind=entry.kind,
        comment=f"fmplex vFM '{entry.name}' ({entry.kind}) v{entry.deployed_version} on host {host_model}, slot {entry.slot}.\n"
        "Written by 'fmplex deploy'. An ensemble costs no process: requests go straight to the shared host.",
    )


def init_hosts(
    repo: Path,
    backbones: list[str],
    slots: int = registry.DEFAULT_SLOTS,
    extension_budget_mb: float = 1024,
    max_batch_rows: int = DEFAULT_BATCH_ROWS,
    workers: str = "auto",
) -> Registry:
    """Write each encoder backbone's host config once and register the host."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    path = registry.registry_path(repo)
    reg = registry.load(repo) if path.exists() else Registry()
    for name in backbones:
        spec = get_backbone(name)
        if name in reg.hosts:
            continue
        text = host_config(name, slots, extension_budget_mb=extension_budget_mb, max_batch_rows=max_batch_rows, workers=workers)
        write_host(repo, spec.host_model, text)
        reg.hosts[name] = HostEntry(backbone=name, model=spec.host_model, slots=slots)
    registry.save(repo, reg)
    return reg


def write_vfm(repo: Path, entry: TaskEntry, reg: Registry) -> Path:
    host = reg.hosts.get(entry.backbone)
    if host is None:
        raise RegistryError(f"no host for backbone '{entry.backbone}' (run 'fmplex init --backbone {entry.backbone}')")
    read_manifest(version_dir(repo, entry.name, entry.deployed_version or entry.version))  # refuse broken artifacts
    path = Path(repo) / entry.name / CONFIG
    write_atomic(path, vfm_config(entry, host.model))
    return path


def check_artifact(vdir: Path, backbone: str) -> Any:
    """Load an artifact exactly as the host will (truncated weights, shapes that do
    not fit, a broken ONNX graph are refused here)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from fmplex.triton_backend.extensions import load_extension  # noqa: PLC0415

    spec = get_backbone(backbone)
    return load_extension(vdir, spec, config=AutoConfig.from_pretrained(str(spec.locate()), local_files_only=True))


def build_task(
    repo: Path,
    name: str,
    version: int,
    backbone: str,
    kind: str,
    source: Path | None = None,
    train_csv: Path | None = None,
    labels: str | None = None,
    onnx_input: str = "pooled",
    onnx_family: str = "classifier",
    echo: Echo = lambda _m: None,
) -> BuiltTask:
    """Import ``source`` and/or fit a head on ``train_csv``; write and check REPO/NAME/VERSION."""
    from fmplex.control import importers  # noqa: PLC0415
    from fmplex.control import train as trainer  # noqa: PLC0415 - torch-heavy

    spec = get_backbone(backbone)
    if kind in importers.IMPORTERS and source is None:
        raise OptionError(f"a {kind} task needs --source ({get_kind(kind).source})")
    if kind not in importers.IMPORTERS and source is not None:
        raise OptionError(f"--source is not used by {kind} tasks")
    if kind == "classifier" and train_csv is None:
        raise OptionError("a classifier needs --train data.csv (columns: text,label)")
    if train_csv is not None and kind in ("embedding", "fork", "onnx"):
        raise OptionError(f"--train fits a linear head; {'use --kind classifier' if kind == 'embedding' else f'{kind} tasks bring their own head'}")
    options = {"labels": [x.strip() for x in labels.split(",")] if labels else None, "onnx_input": onnx_input, "onnx_family": onnx_family,
               "train": train_csv is not None}
    built = importers.build(kind, source, spec, options, echo) if source is not None else importers.Built()
    fields = {"head": {"type": "embedding"}, **built.manifest}
    tensors = dict(built.tensors)
    if train_csv is not None:
        from fmplex.triton_backend.executor import Executor  # noqa: PLC0415
        from fmplex.triton_backend.extensions import extension_class  # noqa: PLC0415

        texts, labs = trainer.read_labelled_csv(train_csv)
        executor = Executor(spec)
        ext = None
        if kind != "classifier":  # fit the head on the task's own features
            ext = extension_class(kind)({**fields, "kind": kind, "backbone": backbone, "task": name}, tensors, spec, config=executor.config)
        with click.progressbar(length=len(texts), label="embedding", file=sys.stderr) as bar:
            head, report = trainer.train_classifier(backbone, texts, labs, echo=lambda m: None, progress=bar.update, extension=ext, executor=executor)
        if report.holdout_accuracy is not None:
            echo(f"held-out accuracy (80/20 split): {report.holdout_accuracy:.3f}")
        echo(f"training accuracy: {report.train_accuracy:.3f} ({report.rows} rows, labels: {', '.join(report.labels)})")
        head_fields, head_tensors = trainer.head_fields(head, report)
        fields.update(head_fields)
        tensors.update(head_tensors)
    out = version_dir(repo, name, version)
    where = f"trained on {train_csv.name}" if train_csv else ""
    src = ", ".join(x for x in (f"imported from {source}" if source else "", where) if x) or "backbone embedding"
    manifest = trainer.write_artifact(out, name, version, backbone, kind, fields, tensors, built.files, src)
    ext = check_artifact(out, backbone)
    outputs = family_of(manifest)
    return BuiltTask(outputs, f"{outputs} outputs, {ext.nbytes / 1024:.1f} KiB")


class EncoderFamily(BackboneFamily):
    name = "encoder"
    summary = "text encoders: embeddings, classifiers and PEFT extensions on one shared host"

    def backbones(self) -> dict[str, str]:
        return {n: s.description for n, s in BACKBONES.items()}

    def host_models(self, backbone: str) -> list[str]:
        return [get_backbone(backbone).host_model]

    def init_options(self) -> list[click.Option]:
        return [
            click.Option(
                ["--extension-budget-mb"], default=1024.0, show_default=True, type=click.FloatRange(min=0.0),
                help="Encoder hosts: memory for resident task extensions; least recently used ones are evicted beyond it.",
            ),
            click.Option(
                ["--max-batch-rows"], default=DEFAULT_BATCH_ROWS, show_default=True, type=click.IntRange(1, 4096),
                help="Encoder hosts: rows per shared batch (16 suits a CPU; raise it on a GPU).",
            ),
            click.Option(
                ["--workers"], default="auto", show_default=True, callback=lambda _c, _p, v: _workers(v),
                help="Encoder hosts: batches run at once, one torch thread each ('auto': one per core up to 4 on a CPU, 1 on a GPU).",
            ),
        ]

    def init_hosts(self, repo: Path, backbones: list[str], slots: int, options: dict[str, Any], echo: Echo) -> None:
        reg = init_hosts(repo, backbones, slots, options["extension_budget_mb"], options["max_batch_rows"], options["workers"])
        for name in backbones:
            host = reg.hosts[name]
            echo(f"host {host.model}: backbone {name}, {host.slots} slots")

    def kinds(self) -> list[TaskKind]:
        return [TaskKind(k.name, k.summary, USAGE.get(k.name, k.source)) for k in sorted(KINDS.values(), key=lambda k: k.name != "classifier")]

    def create_options(self) -> list[click.Option]:
        return [
            click.Option(["--labels"], default=None, help="Encoder tasks: comma-separated labels of an ONNX head, or of a PEFT adapter's trained classifier "
                         "(default: id2label of a config.json beside the adapter, else LABEL_<i>)."),
            click.Option(
                ["--onnx-input"], type=click.Choice(["pooled", "hidden"]), default="pooled", show_default=True,
                help="Encoder onnx tasks: the head's input, the pooled sentence vector [rows, hidden] or token states + mask.",
            ),
            click.Option(
                ["--onnx-family"], type=click.Choice(["classifier", "embedding", "token"]), default="classifier", show_default=True,
                help="Encoder onnx tasks: what the head returns (which public outputs the vFM has).",
            ),
        ]

    def build_task(
        self, repo: Path, name: str, version: int, backbone: str, kind: str, options: dict[str, Any], echo: Echo
    ) -> BuiltTask:
        return build_task(
            repo, name, version, backbone, kind, options.get("source"), options.get("train_csv"),
            options.get("labels"), options.get("onnx_input", "pooled"), options.get("onnx_family", "classifier"), echo,
        )  # fmt: skip

    def check_artifact(self, vdir: Path, backbone: str) -> Any:
        return check_artifact(vdir, backbone)

    def describe_task(self, repo: Path, entry: TaskEntry, manifest: dict[str, Any]) -> list[tuple[str, str]]:
        lines = [("outputs", ", ".join(o.name for o in outputs_of(entry.outputs_family)))]
        if "labels" in manifest:
            lines.append(("labels", ", ".join(manifest["labels"])))
        if "training" in manifest:
            tr = manifest["training"]
            lines.append(("training", f"{tr.get('rows')} rows, accuracy {tr.get('train_accuracy')}, held-out {tr.get('holdout_accuracy')}"))
        return lines + super().describe_task(repo, entry, manifest)

    def write_task_models(self, repo: Path, entry: TaskEntry, reg: Registry) -> list[str]:
        write_vfm(repo, entry, reg)
        return [entry.name]
