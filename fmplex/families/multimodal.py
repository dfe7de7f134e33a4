"""Multimodal models served as stages: an encode and an lm stage host, multimodal tasks.

Repository layout (``fmplex init --backbone llava-tiny``)::

    fm.llava-tiny.encode/config.pbtxt     encode stage host (backend fmplex_mm_encode,
                                          Triton dynamic batcher across requests and tasks)
    fm.llava-tiny.encode/1/               its weights: vision tower + projector (see multimodal/models.py)
    fm.llava-tiny.lm/config.pbtxt         lm stage host (backend fmplex_mm_lm, slot pool)
    fm.llava-tiny.lm/1/                   its weights: LM + lm_head
    caption/config.pbtxt                  a multimodal vFM: ensemble, one step on the lm host
    caption/1/manifest.json               the task: prompt and generation defaults

Both stage hosts are registered as hosts in ``fmplex.registry.json`` (keys
``llava-tiny`` for the lm host, whose slots the tasks take, and
``llava-tiny.encode``), so ``fmplex serve`` loads them with the other hosts,
its watchdog covers them, and ``fmplex status`` / ``undeploy`` work on
multimodal vFMs as on any other. Tasks have kind ``multimodal``. Unlike the
other families, a stage host's directory holds its weights, written once at
``init``; nothing under it changes afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import click

from fmplex import registry
from fmplex.artifacts import ArtifactError, read_manifest, version_dir, write_manifest
from fmplex.backbones import MULTIMODAL, get_multimodal
from fmplex.multimodal.interface import LM_INPUTS, SLOT_OUTPUTS, SLOT_TYPES
from fmplex.multimodal.models import STAGE_FILE, ModelError, build_config, write_stages
from fmplex.multimodal.placement import PlacementError, format_cpus, parse_cpus
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

from .base import BackboneFamily, BuiltTask, Echo, TaskKind
from .triton_config import CONFIG, Tensor, ensemble_config, parameters, tensor_list, write_atomic

KIND = "multimodal"
DEFAULT_SLOTS = 64
ENCODE_BACKEND = "fmplex_mm_encode"
LM_BACKEND = "fmplex_mm_lm"
MAX_NEW_TOKENS_LIMIT = 256


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


def _lm_inputs() -> list[Tensor]:
    return [Tensor(n, t, d, o) for n, t, d, o in LM_INPUTS]


def encode_config(name: str, place: StagePlacement, max_batch: int = 16, queue_delay_us: int = 500) -> str:
    """``queue_delay_us``: the batcher's wait for more images. The images of one
    prompt reach it within a fraction of a millisecond of each other (parallel
    BLS calls), so 0.5 ms keeps them together at little cost to a lone image
    (measured; see docs/benchmarks)."""
    spec = get_multimodal(name)
    cfg = build_config(name)
    vc = cfg.vision_config
    if spec.family == "llava":
        tokens = (vc.image_size // vc.patch_size) ** 2
    else:
        tokens = vc.max_num_tiles * ((vc.image_size // vc.patch_size) ** 2 + 1)
    parse_cpus(place.cpus)  # refuse a malformed list here, not in the server
    return f"""# fmplex encode stage of multimodal backbone '{name}': vision tower + projector.
