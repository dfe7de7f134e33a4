"""A task's artifact: ``manifest.json`` + ``weights.safetensors`` in its version dir.

The artifact lives in the vFM's own Triton version directory
(``<repo>/<task>/<version>/``), so Triton's versioning versions tasks. Only
JSON and safetensors are ever read — never pickle — so an artifact cannot run
code when it is loaded.
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


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"no {MANIFEST} in {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not an fmplex task manifest (format {FORMAT!r} expected)")
    for key in ("kind", "backbone"):
        if key not in data:
            raise ArtifactError(f"{file} lacks '{key}'")
    return data


def read_weights(path: Path) -> dict[str, Any]:
    """Tensors of an artifact as torch tensors (safetensors only)."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    file = Path(path) / WEIGHTS
    if not file.exists():
        return {}
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{file} is not a readable safetensors file: {exc}") from None


def write_weights(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(path) / WEIGHTS))
