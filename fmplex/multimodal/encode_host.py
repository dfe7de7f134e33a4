"""The ``encode`` stage host: vision tower + projector as its own Triton model.

Triton's dynamic batcher forms the batches: every image arrives as (part of)
a request ``PIXEL_VALUES [k, 3, H, W]`` -- the LM stage hosts send one image
per request, so images of one prompt spread over batches and mix with images
of other prompts and tasks -- and ``execute()`` runs the whole batch through
the encoder in one forward, then answers each request with its own rows of
``FEATURES [k, tokens, hidden]``. Images never interact inside the encoder,
so batching does not change any result (tests/unit/test_multimodal_stages.py).

Triton's statistics of this model say how it batched (``inference_count`` =
images, ``execution_count`` = batches, ``batch_stats`` per batch size); the
host also publishes ``fmplex_mm_encode_batches_total{host,size}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from fmplex.runtime.metrics import HostMetrics
from fmplex.runtime.settings import HostSettings, read_settings

from .models import read_stage
from .placement import apply_placement, format_cpus
from .stages import EncodeStage


@dataclasses.dataclass(frozen=True)
class EncodeStageSettings(HostSettings):
    cpus: str = ""  # cores this stage may use ("" = all)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.settings = read_settings(config, EncodeStageSettings)
        self.device, cpus = apply_placement(self.settings.cpus, self.settings.torch_threads, self.settings.device)
        vdir = Path(args["model_repository"]) / str(args["model_version"])
        files = read_stage(vdir, "encode")
        self.stage = EncodeStage(files, self.device)
        self.backbone = files.meta["backbone"]
        self.metrics = HostMetrics(self.name, instance=str(args.get("model_instance_name", "")))
        self.metrics.metric("fmplex_mm_stage_load_seconds", "time this stage host took to load", "GAUGE").set(time.perf_counter() - t0)
        pb_utils.Logger.log_info(
            f"fmplex encode stage {self.name}: {self.backbone}, device {self.device}, cpus {format_cpus(cpus)}, "
            f"pid {os.getpid()}, loaded in {time.perf_counter() - t0:.2f}s"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays: list[np.ndarray | None] = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "PIXEL_VALUES")
            arr = None if tensor is None else tensor.as_numpy()
            arrays.append(arr if arr is not None and arr.ndim == 4 and tuple(arr.shape[1:]) == self.stage.image_shape else None)
        good = [a for a in arrays if a is not None]
        responses: list[Any] = []
        try:
            t0 = time.perf_counter()
            feats = self.stage.encode(torch.from_numpy(np.concatenate(good))).cpu().numpy() if good else None
            spent = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - the batch failed: every request gets the error
            err = pb_utils.TritonError(f"encode failed: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        row = 0
        for arr in arrays:
            if arr is None:
                shape = "[n, " + ", ".join(map(str, self.stage.image_shape)) + "]"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"PIXEL_VALUES must be FP32 {shape}", pb_utils.TritonError.INVALID_ARG)))
                continue
            k = arr.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("FEATURES", np.ascontiguousarray(feats[row : row + k]))]))
            row += k
        if good:
            images = sum(a.shape[0] for a in good)
            m = self.metrics
            m.metric("fmplex_mm_encode_batches_total", "encoder batches by images per batch", size=str(images)).increment(1)
            m.metric("fmplex_mm_encode_images_total", "images encoded").increment(images)
            m.metric("fmplex_mm_encode_seconds_total", "time in encoder forwards").increment(spent)
        return responses

    def finalize(self) -> None:
        pb_utils.Logger.log_info(f"fmplex encode stage {self.name}: unloaded")
