"""One vision or time-series task on its own copy of the backbone: the deployment fmplex replaces.

The image and series counterpart of ``single_task`` (text): what a team runs
today, one whole model per fine-tuned task, Triton's dynamic batcher forming
its batches. It serves the task through the family object the fmplex host
uses (``VisionFamily`` / ``SeriesFamily``: the same decoding, backbone pass
and task code), so a baseline answer is the fmplex answer computed alone;
only the sharing differs. ``perf/bench_vision_series.py`` writes its configs.

Inputs (Triton adds the batch dimension; one request is one row of the batch):
``IMAGE`` (BYTES ``[1, rows]``) for an image task, ``SERIES`` (FP32
``[1, T]``: one series, NaN-padded) for a series task. Outputs: the task's
public outputs with the same leading 1.

Config parameters: ``artifact`` (the task's version directory),
``torch_threads``, ``device``, and ``cpu_quota`` / ``cpu_cores`` for spatial
partitioning (see ``partition``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fmplex.artifacts import read_manifest
from fmplex.runtime.settings import HostSettings, read_settings
from fmplex.runtime.validation import RequestError

from .partition import partition_cpu

VISION_BACKBONE = "fm.efficientnet"


@dataclasses.dataclass(frozen=True)
class FamilyTaskSettings(HostSettings):
    artifact: str = ""
    cpu_quota: str = ""  # cores, e.g. "0.5" ("" = no partition)
    cpu_cores: str = ""


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch  # noqa: PLC0415

        config = json.loads(args["model_config"])
        self.name = config["name"]
        st = read_settings(config, FamilyTaskSettings)
        partition = "none"
        if st.cpu_quota:
            partition = partition_cpu(self.name, float(st.cpu_quota), [int(c) for c in st.cpu_cores.split(",") if c.strip()])
        torch.set_num_threads(st.torch_threads)
        artifact = Path(st.artifact)
        manifest = read_manifest(artifact)
        self.vision = manifest["backbone"] == VISION_BACKBONE
        if self.vision:
            from fmplex.families.vision.family import VisionFamily  # noqa: PLC0415

            self.family: Any = VisionFamily(st.device)
        else:
            from fmplex.families.timeseries.family import SeriesFamily  # noqa: PLC0415

            self.family = SeriesFamily(st.device, weights=manifest.get("backbone_weights", "fp32"))
        self.task = self.family.load_task(artifact)
        self.outputs = self.family.outputs[self.task.family]
        pb_utils.Logger.log_info(f"fmplex family baseline {self.name}: task {artifact}, pid {os.getpid()}, partition: {partition}")

    def _decode(self, request: Any) -> Any:
        if self.vision:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            return self.family.decode(None if image is None else image.as_numpy().reshape(-1), None)
        series = pb_utils.get_input_tensor_by_name(request, "SERIES")
        return self.family.decode(self.task, None if series is None else series.as_numpy().reshape(1, -1))

    def _tensors(self, outputs: Any) -> list[Any]:
        if self.vision:  # TaskOutputs: out = EMBEDDING or LOGITS, txt = LABEL
            named = {s.name: outputs.out if s.data_type == "TYPE_FP32" else outputs.txt for s in self.outputs}
        else:
            named = outputs
        out = []
        for spec in self.outputs:
            value = named[spec.name]
            arr = np.asarray(value, dtype=np.object_) if spec.data_type == "TYPE_STRING" else np.ascontiguousarray(value, dtype=np.float32)
            out.append(pb_utils.Tensor(spec.name, arr[None]))
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        """One backbone pass for every request Triton's dynamic batcher handed over."""
        decoded: list[Any] = []
        for request in requests:
            try:
                decoded.append(self._decode(request))
            except RequestError as exc:
                decoded.append(exc)
        live = [d for d in decoded if not isinstance(d, RequestError)]
        results = iter(self.family.run_batch([(self.task, d) for d in live]) if live else [])
        responses = []
        for d in decoded:
            if isinstance(d, RequestError):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(d), pb_utils.TritonError.INVALID_ARG)))
                continue
            r = next(results)
            if r.error is not None or r.outputs is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(r.error or "no result", pb_utils.TritonError.INTERNAL)))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._tensors(r.outputs)))
        return responses