# Written once by 'fmplex init'; editing anything under this directory reloads the stage.
# Triton's dynamic batcher merges images of all requests and tasks (the lm stage sends one image per request).
name: "{spec.encode_model}"
backend: "{ENCODE_BACKEND}"
max_batch_size: {max_batch}
input [ {{ name: "PIXEL_VALUES" data_type: TYPE_FP32 dims: [ {vc.num_channels}, {vc.image_size}, {vc.image_size} ] }} ]
output [ {{ name: "FEATURES" data_type: TYPE_FP32 dims: [ {tokens}, {cfg.text_config.hidden_size} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {place.instances} }} ]
{parameters({"stage": "encode", "backbone": name, "device": place.device, "cpus": place.cpus, "torch_threads": 1})}
"""


def lm_config(name: str, place: StagePlacement, slots: int = DEFAULT_SLOTS, encode_concurrency: int = 16) -> str:
    """``encode_concurrency``: BLS calls in flight to the encoder (match its max batch,
    so that one lm instance alone can fill an encoder batch)."""
    spec = get_multimodal(name)
    parse_cpus(place.cpus)
    outputs = [Tensor(f"{p}{k}", t, d) for k in range(slots) for p, (t, d) in SLOT_TYPES.items()]
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
        "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT,
        "max_text_bytes": 4096,
        "queue_limit": 256,
    }
    return f"""# fmplex lm stage of multimodal backbone '{name}': prefill + decode; the host every multimodal vFM talks to.
# Written once by 'fmplex init'; editing anything under this directory reloads the stage.
# Slot pool: {slots} slots; slot k answers on {", ".join(p + "k" for p in SLOT_OUTPUTS)}.
# Requests with images send them to {spec.encode_model} (BLS, one image per request); text-only requests skip it.
name: "{spec.lm_model}"
backend: "{LM_BACKEND}"
max_batch_size: 0
input [
{tensor_list(_lm_inputs())}
]
output [
{tensor_list(outputs)}
]
instance_group [ {{ kind: KIND_CPU count: {place.instances} }} ]
{parameters(params)}
"""


def vfm_config(entry: TaskEntry, lm_model: str) -> str:
    assert entry.slot is not None and entry.deployed_version is not None
    return ensemble_config(
        name=entry.name,
        version=entry.deployed_version,
        host_model=lm_model,
        inputs=_lm_inputs(),
        outputs=[Tensor(pub, *SLOT_TYPES[p]) for p, pub in SLOT_OUTPUTS.items()],
        output_map={f"{p}{entry.slot}": pub for p, pub in SLOT_OUTPUTS.items()},
        task=entry.name,
        kind=KIND,
        comment=f"fmplex multimodal vFM '{entry.name}' v{entry.deployed_version} on {lm_model}, slot {entry.slot}.\n"
        "Written by 'fmplex deploy'. An ensemble costs no process; the lm stage routes images to the encoder.",
    )


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
        write_atomic(repo / spec.encode_model / CONFIG, encode_config(name, placement["encode"], max_encode_batch, encode_queue_delay_us))
        write_atomic(repo / spec.lm_model / CONFIG, lm_config(name, placement["lm"], slots, max_encode_batch))
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
        raise RegistryError(f"cannot read {path}: {exc} (run 'fmplex init --backbone {name}')") from None


def write_task(repo: Path, task: str, version: int, backbone: str, prompt: str = "", max_new_tokens: int = 32, temperature: float = 0.0) -> None:
    """A multimodal task's artifact: its prompt and generation defaults, checked against the stages."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise RegistryError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS_LIMIT}")
    if temperature < 0:
        raise RegistryError("temperature must be >= 0")
    write_manifest(
        version_dir(repo, task, version),
        {
            "kind": KIND,
            "backbone": backbone,
            "backbone_fingerprint": model_fingerprint(repo, backbone),
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "outputs": list(SLOT_OUTPUTS.values()),
            "source": "a prompt and generation defaults",
        },
    )


def check_artifact(vdir: Path, backbone: str) -> dict[str, Any]:
    """The task's manifest, refused unless it was made for the stages the repository holds."""
    manifest = read_manifest(vdir)
    task, version = vdir.parent.name, vdir.name
    if manifest.get("kind") != KIND:
        raise ArtifactError(f"{vdir}: kind '{manifest.get('kind')}' does not run on a multimodal backbone")
    if manifest.get("backbone") != backbone:
        raise ArtifactError(f"{vdir}: built for backbone '{manifest.get('backbone')}', not '{backbone}'")
    if manifest.get("backbone_fingerprint") != model_fingerprint(vdir.parent.parent, backbone):
        raise ArtifactError(f"task '{task}' v{version} was made for other '{backbone}' weights")
    return manifest


class MultimodalFamily(BackboneFamily):
    name = "multimodal"
    summary = "vision-language models served as stages: an encode stage host and an lm stage host"
    default_slots = DEFAULT_SLOTS
    errors = (ModelError, PlacementError)

    def backbones(self) -> dict[str, str]:
        return {n: s.description for n, s in MULTIMODAL.items()}

    def host_models(self, backbone: str) -> list[str]:
        spec = get_multimodal(backbone)
        return [spec.encode_model, spec.lm_model]

    def init_options(self) -> list[click.Option]:
        return [
            click.Option(
                ["--placement"], type=click.Choice(["shared", "split"]), default="shared", show_default=True,
                help="Multimodal stages: shared, both on one device and all CPUs; split, pinned apart (CPUs halved, or cuda:0 / cuda:1).",
            ),
            click.Option(["--encode-device"], default=None, help="Multimodal: torch device of the encode stage (cpu, cuda, cuda:N)."),
            click.Option(["--lm-device"], default=None, help="Multimodal: torch device of the lm stage."),
            click.Option(["--encode-cpus"], default=None, help="Multimodal: CPU list of the encode stage (e.g. 0-3); overrides --placement."),
            click.Option(["--lm-cpus"], default=None, help="Multimodal: CPU list of the lm stage; overrides --placement."),
            click.Option(["--encode-instances"], default=1, show_default=True, type=click.IntRange(1, 64), help="Multimodal: encode stage processes."),
            click.Option(["--lm-instances"], default=1, show_default=True, type=click.IntRange(1, 64), help="Multimodal: lm stage processes."),
            click.Option(["--max-encode-batch"], default=16, show_default=True, type=click.IntRange(1, 1024), help="Multimodal: images per encoder batch."),
            click.Option(
                ["--encode-queue-delay-us"], default=500, show_default=True, type=click.IntRange(0),
                help="Multimodal: how long the encoder's batcher waits to fill a batch.",
            ),
        ]  # fmt: skip

    def init_hosts(self, repo: Path, backbones: list[str], slots: int, options: dict[str, Any], echo: Echo) -> None:
        places = placements(options.get("placement") or "shared", options.get("encode_device"), options.get("lm_device"))
        for stage in ("encode", "lm"):
            cpus = options.get(f"{stage}_cpus")
            if cpus is not None:
                parse_cpus(cpus)
            place = places[stage]
            places[stage] = StagePlacement(place.device, place.cpus if cpus is None else cpus, options.get(f"{stage}_instances") or 1)
        for name in backbones:
            reg, fp = init_multimodal(repo, name, places, slots, options.get("max_encode_batch") or 16, options.get("encode_queue_delay_us", 500))
            echo(f"host {reg.hosts[encode_key(name)].model}: encode stage of {name}")
            echo(f"host {reg.hosts[name].model}: backbone {name}, {reg.hosts[name].slots} slots ({fp})")

    def kinds(self) -> list[TaskKind]:
        return [
            TaskKind(KIND, "a multimodal generation task: TEXT + optional IMAGES -> GENERATED_TEXT",
                     '[--prompt "USER: "] [--max-new-tokens 32] [--temperature 0]'),
        ]  # fmt: skip

    def create_options(self) -> list[click.Option]:
        return [
            click.Option(["--prompt"], default="", help="Multimodal tasks: text put before every request's TEXT (may hold <image> markers)."),
            click.Option(
                ["--max-new-tokens"], default=32, show_default=True, type=click.IntRange(1, MAX_NEW_TOKENS_LIMIT),
                help="Multimodal tasks: tokens generated when a request does not say.",
            ),
            click.Option(
                ["--temperature"], default=0.0, show_default=True, type=click.FloatRange(min=0.0),
                help="Multimodal tasks: sampling temperature when a request does not say (0 = greedy).",
            ),
        ]

    def build_task(
        self, repo: Path, name: str, version: int, backbone: str, kind: str, options: dict[str, Any], echo: Echo
    ) -> BuiltTask:
        for opt in ("source", "train_csv"):
            if options.get(opt) is not None:
                raise RegistryError(f"--{'train' if opt == 'train_csv' else opt} is not used by multimodal tasks (give --prompt)")
        write_task(repo, name, version, backbone, options.get("prompt") or "", options.get("max_new_tokens") or 32, options.get("temperature") or 0.0)
        return BuiltTask("", f"TEXT + IMAGES in -> {', '.join(SLOT_OUTPUTS.values())} out")

    def check_artifact(self, vdir: Path, backbone: str) -> Any:
        return check_artifact(vdir, backbone)

    def describe_task(self, repo: Path, entry: TaskEntry, manifest: dict[str, Any]) -> list[tuple[str, str]]:
        return [
            ("outputs", ", ".join(SLOT_OUTPUTS.values())),
            ("prompt", json.dumps(manifest.get("prompt", ""))),
            ("generation", f"max_new_tokens {manifest.get('max_new_tokens')}, temperature {manifest.get('temperature')}"),
            ("inputs", ", ".join(n for n, *_ in LM_INPUTS)),
        ] + super().describe_task(repo, entry, manifest)

    def hosts_of(self, entry: TaskEntry, reg: Registry) -> list[str]:
        return [reg.hosts[encode_key(entry.backbone)].model, reg.hosts[entry.backbone].model]

    def write_task_models(self, repo: Path, entry: TaskEntry, reg: Registry) -> list[str]:
        read_manifest(version_dir(repo, entry.name, entry.deployed_version or entry.version))  # refuse broken artifacts
        write_atomic(Path(repo) / entry.name / CONFIG, vfm_config(entry, reg.hosts[entry.backbone].model))
        return [entry.name]
