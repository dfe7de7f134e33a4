"""Image backbones (EfficientNet-Lite0) on the ``fmplex_vision`` host: the control-plane side.

Everything about the backbone and its tasks is ``fmplex.families.vision``'s
``VisionFamily``; this module only plugs it into the family interface (host
config with the slot outputs, kinds, options, vFMs). See docs/vision.md.
"""

from __future__ import annotations

from typing import Any

import click

from fmplex.backbones import VISION

from .single_host import SingleHostFamily


class VisionBackbones(SingleHostFamily):
    name = "vision"
    summary = "image backbones: embeddings, linear probes, forked blocks, LoRA and ONNX heads on one shared host"
    backend = "fmplex_vision"
    catalog = VISION
    host_outputs = (("OUT_", "TYPE_FP32", "[ -1, -1 ]"), ("TXT_", "TYPE_STRING", "[ -1 ]"))
    optional_inputs = ("IMAGE", "PIXELS")
    host_params = {
        "max_batch_rows": 16, "max_rows_per_request": 64, "workers": "1", "policy": "wfq",
        "max_lag": 64, "max_queue_delay_us": 0, "extension_budget_mb": 1024,
        "saturated_batch_rows": 0, "light_window_ms": 1000,  # growth off: see SchedulerSettings
    }  # fmt: skip
    object_path = "fmplex.families.vision.family:VisionFamily"
    error_paths = ("fmplex.families.vision.importers:SourceError", "fmplex.families.vision.train:TrainError")

    def usage(self, kind: Any) -> str:
        return {
            "embedding": "nothing to give: fmplex task create pics --backbone efficientnet --kind embedding",
            "classifier": "--train DIR/<label>/*.png|jpg or a path,label CSV",
            "fork": "--source finetuned.safetensors (a full EfficientNet-Lite0 state dict) [--image-labels a,b]",
            "onnx": "--source head.onnx --image-labels a,b [--image-onnx-family embedding]",
            "lora": "--source PEFT_LORA_DIR [--image-labels a,b]",
        }.get(kind.name, kind.source)

    def create_options(self) -> list[click.Option]:
        return [
            click.Option(["--image-labels"], default=None,
                         help="Vision fork/lora/onnx tasks: comma-separated labels of the imported classifier or ONNX head."),
            click.Option(["--image-onnx-family"], type=click.Choice(["classifier", "embedding"]), default="classifier",
                         show_default=True, help="Vision onnx tasks: what the head returns (which public outputs the vFM has)."),
        ]  # fmt: skip

    def family_options(self, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        labels = options.get("image_labels")
        return {
            "labels": [x.strip() for x in labels.split(",")] if labels else None,
            "onnx_family": options.get("image_onnx_family") or "classifier",
        }

    def prefix_of(self, spec: Any) -> str:
        return "TXT_" if spec.data_type == "TYPE_STRING" else "OUT_"
