"""The control-plane side of a family that comes as one family object (vision, time series).

``VisionFamily`` and ``SeriesFamily`` each describe their backbone as data
(host inputs, the public outputs of each output family with the host output
prefix they travel under, task kinds) and build and check task artifacts
themselves. :class:`SingleHostFamily` turns such an object into a
:class:`~fmplex.families.base.BackboneFamily`: one host per backbone on its
own Python-based backend, its config with the slot outputs, and each task's
vFM through the one ensemble writer. A subclass names the family object,
the backend, the host outputs and the create options.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

from fmplex import registry
from fmplex.artifacts import version_dir
from fmplex.registry import HostEntry, Registry, RegistryError, TaskEntry

from .base import BackboneFamily, BuiltTask, Echo, OptionError, TaskKind
from .triton_config import Tensor, ensemble_config, parameters, tensor_list, write_atomic, write_host

CONFIG = "config.pbtxt"


class BuildError(ValueError):
    """A family object's own user error while building a task (bad source, training data): one line, exit 1."""


class SingleHostFamily(BackboneFamily):
    backend: ClassVar[str]  # the Python-based backend its hosts run (fmplex/control/server.py assembles it)
    catalog: ClassVar[dict[str, Any]]  # fmplex.backbones.VISION or SERIES
    host_outputs: ClassVar[tuple[tuple[str, str, str], ...]]  # (prefix, type, dims) of each slot output
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    default_slots = 64
    errors = (BuildError,)
    host_params: ClassVar[dict[str, Any]] = {}
    # "module:Class" of the family object and of the build errors a user causes: imported only when
    # needed (they pull in torch), so listing the families stays cheap.
    object_path: ClassVar[str]
    error_paths: ClassVar[tuple[str, ...]] = ()

    def family_object(self) -> Any:
        """The family object (``VisionFamily()`` ...), made once; it loads the backbone on first use."""
        obj = getattr(self, "_object", None)
        if obj is None:
            obj = self._object = self.make_object()
        return obj

    def make_object(self) -> Any:
        return self.object_class()()

    # --- the catalog ------------------------------------------------------------------------------
    def backbones(self) -> dict[str, str]:
        return {n: s.description for n, s in self.catalog.items()}

    def host_models(self, backbone: str) -> list[str]:
        return [self.catalog[backbone].host_model]

    # --- hosts ------------------------------------------------------------------------------------
    def host_inputs(self) -> list[Tensor]:
        obj_cls = self.object_class()
        return [Tensor(t.name, t.data_type, t.dims, optional=t.name in self.optional_inputs) for t in obj_cls.inputs]

    def object_class(self) -> Any:
        return _imported(self.object_path)

    def host_config(self, backbone: str, slots: int) -> str:
        spec = self.catalog[backbone]
        outs = [Tensor(f"{prefix}{k}", dtype, dims) for k in range(slots) for prefix, dtype, dims in self.host_outputs]
        prefixes = "/".join(f"{p}k" for p, _, _ in self.host_outputs)
        params = {"slots": slots, "torch_threads": 1, **self.host_params}
        return f"""# fmplex {self.name} host for backbone '{backbone}': {spec.description}.
# Written once by 'fmplex init'; editing anything under this directory reloads the backbone.
# Slot pool: {slots} slots. Slot k answers on {prefixes}; the registry (../{registry.REGISTRY_FILE}) says which task owns each slot.
name: "{spec.host_model}"
backend: "{self.backend}"
max_batch_size: 0
input [
{tensor_list(self.host_inputs())}
]
output [
{tensor_list(outs)}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{parameters(params)}
"""

    def init_hosts(self, repo: Path, backbones: list[str], slots: int, options: dict[str, Any], echo: Echo) -> None:
        with registry.editing(repo) as reg:
            for name in backbones:
                if name not in reg.hosts:
                    spec = self.catalog[name]
                    write_host(repo, spec.host_model, self.host_config(name, slots))
                    reg.hosts[name] = HostEntry(backbone=name, model=spec.host_model, slots=slots)
                host = reg.hosts[name]
                echo(f"host {host.model}: backbone {name}, {host.slots} slots")

    # --- tasks ------------------------------------------------------------------------------------
    def kinds(self) -> list[TaskKind]:
        return [TaskKind(k.name, k.summary, self.usage(k)) for k in self.object_class().kinds]

    def usage(self, kind: Any) -> str:
        return kind.source

    def user_errors(self) -> tuple[type[Exception], ...]:
        """The family object's error classes a user causes (imported only while building: they pull in torch)."""
        return tuple(_imported(path) for path in self.error_paths)

    def family_options(self, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        """The family object's build options from the CLI's."""
        return {}

    def build_task(self, repo: Path, name: str, version: int, backbone: str, kind: str, options: dict[str, Any], echo: Echo) -> BuiltTask:
        source = self.data_of(kind, options)
        vdir = version_dir(repo, name, version)
        vdir.mkdir(parents=True, exist_ok=True)
        try:
            self.family_object().build_task(vdir, name, version, kind, source, self.family_options(kind, options), echo)
        except self.user_errors() as exc:
            raise BuildError(str(exc)) from None
        task = self.check_artifact(vdir, backbone)
        return BuiltTask(task.family, f"{task.family} outputs, {task.nbytes / 1024:.1f} KiB")

    def data_of(self, kind: str, options: dict[str, Any]) -> Path | None:
        """The one path a kind is built from: ``--train`` for labelled data it is fitted on,
        ``--source`` for a fine-tune it imports (as for text); the other option is refused in one line."""
        info = {k.name: k for k in self.object_class().kinds}.get(kind)
        wants = info.data if info is not None else ""
        train, source = options.get("train_csv"), options.get("source")
        if wants == "train":
            if source is not None:
                raise OptionError(f"a {self.name} {kind} is trained from labelled data: give it with --train ({info.source.removeprefix('--train ')}); "
                                  "--source imports an existing fine-tune")
            return train
        if train is not None:
            what = f"give the fine-tune with --source ({info.source})" if wants == "source" else "it takes no data"
            raise OptionError(f"--train fits a classifier; a {self.name} {kind} task is not trained here: {what}")
        if wants == "" and source is not None:
            raise OptionError(f"--source is not used by {self.name} {kind} tasks (they take no data)")
        return source

    def check_artifact(self, vdir: Path, backbone: str) -> Any:
        return self.family_object().check_artifact(vdir)

    def describe_task(self, repo: Path, entry: TaskEntry, manifest: dict[str, Any]) -> list[tuple[str, str]]:
        lines = [("outputs", ", ".join(t.name for t in self.object_class().outputs.get(entry.outputs_family, ())))]
        if manifest.get("labels"):
            lines.append(("labels", ", ".join(manifest["labels"])))
        return lines + super().describe_task(repo, entry, manifest)

    # --- vFMs -------------------------------------------------------------------------------------
    def public_outputs(self, family: str) -> list[tuple[str, Tensor]]:
        """(host prefix, public tensor) of an output family; the public dims are the host output's."""
        dims = {p: (t, d) for p, t, d in self.host_outputs}
        out = []
        for spec in self.object_class().outputs[family]:
            prefix = self.prefix_of(spec)
            out.append((prefix, Tensor(spec.name, dims[prefix][0], dims[prefix][1])))
        return out

    def prefix_of(self, spec: Any) -> str:
        return f"{getattr(spec, 'prefix', 'OUT')}_"

    def write_task_models(self, repo: Path, entry: TaskEntry, reg: Registry) -> list[str]:
        host = reg.hosts.get(entry.backbone)
        if host is None:
            raise RegistryError(f"no host for backbone '{entry.backbone}' (run 'fmplex init --backbone {entry.backbone}')")
        assert entry.slot is not None and entry.deployed_version is not None
        public = self.public_outputs(entry.outputs_family)
        text = ensemble_config(
            name=entry.name,
            version=entry.deployed_version,
            host_model=host.model,
            inputs=self.host_inputs(),
            outputs=[t for _, t in public],
            output_map={f"{prefix}{entry.slot}": t.name for prefix, t in public},
            task=entry.name,
            kind=entry.kind,
            comment=f"fmplex vFM '{entry.name}' ({entry.kind}) v{entry.deployed_version} on host {host.model}, slot {entry.slot}.\n"
            "Written by 'fmplex deploy'. An ensemble costs no process: requests go straight to the shared host.",
        )
        write_atomic(Path(repo) / entry.name / CONFIG, text)
        return [entry.name]


def _imported(path: str) -> Any:
    """The object a ``module:name`` path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
