"""The ``fm.fracast`` Triton host: series rows of many forecasting tasks in one Fracast pass.

Inputs ``SERIES`` (FP32 ``[rows, T]``, NaN-padded), ``LENGTHS`` (INT64
``[rows]``, optional) and ``HORIZON`` (INT64 ``[1]``, optional). Slot ``k``
answers on ``OUT_k`` (FORECAST, LOGITS or EMBEDDING), ``QNT_k`` (QUANTILES)
and ``TXT_k`` (LABEL). Decoding is :meth:`SeriesFamily.decode`, which needs
the task (its horizon limit, minimum context, missing-value rule): a bad
request fails alone with one line. The scheduler's cost of a request is
:meth:`SeriesFamily.cost` (rows x trunk rounds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmplex.backbones import SERIES
from fmplex.runtime.family_host import FamilyHost
from fmplex.runtime.routing import Job
from fmplex.runtime.host import input_array

from .family import SeriesFamily
from .inputs import SeriesLimits

PREFIXES = ("OUT_", "QNT_", "TXT_")
# Public output -> the host output prefix it travels under.
PREFIX_OF = {spec.name: f"{spec.prefix}_" for specs in SeriesFamily.outputs.values() for spec in specs}


class TritonPythonModel(FamilyHost):
    kind = "series host"
    catalog = SERIES
    prefixes = PREFIXES

    def make_family(self, settings: Any) -> SeriesFamily:
        return SeriesFamily(settings.device, limits=SeriesLimits(max_rows=settings.max_rows_per_request))

    def decode(self, request: Any, task_of: Any) -> tuple[Any, Any, int, int]:
        task = task_of()
        data = self.family.decode(task, input_array(request, "SERIES"), input_array(request, "LENGTHS"), input_array(request, "HORIZON"))
        return data, task, len(data.rows), self.family.cost(task, data)

    def tensors(self, job: Job, result: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in result.items():
            prefix = PREFIX_OF[name]
            arr = np.asarray(value, dtype=np.object_) if prefix == "TXT_" else np.ascontiguousarray(value, dtype=np.float32)
            out[f"{prefix}{job.slot}"] = arr
        return out
