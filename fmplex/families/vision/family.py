"""``fm.efficientnet`` as one object: what the host and the control plane need of the vision family.

:class:`VisionFamily` gathers the backbone's name, its host inputs and the
public outputs of each output family, its task kinds with their create
options, the artifact check, the request decoder and the batched entry point
(:meth:`VisionFamily.run_batch`). It is written to plug into the backbone-family
interface and the shared host runtime; until then it is used directly by
tests and benchmarks. Serving-side methods import no control-plane code; the
builders (:meth:`build_task`) import the importers and the trainer lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmplex.artifacts import read_manifest, read_weights, write_manifest, write_weights
from fmplex.families.family_spec import BatchedFamily, Echo, KindInfo, TensorSpec

from .preprocess import ImageLimits, decode_request
from .loading import load_task
from .tasks import BACKBONE, KINDS, VisionTask


class VisionFamily(BatchedFamily):
    backbone = BACKBONE
    description = "EfficientNet-Lite0 (ImageNet), 224x224 RGB images -> 1280 pooled features"
    # Host inputs; a request sends exactly one of them.
    inputs = (
        TensorSpec("IMAGE", "TYPE_STRING", "[ -1 ]"),  # one encoded JPEG/PNG per row
        TensorSpec("PIXELS", "TYPE_FP32", "[ -1, 3, 224, 224 ]"),  # already preprocessed
    )
    # Output family -> public outputs (host prefixes OUT_<slot>/TXT_<slot>, as for text).
    outputs = {
        "embedding": (TensorSpec("EMBEDDING", "TYPE_FP32", "[ -1, 1280 ]"),),
        "classifier": (TensorSpec("LOGITS", "TYPE_FP32", "[ -1, -1 ]"), TensorSpec("LABEL", "TYPE_STRING", "[ -1 ]")),
    }
    kinds = (
        KindInfo("embedding", "the pooled features [rows, 1280]", "nothing"),
        KindInfo("classifier", "a linear probe on the pooled features", "--train DIR/<label>/*.png|jpg or a path,label CSV",
                 data="train"),
        KindInfo("fork", "fine-tuned top blocks + classifier (only the blocks that differ are kept)",
                 "a full fine-tuned state dict (.safetensors)", ("labels",), data="source"),
        KindInfo("onnx", "an ONNX head on the pooled features, run by ONNX Runtime", "an .onnx file",
                 ("onnx_family", "labels"), data="source"),
        KindInfo("lora", "LoRA on the blocks' 1x1 convolutions (+ optional classifier)",
                 "a PEFT LoRA adapter directory", ("labels",), data="source"),
    )

    def __init__(self, device: str = "cpu", limits: ImageLimits = ImageLimits(), max_pass_rows: int | None = -1) -> None:
        super().__init__(device, max_pass_rows)
        self.limits = limits

    # --- serving --------------------------------------------------------------------------------
    def make_executor(self) -> Any:
        from .executor import VisionExecutor  # noqa: PLC0415 - torch + the network

        return VisionExecutor(self.device, max_pass_rows=self.max_pass_rows)

    def decode(self, image: np.ndarray | None, pixels: np.ndarray | None) -> np.ndarray:
        """A request's inputs -> ``[rows, 3, 224, 224]``; raises RequestError (one line) if bad."""
        return decode_request(image, pixels, self.limits)

    def load_task(self, vdir: Path) -> VisionTask:
        """A task from its version directory (manifest + weights [+ head.onnx]); ArtifactError if it does not fit."""
        import torch  # noqa: PLC0415

        vdir = Path(vdir)
        return load_task(read_manifest(vdir), read_weights(vdir), vdir, torch.device(self.device))

    # --- building (control plane) ---------------------------------------------------------------
    def build_task(self, vdir: Path, task: str, version: int, kind: str, source: Path | None,
                   options: dict[str, Any], echo: Echo) -> dict[str, Any]:
        """Build and store a task's artifact in ``vdir``, then load it as the host will; its manifest."""
        from . import importers, train  # noqa: PLC0415 - control plane
        from .weights import fingerprint  # noqa: PLC0415

        vdir = Path(vdir)
        tensors: dict[str, Any] = {}
        if kind == "embedding":
            fields: dict[str, Any] = {"head": {"type": "embedding"}}
        elif kind == "classifier":
            if source is None:
                raise importers.SourceError("a classifier task needs training data: --train DIR/<label>/*.png|jpg or a path,label CSV")
            fields, tensors = train.train_classifier(self.executor, Path(source), echo)
        elif kind in ("fork", "lora", "onnx"):
            if source is None:
                raise importers.SourceError(f"a {kind} task needs --source: {next(k.source for k in self.kinds if k.name == kind)}")
            if kind == "fork":
                fields, tensors = importers.build_fork(Path(source), options, echo)
            elif kind == "lora":
                fields, tensors = importers.build_lora(Path(source), options, echo)
            else:
                fields = importers.build_onnx(Path(source), options, echo, vdir)
        else:
            raise importers.SourceError(f"unknown vision kind {kind!r} (known: {', '.join(KINDS)})")
        manifest = {"task": task, "version": version, "kind": kind, "backbone": BACKBONE,
                    "backbone_fingerprint": fingerprint(), "source": str(source or ""), **fields}
        if tensors:
            write_weights(vdir, tensors)
        write_manifest(vdir, manifest)
        self.check_artifact(vdir)
        return read_manifest(vdir)
