"""Control plane for multimodal backbones: stage hosts, tasks, vFMs.

Repository layout written here (``fmplex multimodal init llava-tiny``)::

    fm.llava-tiny.encode/config.pbtxt     encode stage host (backend fmplex_mm_encode,
                                          Triton dynamic batcher across requests and tasks)
    fm.llava-tiny.encode/1/               its weights: vision tower + projector (see models.py)
    fm.llava-tiny.lm/config.pbtxt         lm stage host (backend fmplex_mm_lm, slot pool)
    fm.llava-tiny.lm/1/                   its weights: LM + lm_head
    caption/config.pbtxt                  a multimodal vFM: ensemble, one step on the lm host
    caption/1/manifest.json               the task: prompt and generation defaults

Both stage hosts are registered as hosts in ``fmplex.registry.json`` (keys
``llava-tiny`` for the lm host, whose slots the tasks take, and
``llava-tiny.encode``), so ``fmplex serve`` loads them with the other hosts,
its watchdog covers them, and ``fmplex status`` / ``undeploy`` work on
multimodal vFMs as on any other. Tasks have kind ``multimodal``.
Nothing under a stage host's directory changes after ``init``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fmplex import registry
from fmplex.artifacts import read_manifest, version_dir, write_manifest
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

from .interface import LM_INPUTS, SLOT_OUTPUTS, SLOT_TYPES
from .models import STAGE_FILE, build_config, get_multimodal, write_stages
from .placement import PlacementError, format_cpus, parse_cpus

KIND = "multimodal"
CONFIG = "config.pbtxt"
DEFAULT_SLOTS = 64
ENCODE_BACKEND = "fmplex_mm_encode"
LM_BACKEND = "fmplex_mm_lm"

@dataclasses.dataclass(frozen=True)
class StagePlacement:
    """Where one stage host runs (written into its config)."""

    device: str = "cpu"
    cpus: str = ""  # Linux CPU list; "" = all
    instances: int = 1


def placements(kind: str, encode_device: str | None = None, lm_device: str | None = None) -> dict[str, StagePlacement]:
    """``shared``: both stages on one device and all CPUs; ``split``: pinned apart
    (CPUs halved between them; two GPUs when the devices are CUDA)."""
    if kind == "shared":
        return {"encode": StagePlacement(encode_device or "cpu"), "lm": StagePlacement(lm_device or encode_device or "cpu")}
    if kind != "split":
        raise PlacementError(f"unknown placement '{kind}' (shared or split)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise PlacementError("placement 'split' needs at least 2 CPUs")
    half = len(cpus) // 2
    return {
        "encode": StagePlacement(encode_device or "cpu", format_cpus(set(cpus[:half]))),
        "lm": StagePlacement(lm_device or ("cuda:1" if (encode_device or "").startswith("cuda") else "cpu"), format_cpus(set(cpus[half:]))),
    }


def _params(values: dict[str, Any]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in values.items())


def encode_config(name: str, place: StagePlacement, max_batch: int = 16, queue_delay_us: int = 500) -> str:
    """``queue_delay_us``: the batcher's wait for more images. The images of one
    prompt reach it within ~0.1 ms of each other (parallel BLS calls), so 0.5 ms
    keeps them together at little cost to a lone image (measured on 2 CPUs:
    1-image p50 ~9 ms at 0, ~12 ms at 2000 us; see the README)."""
    spec = get_multimodal(name)
    cfg = build_config(name)
    vc = cfg.vision_config
    if spec.family == "llava":
        tokens = (vc.image_size // vc.patch_size) ** 2
    else:
        tokens = vc.max_num_tiles * ((vc.image_size // vc.patch_size) ** 2 + 1)
    parse_cpus(place.cpus)  # refuse a malformed list here, not in the server
    return f"""# fmplex encode stage of multimodal backbone '{name}': vision tower + projector.
