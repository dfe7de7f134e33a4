"""Backbone families: the control-plane side of each kind of foundation model.

One interface (``base.BackboneFamily``), one module per family:

- ``encoder``: text encoders (MiniLM) on the ``fmplex`` host;
- ``generative``: decoder LMs (SmolLM2), a host and its streaming twin;
- ``multimodal``: vision-language models as encode and lm stage hosts;
- ``vision`` (``vision_control``): image backbones on the ``fmplex_vision`` host;
- ``timeseries`` (``series_control``): forecasting backbones on the ``fmplex_series`` host.

The subpackages ``vision/`` and ``timeseries/`` hold those families' models,
tasks and hosts; their hosts import them, so this package's own imports are
lazy (PEP 562 ``__getattr__``): a host's stub process that imports
``fmplex.families.vision.host`` runs this file but loads no control-plane module.

``fmplex.backbones`` is the one catalog: it maps every backbone name to its
family's name, the key of ``FAMILIES``. ``triton_config`` is the one writer of
ensemble (vFM) configs. The CLI's workflows (``fmplex.control.workflows``)
dispatch to ``family_for(backbone)``. Control plane only: serving code never
imports this package. See docs/families.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fmplex.backbones import FAMILY_OF, family_of_backbone

if TYPE_CHECKING:
    from .base import BackboneFamily, BuiltTask, OptionError, TaskKind  # noqa: F401

_FAMILIES: dict[str, Any] = {}


def _registry() -> dict[str, Any]:
    """Every family by name, built on first use."""
    if not _FAMILIES:
        from .encoder import EncoderFamily  # noqa: PLC0415 - lazy: see the module docstring
        from .generative import GenerativeFamily  # noqa: PLC0415
        from .multimodal import MultimodalFamily  # noqa: PLC0415
        from .series_control import SeriesBackbones  # noqa: PLC0415
        from .vision_control import VisionBackbones  # noqa: PLC0415

        families = (EncoderFamily(), GenerativeFamily(), MultimodalFamily(), VisionBackbones(), SeriesBackbones())
        _FAMILIES.update({f.name: f for f in families})
    return _FAMILIES


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":
        return _registry()
    if name in ("BackboneFamily", "BuiltTask", "OptionError", "TaskKind"):
        from . import base  # noqa: PLC0415

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_for(backbone: str) -> BackboneFamily:
    """The family of a catalogued backbone (KeyError, one line, for an unknown one)."""
    return _registry()[family_of_backbone(backbone)]


def all_backbones() -> list[str]:
    """Every catalogued backbone, family by family."""
    return [b for fam in _registry().values() for b in fam.backbones()]


def all_kinds() -> list[str]:
    """Every task kind of every family, each once (``lora`` runs on two families)."""
    return list(dict.fromkeys(k.name for fam in _registry().values() for k in fam.kinds()))


def check_catalog() -> None:
    """Every catalogued backbone belongs to exactly one family here (a unit test calls this)."""
    owned = {b: fam.name for fam in _registry().values() for b in fam.backbones()}
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
