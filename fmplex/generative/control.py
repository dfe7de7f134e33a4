"""The names the generative host imports from here, kept importable from their old place.

The control-plane side of generative backbones is ``fmplex.families.generative``;
the catalog entry is ``fmplex.backbones.GENERATIVE``. This module holds no
control-plane code (a serving process imports it): it only re-exports, from
``serving``, what ``generate_host`` reads.
"""

from __future__ import annotations

from .serving import TEXT_PREFIX, backbone_of_host, check_artifact

__all__ = ["TEXT_PREFIX", "backbone_of_host", "check_artifact"]
