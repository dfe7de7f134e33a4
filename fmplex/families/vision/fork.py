"""The ``fork`` kind: the task owns the stages from its fork point up, and a linear head.

Its artifact holds, for every stage ``s >= fork.point``, that stage's
parameters and batch-norm statistics under ``fork.<state-dict key>`` (for
example ``fork._blocks.14._project_conv.weight``, ``fork._bn1.running_var``),
and the network's classifier as ``head.weight``/``head.bias``. The shared pass
runs the stem and the stages below the fork point once for all rows; the
task's rows then leave it and run the task's own copies, all together.
A fork point of 17 means that only the classifier differs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fmplex.artifacts import ArtifactError

from .model import HEAD_STAGE, N_BLOCKS, N_STAGES, head_conv, run_block, skeleton
from .tasks import VisionTask

PREFIX = "fork."


def stage_modules(model: Any, stage: int) -> dict[str, torch.nn.Module]:
    """The modules of one stage by state-dict prefix (``_blocks.3`` or ``_conv_head``/``_bn1``)."""
    if stage < N_BLOCKS:
        return {f"_blocks.{stage}": model._blocks[stage]}
    return {"_conv_head": model._conv_head, "_bn1": model._bn1}


def stage_keys(stage: int) -> list[str]:
    """State-dict keys of one stage that a fork stores (batch-norm counters excluded)."""
    return [
        f"{prefix}.{name}"
        for prefix, module in stage_modules(skeleton(), stage).items()
        for name in module.state_dict()
        if not name.endswith("num_batches_tracked")
    ]


class ForkTask(VisionTask):
    kind = "fork"

    def load_body(self, tensors: dict[str, torch.Tensor]) -> None:
        fork = self.manifest.get("fork") or {}
        point = fork.get("point")
        if not isinstance(point, int) or isinstance(point, bool) or not 0 <= point <= N_STAGES:
            raise ArtifactError(f"{self.where}: manifest fork.point must be an integer in [0, {N_STAGES}], got {point!r}")
        self.fork_point = point
        self.stages: list[dict[str, torch.nn.Module]] = []
        expected: set[str] = set()
        for s in range(point, N_STAGES):
            own = {prefix: copy.deepcopy(module) for prefix, module in stage_modules(skeleton(), s).items()}
            for prefix, module in own.items():
                state = module.state_dict()
                for name, ref in state.items():
                    if name.endswith("num_batches_tracked"):
                        continue
                    key = f"{PREFIX}{prefix}.{name}"
                    expected.add(key)
                    t = tensors.get(key)
                    if t is None:
                        raise ArtifactError(f"{self.where}: tensor '{key}' is missing (a fork at {point} owns stages {point}..{N_STAGES - 1})")
                    if tuple(t.shape) != tuple(ref.shape) or not t.is_floating_point():
                        raise ArtifactError(f"{self.where}: tensor '{key}' has shape {list(t.shape)} {t.dtype}, expected {list(ref.shape)} float")
                    if not torch.isfinite(t).all():
                        raise ArtifactError(f"{self.where}: tensor '{key}' holds NaN or infinite values")
                    ref.copy_(t.float())
                module.to(self.device)
            self.stages.append(own)
        extra = sorted(k for k in tensors if k.startswith(PREFIX) and k not in expected)
        if extra:
            raise ArtifactError(f"{self.where}: unexpected fork tensor(s) below or beside the fork point: {', '.join(extra[:3])}")
        self.body_bytes = sum(t.numel() * 4 for k, t in tensors.items() if k.startswith(PREFIX))

    def run_own(self, x: torch.Tensor) -> torch.Tensor:
        assert self.fork_point is not None
        for s, own in zip(range(self.fork_point, N_STAGES), self.stages):
            if s < HEAD_STAGE:
                x = run_block(own[f"_blocks.{s}"], s, x)
            else:
                x = head_conv(own["_conv_head"], own["_bn1"], torch.nn.functional.relu6, x)
        return x

    @property
    def nbytes(self) -> int:
        return self.body_bytes + self.head.nbytes
