"""Writing the model repository: host entries, vFM ensembles, artifacts.

Layout of a repository made by ``fmplex init``::

    fmplex.registry.json        the registry (slots -> tasks); Triton ignores files here
    fm.minilm/config.pbtxt      the host: backend "fmplex", written once
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

import os
import shutil
import tempfile
from pathlib import Path

from fmplex import registry
from fmplex.artifacts import read_manifest, version_dir
from fmplex.backbones import get_backbone
from fmplex.kinds import HOST_INPUTS, SLOT_OUTPUTS, outputs_of
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

CONFIG = "config.pbtxt"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cfg-", dir=str(path.parent))
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the server may run as another user
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _inputs(optional: bool) -> str:
    return ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if optional else ""} }}' for n, t, d in HOST_INPUTS
    )


# Rows per batch: a light task waits for the batch in flight, and 16-row
# batches cut its p99 under a flood from ~370 to ~110 ms (perf/bench_overload.py)
# for ~12% of saturated throughput (the raw forward is nearly flat on this CPU:
# 273 vs 297 sentences/s). Raise it where throughput matters more, and on a GPU.
DEFAULT_BATCH_ROWS = 16


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
    outs = [
        f'  {{ name: "{prefix}{k}" data_type: {dtype} dims: {dims} }}' for k in range(slots) for prefix, dtype, dims in SLOT_OUTPUTS
    ]
    params = {
        "slots": slots,
        "torch_threads": torch_threads,
        "max_batch_rows": max_batch_rows,
        "max_batch_tokens": 8192,
        "max_lag": 4096,
        "max_queue_delay_us": 0,
        "max_rows_per_request": 256,
        "max_text_bytes": 16384,
        "extension_budget_mb": f"{extension_budget_mb:g}",
        "policy": "wfq",
        "workers": workers,
    }
    out_text = ",\n".join(outs)
    param_text = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f"""# fmplex host (physical FM) for backbone '{backbone}': {spec.description}.
# Written once by 'fmplex init'; editing anything under this directory reloads the backbone.
# Slot pool: {slots} slots. Slot k answers on outputs OUT_k (FP32), TXT_k (BYTES) and TOK_k (FP32 per token);
# the registry (../{registry.REGISTRY_FILE}) says which task owns each slot.
# execute() only enqueues: the fmplex scheduler batches rows of all tasks together.
name: "{spec.host_model}"
backend: "fmplex"
max_batch_size: 0
input [
{_inputs(optional=True)}
]
output [
{out_text}
]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
{param_text}
"""


def vfm_config(entry: TaskEntry, host_model: str) -> str:
    assert entry.slot is not None and entry.deployed_version is not None
    public = outputs_of(entry.outputs_family)
    outputs = ",\n".join(f'  {{ name: "{o.name}" data_type: {o.data_type} dims: {o.dims} }}' for o in public)
    maps = "\n".join(f'      output_map {{ key: "{o.host_prefix}{entry.slot}" value: "{o.name}" }}' for o in public)
    inmaps = "\n".join(f'      input_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in HOST_INPUTS)
    return f"""# fmplex vFM '{entry.name}' ({entry.kind}) v{entry.deployed_version} on host {host_model}, slot {entry.slot}.
# Written by 'fmplex deploy'. An ensemble costs no process: requests go straight to the shared host.
name: "{entry.name}"
platform: "ensemble"
max_batch_size: 0
version_policy: {{ specific: {{ versions: [ {entry.deployed_version} ] }} }}
input [
{_inputs(optional=True)}
]
output [
{outputs}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{host_model}"
      model_version: -1
{inmaps}
{maps}
    }}
  ]
}}
parameters {{ key: "fmplex_task" value {{ string_value: "{entry.name}" }} }}
parameters {{ key: "fmplex_kind" value {{ string_value: "{entry.kind}" }} }}
"""


# --- repository operations (no server involved) --------------------------------


def init_repository(
    repo: Path,
    backbones: list[str],
    slots: int = registry.DEFAULT_SLOTS,
    extension_budget_mb: float = 1024,
    max_batch_rows: int = DEFAULT_BATCH_ROWS,
    workers: str = "auto",
) -> Registry:
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    path = registry.registry_path(repo)
    reg = registry.load(repo) if path.exists() else Registry()
    for name in backbones:
        spec = get_backbone(name)
        if name in reg.hosts:
            continue
        hdir = repo / spec.host_model
        _write_atomic(hdir / CONFIG, host_config(name, slots, extension_budget_mb=extension_budget_mb, max_batch_rows=max_batch_rows, workers=workers))
        (hdir / "1").mkdir(exist_ok=True)
        (hdir / "1" / ".keep").touch()  # git keeps no empty directories
        reg.hosts[name] = HostEntry(backbone=name, model=spec.host_model, slots=slots)
    registry.save(repo, reg)
    return reg


def task_versions(repo: Path, name: str) -> list[int]:
    tdir = Path(repo) / name
    if not tdir.is_dir():
        return []
    return sorted(int(p.name) for p in tdir.iterdir() if p.is_dir() and p.name.isdigit())


def write_vfm(repo: Path, entry: TaskEntry, reg: Registry) -> Path:
    from fmplex.generative import control as gen_ops  # noqa: PLC0415

    if gen_ops.is_generative(entry.backbone):  # decoder LM: NAME (whole answers) + NAME.stream ensembles
        return gen_ops.write_vfms(repo, entry, reg)[0]
    host = reg.hosts.get(entry.backbone)
    if host is None:
        raise RegistryError(f"no host for backbone '{entry.backbone}' (run 'fmplex init --backbone {entry.backbone}')")
    read_manifest(version_dir(repo, entry.name, entry.deployed_version or entry.version))  # refuse broken artifacts
    path = Path(repo) / entry.name / CONFIG
    _write_atomic(path, vfm_config(entry, host.model))
    return path


def remove_vfm(repo: Path, name: str) -> None:
    (Path(repo) / name / CONFIG).unlink(missing_ok=True)
    from fmplex.generative.control import remove_stream_vfm  # noqa: PLC0415

    remove_stream_vfm(repo, name)  # a generative task's NAME.stream (task names have no dots: nothing else matches)


def delete_version(repo: Path, name: str, version: int) -> None:
    """Remove one version directory (a build that failed its checks)."""
    registry.check_task_name(name)
    shutil.rmtree(version_dir(repo, name, version), ignore_errors=True)
    tdir = Path(repo) / name
    if tdir.is_dir() and not any(tdir.iterdir()):
        tdir.rmdir()


def delete_task_files(repo: Path, name: str) -> None:
    registry.check_task_name(name)
    tdir = Path(repo) / name
    if tdir.is_dir():
        shutil.rmtree(tdir)
