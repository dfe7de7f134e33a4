"""A task's artifact: ``manifest.json`` + ``weights.safetensors`` in its version dir.

The artifact lives in the vFM's own Triton version directory
(``<repo>/<task>/<version>/``), so Triton's versioning versions tasks. Only
JSON and safetensors are ever read — never pickle — so an artifact cannot run
code when it is loaded. :func:`read_json` and :func:`read_safetensors` are the
one way fmplex reads such a file (artifacts, PEFT adapters, fine-tunes given to
``task create``): each failure is one line, raised as the caller's error type.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT = "fmplex-task/1"


class ArtifactError(ValueError):
    """An artifact is missing, malformed or does not fit its backbone."""


def version_dir(repo: Path, task: str, version: int) -> Path:
    return Path(repo) / task / str(version)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **manifest}
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path, error: type[Exception] = ArtifactError, missing: str | None = None) -> dict[str, Any]:
    """A JSON object from ``path``; anything else raises ``error`` with one line
    (``missing``: the line when there is no such file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing or f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def read_safetensors(path: Path, error: type[Exception] = ArtifactError) -> dict[str, Any]:
    """The tensors of a safetensors file as torch tensors (never pickle); anything else raises ``error`` with one line."""
    from safetensors import SafetensorError  # noqa: PLC0415 - torch: only where tensors are read
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise error(f"{path} is missing (only safetensors are read, never pickle)") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} is not a readable safetensors file: {exc}") from None


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    data = read_json(file, missing=f"no {MANIFEST} in {path}")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not an fmplex task manifest (format {FORMAT!r} expected)")
    for key in ("kind", "backbone"):
        if key not in data:
            raise ArtifactError(f"{file} lacks '{key}'")
    return data


def read_weights(path: Path) -> dict[str, Any]:
    """Tensors of an artifact as torch tensors (safetensors only; none when it has no weights file)."""
    file = Path(path) / WEIGHTS
    if not file.exists():
        return {}
    return read_safetensors(file)


def write_weights(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(path) / WEIGHTS))
