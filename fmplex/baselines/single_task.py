"""One task on its own copy of the backbone: the deployment fmplex replaces.

This is the baseline of ``perf/bench_baselines.py`` (what a platform team runs
today: one full model per fine-tuned task) and it reuses the host's executor
and extensions, so a baseline answer is the fmplex answer computed alone
(tests check they agree). Triton's dynamic batcher forms its batches; each
``execute()`` call runs them as one forward and answers synchronously.

Config parameters:
  ``artifact``      the task's version directory (manifest + weights)
  ``torch_threads`` intra-op threads (default 1)
  ``cpu_quota``     spatial partitioning on a CPU: this process's share of the
                    machine in cores (e.g. ``0.25``), enforced with a CFS quota
                    in its own cgroup (v1 ``cpu`` controller or v2); where no
                    cgroup can be written it falls back to pinning the process
                    to ``cpu_cores``
  ``cpu_cores``     comma-separated cores for the affinity fallback
  ``gpu_percent``   on a GPU: CUDA MPS active-thread percentage (needs the MPS
                    control daemon; read by CUDA when the context is created)
  ``device``        ``cpu`` (default) or ``cuda[:n]``
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fmplex.backbones import get_backbone
from fmplex.kinds import FLOAT_PREFIX, TEXT_PREFIX, TOKEN_PREFIX, family_of, outputs_of

from fmplex.runtime.settings import HostSettings, read_settings
from fmplex.runtime.validation import Limits, RequestError, decode_rows
from fmplex.triton_backend.executor import Executor, WorkItem, pad_tokens, set_threads
from fmplex.triton_backend.extensions import load_extension

from .partition import partition_cpu

@dataclasses.dataclass(frozen=True)
class SingleTaskSettings(HostSettings):
    artifact: str = ""
    cpu_quota: str = ""  # cores, e.g. "0.25" ("" = no partition)
    cpu_cores: str = ""
    gpu_percent: str = ""


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        st = self.settings = read_settings(config, SingleTaskSettings)
        gpu_percent = st.gpu_percent
        if gpu_percent:  # must be set before this process creates its CUDA context
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = gpu_percent
        self.partition = "none"
        quota = st.cpu_quota
        if quota:
            cores = [int(c) for c in st.cpu_cores.split(",") if c.strip()]
            self.partition = partition_cpu(self.name, float(quota), cores)
        set_threads(st.torch_threads)
        artifact = Path(st.artifact)
        manifest = json.loads((artifact / "manifest.json").read_text())
        self.spec = get_backbone(manifest["backbone"])
        self.executor = Executor(self.spec, st.device)
        self.extension = load_extension(artifact, self.spec, config=self.executor.config, device=str(self.executor.device))
        self.outputs = outputs_of(family_of(manifest))
        self.limits = Limits(max_rows=256, max_text_bytes=16384, max_tokens=self.spec.max_tokens, vocab_size=self.executor.vocab_size)
        pb_utils.Logger.log_info(f"fmplex baseline {self.name}: task {artifact}, pid {os.getpid()}, partition: {self.partition}")

    def execute(self, requests: list[Any]) -> list[Any]:
        """One forward for every request Triton's dynamic batcher handed over."""
        items: list[WorkItem] = []
        for request in requests:
            try:
                text = pb_utils.get_input_tensor_by_name(request, "TEXT")  # [1, rows] from the batcher: flatten
                rows = decode_rows(None if text is None else text.as_numpy().reshape(-1), None, None, self.limits)
                items.append(WorkItem(rows, self.extension))
            except RequestError as exc:
                items.append(WorkItem(None, None, error=str(exc), client_fault=True))  # type: ignore[arg-type]
        live = [it for it in items if it.error is None]
        if live:
            self.executor.run(live)
        responses = []
        for item in items:
            if item.error is not None or item.result is None:
                code = pb_utils.TritonError.INVALID_ARG if item.client_fault else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(item.error or "no result", code)))
                continue
            produced = {
                FLOAT_PREFIX: None if item.result.out is None else np.ascontiguousarray(item.result.out),
                TEXT_PREFIX: None if item.result.txt is None else np.asarray(item.result.txt, dtype=np.object_),
                TOKEN_PREFIX: None if item.result.tok is None else pad_tokens(item.result.tok),
            }
            responses.append(  # [1, rows, ...]: the request's batch of one (its rows are the dims)
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(o.name, produced[o.host_prefix][None]) for o in self.outputs if produced[o.host_prefix] is not None]
                )
            )
        return responses
