"""Which class loads a vision artifact: one place that knows every kind's task class.

Kept apart from :mod:`.tasks` because the fork and LoRA task classes
(:mod:`.fork`, :mod:`.lora`) build on :class:`.tasks.VisionTask`; here they
are all imported at the top, with no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fmplex.artifacts import ArtifactError

from .fork import ForkTask
from .lora import LoraTask
from .tasks import BACKBONE, KINDS, ClassifierTask, EmbeddingTask, OnnxTask, VisionTask


def load_task(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], artifact_dir: Path | None = None,
              device: torch.device | None = None) -> VisionTask:
    """The task of an artifact (manifest + tensors [+ its directory, for ONNX files])."""
    classes: dict[str, type[VisionTask]] = {
        "embedding": EmbeddingTask, "classifier": ClassifierTask, "onnx": OnnxTask, "fork": ForkTask, "lora": LoraTask,
    }
    kind = manifest.get("kind")
    where = f"task '{manifest.get('task', '?')}'"
    if manifest.get("backbone") != BACKBONE:
        raise ArtifactError(f"{where}: made for backbone {manifest.get('backbone')!r}, not '{BACKBONE}'")
    if kind not in classes:
        raise ArtifactError(f"{where}: kind {kind!r} is not a vision kind (known: {', '.join(KINDS)})")
    return classes[kind](manifest, tensors, artifact_dir, device)