# Written once by 'fmplex multimodal init'; editing anything under this directory reloads the stage.
# Triton's dynamic batcher merges images of all requests and tasks (the lm stage sends one image per request).
name: "{spec.encode_model}"
backend: "{ENCODE_BACKEND}"
max_batch_size: {max_batch}
input [ {{ name: "PIXEL_VALUES" data_type: TYPE_FP32 dims: [ {vc.num_channels}, {vc.image_size}, {vc.image_size} ] }} ]
output [ {{ name: "FEATURES" data_type: TYPE_FP32 dims: [ {tokens}, {cfg.text_config.hidden_size} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {place.instances} }} ]
{_params({"stage": "encode", "backbone": name, "device": place.device, "cpus": place.cpus, "torch_threads": 1})}
"""


def lm_config(name: str, place: StagePlacement, slots: int = DEFAULT_SLOTS, encode_concurrency: int = 16) -> str:
    """``encode_concurrency``: BLS calls in flight to the encoder (match its max batch,
    so that one lm instance alone can fill an encoder batch)."""
    spec = get_multimodal(name)
    parse_cpus(place.cpus)
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}' for n, t, d, o in LM_INPUTS)
    outputs = ",\n".join(f'  {{ name: "{p}{k}" data_type: {t} dims: {d} }}' for k in range(slots) for p, (t, d) in SLOT_TYPES.items())
    params = {
        "stage": "lm",
        "backbone": name,
        "encode_model": spec.encode_model,
        "slots": slots,
        "device": place.device,
        "cpus": place.cpus,
        "torch_threads": 1,
        "encode_concurrency": encode_concurrency,
        "images_per_encode_request": 1,
        "max_images": 8,
        "max_new_tokens_limit": 256,
        "max_text_bytes": 4096,
        "queue_limit": 256,
    }
    return f"""# fmplex lm stage of multimodal backbone '{name}': prefill + decode; the host every multimodal vFM talks to.
# Written once by 'fmplex multimodal init'; editing anything under this directory reloads the stage.
# Slot pool: {slots} slots; slot k answers on {", ".join(p + "k" for p in SLOT_OUTPUTS)}.
# Requests with images send them to {spec.encode_model} (BLS, one image per request); text-only requests skip it.
name: "{spec.lm_model}"
backend: "{LM_BACKEND}"
max_batch_size: 0
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ kind: KIND_CPU count: {place.instances} }} ]
{_params(params)}
"""


def vfm_config(entry: TaskEntry, lm_model: str) -> str:
    assert entry.slot is not None and entry.deployed_version is not None
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if o else ""} }}' for n, t, d, o in LM_INPUTS)
    outputs = ",\n".join(f'  {{ name: "{pub}" data_type: {SLOT_TYPES[p][0]} dims: {SLOT_TYPES[p][1]} }}' for p, pub in SLOT_OUTPUTS.items())
    inmaps = "\n".join(f'      input_map {{ key: "{n}" value: "{n}" }}' for n, *_ in LM_INPUTS)
    outmaps = "\n".join(f'      output_map {{ key: "{p}{entry.slot}" value: "{pub}" }}' for p, pub in SLOT_OUTPUTS.items())
    return f"""# fmplex multimodal vFM '{entry.name}' v{entry.deployed_version} on {lm_model}, slot {entry.slot}.
# Written by 'fmplex multimodal deploy'. An ensemble costs no process; the lm stage routes images to the encoder.
name: "{entry.name}"
platform: "ensemble"
max_batch_size: 0
version_policy: {{ specific: {{ versions: [ {entry.deployed_version} ] }} }}
input [
{inputs}
]
output [
{outputs}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{lm_model}"
      model_version: -1
{inmaps}
{outmaps}
    }}
  ]
}}
parameters {{ key: "fmplex_task" value {{ string_value: "{entry.name}" }} }}
parameters {{ key: "fmplex_kind" value {{ string_value: "{KIND}" }} }}
"""


def _write(path: Path, text: str) -> None:
    from fmplex.control.repository import _write_atomic  # noqa: PLC0415 - one atomic writer for the repository

    _write_atomic(path, text)


def encode_key(name: str) -> str:
    """Registry host key of a backbone's encode stage (the lm stage uses the backbone name)."""
    return f"{name}.encode"


