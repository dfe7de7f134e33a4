"""What a serving-side family object (vision, time series) declares about itself.

Plain records, no click and no Triton: the family's host imports them, and
the control-side adapters (``vision_control``, ``series_control``) read them
to build click options and host configs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class KindInfo:
    name: str
    summary: str
    source: str  # what ``task create`` needs for it
    options: tuple[str, ...] = ()  # option names it reads (besides the source)
    # Which ``task create`` option carries its data: "train" (labelled data it is fitted on),
    # "source" (an existing fine-tune it imports) or "" (it takes none).
    data: str = ""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type
    dims: str  # Triton config dims, batch dimension included
    prefix: str = "OUT"  # the host output it travels under: <prefix>_<slot>
