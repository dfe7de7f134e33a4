"""The ``fm.efficientnet`` Triton host: image rows of many vision tasks in one EfficientNet pass.

Inputs ``IMAGE`` (BYTES ``[rows]``, encoded JPEG/PNG) and/or ``PIXELS`` (FP32
``[rows, 3, 224, 224]``, preprocessed), both optional: a request sends one.
Slot ``k`` answers on ``OUT_k`` (EMBEDDING or LOGITS) and ``TXT_k`` (LABEL).
Decoding is :meth:`VisionFamily.decode` (a bad image fails its own request
with one line); the scheduler's cost of a request is its rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmplex.backbones import VISION
from fmplex.runtime.family_host import FamilyHost
from fmplex.runtime.routing import Job
from fmplex.runtime.host import input_array
from fmplex.runtime.validation import RequestError

from .family import VisionFamily
from .preprocess import ImageLimits

PREFIXES = ("OUT_", "TXT_")


class TritonPythonModel(FamilyHost):
    kind = "vision host"
    catalog = VISION
    prefixes = PREFIXES

    def make_family(self, settings: Any) -> VisionFamily:
        return VisionFamily(settings.device, ImageLimits(max_rows=settings.max_rows_per_request))

    def decode(self, request: Any, task_of: Any) -> tuple[Any, Any, int, int]:
        pixels = self.family.decode(input_array(request, "IMAGE"), input_array(request, "PIXELS"))
        rows = int(pixels.shape[0])
        if rows == 0:
            raise RequestError("a request needs at least one image")
        return pixels, None, rows, rows

    def tensors(self, job: Job, result: Any) -> dict[str, Any]:
        out = {f"OUT_{job.slot}": np.ascontiguousarray(result.out, dtype=np.float32)}
        if result.txt is not None:
            out[f"TXT_{job.slot}"] = np.asarray(result.txt, dtype=np.object_)
        return out
