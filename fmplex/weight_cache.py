"""The on-disk cache of converted backbone weights (``$FMPLEX_CACHE_DIR``, default ``~/.cache/fmplex``).

Some backbones ship in a form that is slow or unsafe to read at every start
(SmolLM2 as quantized GGUF, EfficientNet-Lite0 as a pickled ``.pth``): the
first load converts them, and the copy is kept here, keyed by the source's
content fingerprint. A copy is written into a temporary directory and renamed
into place whole, with a marker file written last, so that concurrent first
loads (several stubs) never see a half-written copy; ``off`` disables it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

DONE = "fmplex-cache.json"  # written last: a directory without it is incomplete


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
