"""Writing Triton model configs: the one ensemble (vFM) writer and the pieces host configs share.

Every family's vFM is an ensemble with one step on a host: it passes its
inputs through under the same names and maps the slot's host outputs to the
task's public names. Only the tensors, the host and the header comment differ
between families, so one function writes them all.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

CONFIG = "config.pbtxt"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output of a model config."""

    name: str
    data_type: str  # Triton config type, e.g. TYPE_FP32
    dims: str  # e.g. "[ -1, -1 ]"
    optional: bool = False


def tensor_list(tensors: Iterable[Tensor]) -> str:
    """The body of an ``input [...]`` or ``output [...]`` block."""
    return ",\n".join(
        f'  {{ name: "{t.name}" data_type: {t.data_type} dims: {t.dims}{" optional: true" if t.optional else ""} }}' for t in tensors
    )


def parameters(values: dict[str, Any]) -> str:
    """``parameters`` entries (all string values, as Triton hands them to a Python model)."""
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in values.items())


def ensemble_config(
    *,
    name: str,
    version: int,
    host_model: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    output_map: dict[str, str],
    task: str,
    kind: str,
    comment: str,
) -> str:
    """A vFM: an ensemble with one step on ``host_model``, serving exactly ``version``.

    ``output_map`` maps host output names (the slot's) to the public ones;
    inputs pass through under their own names. The ``fmplex_task`` and
    ``fmplex_kind`` parameters name the task for operators reading the config.
    """
    inmaps = "\n".join(f'      input_map {{ key: "{t.name}" value: "{t.name}" }}' for t in inputs)
    outmaps = "\n".join(f'      output_map {{ key: "{host}" value: "{public}" }}' for host, public in output_map.items())
    header = "\n".join(f"# {line}" for line in comment.splitlines())
    return f"""{header}
name: "{name}"
platform: "ensemble"
max_batch_size: 0
version_policy: {{ specific: {{ versions: [ {version} ] }} }}
input [
{tensor_list(inputs)}
]
output [
{tensor_list(outputs)}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{host_model}"
      model_version: -1
{inmaps}
{outmaps}
    }}
  ]
}}
{parameters({"fmplex_task": task, "fmplex_kind": kind})}
"""


def write_atomic(path: Path, text: str) -> None:
    """Write a config by write + rename: Triton never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cfg-", dir=str(path.parent))
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the server may run as another user
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_host(repo: Path, model: str, text: str) -> None:
    """A host's config and its (empty) version directory, written once by ``fmplex init``."""
    hdir = Path(repo) / model
    write_atomic(hdir / CONFIG, text)
    (hdir / "1").mkdir(exist_ok=True)
    (hdir / "1" / ".keep").touch()  # git keeps no empty directories
