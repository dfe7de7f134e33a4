"""The model repository's task directories, whatever the backbone family.

What a family writes (host configs, vFM ensembles) lives in
``fmplex.families``; this module lists, and deletes, a task's versions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fmplex import registry
from fmplex.artifacts import version_dir


def task_versions(repo: Path, name: str) -> list[int]:
    tdir = Path(repo) / name
    if not tdir.is_dir():
        return []
    return sorted(int(p.name) for p in tdir.iterdir() if p.is_dir() and p.name.isdigit())


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
