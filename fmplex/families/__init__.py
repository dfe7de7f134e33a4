"""Backbone families: the control-plane side of each kind of foundation model.

One interface (``base.BackboneFamily``), one module per family:

- ``encoder``: text encoders (MiniLM) on the ``fmplex`` host;
- ``generative``: decoder LMs (SmolLM2), a host and its streaming twin;
- ``multimodal``: vision-language models as encode and lm stage hosts.

``fmplex.backbones`` is the one catalog: it maps every backbone name to its
family's name, the key of ``FAMILIES``. ``triton_config`` is the one writer of
ensemble (vFM) configs. The CLI's workflows (``fmplex.control.workflows``)
dispatch to ``family_for(backbone)``. The control-plane families load on
first use (``FAMILIES`` is resolved lazily), so that a host importing its own
family's serving modules (``fmplex.families.vision``, ``.timeseries``) pulls in
no control-plane code. See docs/families.md.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from fmplex.backbones import FAMILY_OF, family_of_backbone

if TYPE_CHECKING:
    from .base import BackboneFamily, BuiltTask, OptionError, TaskKind

    FAMILIES: dict[str, BackboneFamily]


@functools.cache
def _families() -> dict[str, Any]:
    from .encoder import EncoderFamily  # noqa: PLC0415 - control plane, on first use
    from .generative import GenerativeFamily  # noqa: PLC0415
    from .multimodal import MultimodalFamily  # noqa: PLC0415

    return {f.name: f for f in (EncoderFamily(), GenerativeFamily(), MultimodalFamily())}


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":
        return _families()
    if name in ("BackboneFamily", "BuiltTask", "OptionError", "TaskKind"):
        from . import base  # noqa: PLC0415

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_for(backbone: str) -> BackboneFamily:
    """The family of a catalogued backbone (KeyError, one line, for an unknown one)."""
    return _families()[family_of_backbone(backbone)]


def all_backbones() -> list[str]:
    """Every catalogued backbone, family by family."""
    return [b for fam in _families().values() for b in fam.backbones()]


def all_kinds() -> list[str]:
    """Every task kind of every family, each once (``lora`` runs on two families)."""
    return list(dict.fromkeys(k.name for fam in _families().values() for k in fam.kinds()))


def check_catalog() -> None:
    """Every catalogued backbone belongs to exactly one family here (a unit test calls this)."""
    owned = {b: fam.name for fam in _families().values() for b in fam.backbones()}
    if owned != FAMILY_OF:
        raise AssertionError(f"fmplex.backbones.FAMILY_OF {FAMILY_OF} != the families' backbones {owned}")


__all__ = [
    "FAMILIES",
    "BackboneFamily",
    "BuiltTask",
    "OptionError",
    "TaskKind",
    "all_backbones",
    "all_kinds",
    "check_catalog",
    "family_for",
]