def init_multimodal(
    repo: Path,
    name: str,
    placement: dict[str, StagePlacement] | None = None,
    slots: int = DEFAULT_SLOTS,
    max_encode_batch: int = 16,
    encode_queue_delay_us: int = 500,
) -> tuple[Registry, str]:
    """Write both stage hosts (weights once, configs) and register them.

    Safe to run again: an existing stage is left untouched (a rewrite would
    reload it); returns the registry and the model fingerprint.
    """
    spec = get_multimodal(name)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    placement = placement or placements("shared")
    dirs = {"encode": repo / spec.encode_model / "1", "lm": repo / spec.lm_model / "1"}
    present = [s for s, d in dirs.items() if (d / STAGE_FILE).exists()]
    if len(present) == 2:
        fp = model_fingerprint(repo, name)
    elif present:
        raise RegistryError(f"only the {present[0]} stage of '{name}' exists in {repo}: remove it and run init again")
    else:
        fp = write_stages(name, dirs)
        _write(repo / spec.encode_model / CONFIG, encode_config(name, placement["encode"], max_encode_batch, encode_queue_delay_us))
        _write(repo / spec.lm_model / CONFIG, lm_config(name, placement["lm"], slots, max_encode_batch))
    if not registry.registry_path(repo).exists():
        registry.save(repo, Registry())
    with registry.editing(repo) as reg:
        reg.hosts.setdefault(encode_key(name), HostEntry(backbone=encode_key(name), model=spec.encode_model, slots=0))
        reg.hosts.setdefault(name, HostEntry(backbone=name, model=spec.lm_model, slots=slots))
    return registry.load(repo), fp


def model_fingerprint(repo: Path, name: str) -> str:
    """The fingerprint of the model whose stages the repository holds."""
    path = Path(repo) / get_multimodal(name).lm_model / "1" / STAGE_FILE
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["model_fingerprint"])
    except (OSError, ValueError, KeyError) as exc:
        raise RegistryError(f"cannot read {path}: {exc} (run 'fmplex multimodal init {name}')") from None


def create_task(
    repo: Path,
    task: str,
    backbone: str,
    prompt: str = "",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    description: str = "",
    weight: float = 1.0,
) -> TaskEntry:
    """A multimodal task: its prompt and generation defaults, as a new version."""
    from fmplex.control.repository import task_versions  # noqa: PLC0415

    registry.check_task_name(task)
    get_multimodal(backbone)
    if not 1 <= max_new_tokens <= 256:
        raise RegistryError("max_new_tokens must be 1..256")
    if temperature < 0:
        raise RegistryError("temperature must be >= 0")
    with registry.editing(repo) as reg:
        if backbone not in reg.hosts:
            raise RegistryError(f"no stage hosts for '{backbone}' in {repo} (run 'fmplex multimodal init {backbone}')")
        existing = reg.tasks.get(task)
        if existing is not None and existing.kind != KIND:
            raise RegistryError(f"task '{task}' exists with kind '{existing.kind}'")
        version = max(task_versions(repo, task), default=0) + 1
        fp = model_fingerprint(repo, backbone)
        write_manifest(
            version_dir(repo, task, version),
            {
                "kind": KIND,
                "backbone": backbone,
                "backbone_fingerprint": fp,
                "prompt": prompt,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "outputs": list(SLOT_OUTPUTS.values()),
            },
        )
        if existing is None:
            reg.tasks[task] = existing = TaskEntry(task, backbone, KIND, version, weight, description=description)
        else:
            existing.version = version
        return dataclasses.replace(existing)


def deploy_task(repo: Path, task: str, triton: Any | None, version: int | None = None) -> TaskEntry:
    """Slot + registry, ensemble config, then (with a server) load it."""
    with registry.editing(repo) as reg:
        entry = reg.task(task)
        if entry.kind != KIND:
            raise RegistryError(f"task '{task}' is not multimodal (kind '{entry.kind}'): use 'fmplex deploy'")
        target = version or entry.version
        manifest = read_manifest(version_dir(repo, task, target))
        if manifest.get("backbone_fingerprint") != model_fingerprint(repo, entry.backbone):
            raise RegistryError(f"task '{task}' v{target} was made for other '{entry.backbone}' weights")
        entry.slot = reg.allocate_slot(entry.backbone)
        entry.deployed_version = target
        _write(Path(repo) / task / CONFIG, vfm_config(entry, reg.hosts[entry.backbone].model))
        deployed = dataclasses.replace(entry)
        hosts = [reg.hosts[encode_key(entry.backbone)].model, reg.hosts[entry.backbone].model]
    if triton is not None:
        try:
            for host in hosts:
                if not triton.ready(host):
                    triton.load(host)
            triton.load(task)
        except Exception:
            with registry.editing(repo) as reg:
                e = reg.tasks.get(task)
                if e is not None:
                    e.slot = e.deployed_version = None
            (Path(repo) / task / CONFIG).unlink(missing_ok=True)
            raise
    return deployed
