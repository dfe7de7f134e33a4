"""Changing a stage host's instance count in place, through Triton's load API.

A host (``fm.minilm``, a multimodal stage host ...) is one Triton model; each
instance is its own Python stub process with its own backbone copy, scheduler
and worker. ``scale`` asks Triton to load the model again with a config
override that differs from the loaded config only in ``instance_group``
count; Triton 2.51 then adds or removes instances of the serving model and
leaves the others running (no reload, the vFM ensembles untouched).

Measured with Triton 2.51 (tests/e2e/test_scale.py): Triton compares the
override with the config the model was *last loaded with, as parsed* (before
the backend completes it), ignoring only ``instance_group`` and
``version_policy``. A host loaded from its ``config.pbtxt`` therefore scales
in place only when the override is that file's own content with a new count;
the completed config that ``get_model_config`` returns differs in fields the
backend filled in, and Triton answers it with a full reload of every
instance (new stubs, old ones swapped out; no request fails, but the backbone
loads again and all host state is lost). So the override here is built from
the host's ``config.pbtxt`` in the repository when we have it, with the
server's config only as a fallback, and the result says whether the
instances that should stay did stay (stub pids, when the server runs here).

Which instance goes on a scale-down is Triton's choice (not always the
oldest). The count is not persisted: a restarted server loads the count in
``config.pbtxt`` (editing that file would reload the host at the next load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from tritonclient.utils import InferenceServerException

from .triton_api import ControlError, Triton

MAX_INSTANCES = 64  # a sanity bound: each instance is a process with its own backbone copy
STUB = "triton_python_backend_stub"
CONFIG = "config.pbtxt"


class ScaleError(ControlError):
    """A scale request that cannot or did not happen."""


@dataclasses.dataclass(frozen=True)
class Stub:
    pid: int
    instance: str  # Triton's instance name, e.g. fm.minilm_0_1


@dataclasses.dataclass
class ScaleResult:
    model: str
    before: int
    after: int  # instances Triton reports now
    seconds: float  # the load call, until the model is ready again
    override: str  # "file" (the repository's config.pbtxt) or "server" (the completed config)
    stubs_before: list[Stub] | None = None  # None: no stub processes visible here
    stubs_after: list[Stub] | None = None
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def kept(self) -> list[int]:
        """Pids of stubs that were there before and still are."""
        if self.stubs_before is None or self.stubs_after is None:
            return []
        after = {s.pid for s in self.stubs_after}
        return [s.pid for s in self.stubs_before if s.pid in after]

    @property
    def in_place(self) -> bool | None:
        """True when the instances that should stay kept their processes
        (None: cannot tell, the server's processes are not visible here)."""
        if self.stubs_before is None or self.stubs_after is None:
            return None
        return len(self.kept) == min(len(self.stubs_before), self.after) and len(self.stubs_after) == self.after

    def summary(self) -> str:
        if not self.changed:
            return f"{self.model}: already {self.after} instance(s)"
        how = {True: "in place", False: "by a full reload (every instance restarted)", None: "(in place: unknown)"}[self.in_place]
        text = f"{self.model}: {self.before} -> {self.after} instance(s) in {self.seconds:.1f}s {how}"
        if self.stubs_after is not None:
            text += f"; stubs {', '.join(str(s.pid) for s in self.stubs_after)}"
        return text + (f"; {self.note}" if self.note else "")


# --- reading the server ---------------------------------------------------------


def server_config(triton: Triton, model: str) -> dict[str, Any]:
    """The model's config as the server serves it; one-line errors."""
    try:
        return dict(triton.client.get_model_config(model, as_json=True, client_timeout=30)["config"])
    except InferenceServerException as exc:
        msg = exc.message() or str(exc)
        if "unknown model" in msg or "not found" in msg or "is not ready" in msg or "no version is available" in msg:
            raise ScaleError(f"no model '{model}' is loaded on the server at {triton.url} (see 'fmplex status')") from None
        raise ScaleError(f"reading the config of '{model}' failed: {msg}") from None


def instance_count(config: dict[str, Any]) -> int:
    """Instances the config asks for (Triton's default is one per group)."""
    groups = config.get("instance_group") or []
    return sum(int(g.get("count", 1)) for g in groups) if groups else 1


def current_instances(triton: Triton, model: str) -> int:
    return instance_count(server_config(triton, model))


def workers_per_instance(config: dict[str, Any]) -> int:
    """Batches one instance runs at once: an fmplex host's ``workers`` parameter
    ("auto": one per core on a CPU, up to 4 -- counted here, which assumes the
    server runs on this machine; 1 on a GPU); 1 for other models."""
    params = config.get("parameters") or {}
    value = str((params.get("workers") or {}).get("string_value", "1"))
    if value != "auto":
        try:
            return max(1, int(value))
        except ValueError:
            return 1
    device = str((params.get("device") or {}).get("string_value", "cpu"))
    return max(1, min(len(os.sched_getaffinity(0)), 4)) if device == "cpu" else 1


def _is_ensemble(config: dict[str, Any]) -> bool:
    return config.get("platform") == "ensemble" or bool(config.get("ensemble_scheduling"))


def _ensemble_hosts(config: dict[str, Any]) -> list[str]:
    steps = (config.get("ensemble_scheduling") or {}).get("step") or []
    return sorted({str(s.get("model_name")) for s in steps if s.get("model_name")})


# --- stub processes (only where the server runs on this machine) ---------------


def stub_processes(model: str, repository: Path | None = None) -> list[Stub]:
    """Python-backend stubs serving ``model`` (from ``repository``; None: any).

    A stub's command line names the model file (``REPO/MODEL/VERSION/model.py``)
    and its instance (``MODEL_G_I``). Zombies (exited, not yet reaped) are skipped.
    """
    prefix = str(Path(repository).resolve() / model) + os.sep if repository is not None else None
    instance = re.compile(re.escape(model) + r"_\d+_\d+")
    found: list[Stub] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                state = fh.read().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if len(argv) < 2 or not argv[0].endswith(STUB) or state == "Z":
            continue
        if prefix is not None and not argv[1].startswith(prefix):
            continue
        if prefix is None and f"{os.sep}{model}{os.sep}" not in argv[1]:
            continue
        names = [a for a in argv[2:] if instance.fullmatch(a)]
        if names:
            found.append(Stub(int(entry), names[0]))
    return sorted(found, key=lambda s: s.pid)


# --- the override ---------------------------------------------------------------


def file_config(repository: Path, model: str) -> dict[str, Any] | None:
    """The host's ``config.pbtxt`` as JSON (Triton's load API takes JSON), or None."""
    path = Path(repository) / model / CONFIG
    if not path.is_file():
        return None
    from google.protobuf import json_format, text_format  # noqa: PLC0415 - tritonclient's protobuf
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    try:
        msg = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ScaleError(f"cannot parse {path}: {exc}") from None
    return dict(json_format.MessageToDict(msg, preserving_proto_field_name=True))


def _same_model(file: dict[str, Any], served: dict[str, Any]) -> bool:
    """Does the repository's config describe the model the server runs? (Its
    backend, parameters and outputs; the server's copy has more fields filled.)"""
    def outputs(c: dict[str, Any]) -> list[str]:
        return [str(o.get("name")) for o in c.get("output", [])]

    return (
        file.get("backend", "") == served.get("backend", "")
        and (file.get("parameters") or {}) == (served.get("parameters") or {})
        and outputs(file) == outputs(served)
    )


def with_count(config: dict[str, Any], instances: int, model: str) -> dict[str, Any]:
    """``config`` with its one instance group set to ``instances`` (kind, devices
    and any other placement kept)."""
    out = json.loads(json.dumps(config))
    groups = out.get("instance_group") or []
    if len(groups) > 1:
        raise ScaleError(f"'{model}' has {len(groups)} instance groups; fmplex scales a host with one group")
    group = dict(groups[0]) if groups else {"kind": "KIND_CPU"}  # Triton's default without a group
    group["count"] = instances
    out["instance_group"] = [group]
    return out


def check_count(instances: int) -> None:
    if instances < 1:
        raise ScaleError(f"instances must be at least 1, got {instances} (to stop a host, unload it)")
    if instances > MAX_INSTANCES:
        raise ScaleError(f"instances must be at most {MAX_INSTANCES}, got {instances}")


def scale(
    triton: Triton,
    model: str,
    instances: int,
    *,
    repository: Path | None = None,
    verify_timeout: float = 60.0,
) -> ScaleResult:
    """Set ``model``'s instance count to ``instances`` in place; verify it took.

    ``repository`` (the server's model repository, when it is reachable here)
    supplies the override Triton can apply in place and locates the host's stub
    processes. Raises ScaleError (one line) for a bad count, an unknown model,
    a vFM (ensemble) or a refusal; KeyRefused when a locked server refuses.
    """
    check_count(instances)
    served = server_config(triton, model)
    if _is_ensemble(served):
        hosts = _ensemble_hosts(served)
        raise ScaleError(f"'{model}' is a vFM (an ensemble, no instances of its own); scale its host: {', '.join(hosts) or '?'}")
    before = instance_count(served)
    base, source, note = None, "server", ""
    if repository is not None:
        base = file_config(repository, model)
        if base is not None and not _same_model(base, served):
            base, note = None, f"{Path(repository) / model / CONFIG} is not what the server loaded"
        source = "file" if base is not None else source
    if base is None:
        base = served
    # Stubs only where we know the server's repository (another server here may run the same model).
    stubs_before = (stub_processes(model, repository) or None) if repository is not None else None
    if before == instances:
        return ScaleResult(model, before, before, 0.0, source, stubs_before, stubs_before)
    override = json.dumps(with_count(base, instances, model))
    seconds = triton.load(model, config=override)  # KeyRefused on a locked server without the key
    after = current_instances(triton, model)
    if after != instances:
        raise ScaleError(f"'{model}' reports {after} instance(s) after asking for {instances}")
    result = ScaleResult(model, before, after, seconds, source, stubs_before, None, note)
    if stubs_before is not None:
        # A removed instance's stub finishes its queue before it exits.
        deadline = time.monotonic() + verify_timeout
        while True:
            now = stub_processes(model, repository)
            if len(now) == instances or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        result.stubs_after = now
        if len(now) != instances:
            result.note = f"Triton reports {instances} instance(s) but {len(now)} stub process(es) run after {verify_timeout:.0f}s"
    if source == "server" and not result.note:
        result.note = "override from the server's config (Triton reloads every instance unless it was loaded with one)"
    return result
