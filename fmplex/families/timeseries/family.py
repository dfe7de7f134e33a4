"""``fm.fracast`` as one object: what the host and the control plane need of the time-series family.

:class:`SeriesFamily` gathers the backbone's name, its host inputs and the
public outputs of each output family (with the host output prefix each one
travels under), its task kinds with their create options, the artifact check,
the request decoder and the batched entry point (:meth:`SeriesFamily.run_batch`).
It is written to plug into the backbone-family interface and the shared host
runtime; until then it is used directly by tests and benchmarks. Serving-side
methods import no control-plane code; :meth:`build_task` imports the importer
and the trainer lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmplex.artifacts import read_manifest, read_weights, write_manifest, write_weights
from fmplex.families.family_spec import BatchedFamily, Echo, KindInfo, TensorSpec

from .inputs import SeriesLimits, SeriesRequest, decode_request
from .model import BACKBONE, WEIGHT_FORMATS, fingerprint
from .tasks import KINDS, MAX_HORIZON, SeriesTask, load_task

COMMON_OPTIONS = ("min_context", "missing")
FORECAST_OPTIONS = ("horizon", "max_horizon", "quantiles", *COMMON_OPTIONS)


class SeriesFamily(BatchedFamily):
    backbone = BACKBONE
    description = "Fracast-0 (85k parameters), univariate series, last 2048 steps -> 48-step quantile forecasts"
    # Host inputs: SERIES always; LENGTHS and HORIZON optional.
    inputs = (
        TensorSpec("SERIES", "TYPE_FP32", "[ -1, -1 ]"),  # rows, padded with NaN at the end
        TensorSpec("LENGTHS", "TYPE_INT64", "[ -1 ]"),  # optional: each row's length
        TensorSpec("HORIZON", "TYPE_INT64", "[ 1 ]"),  # optional: steps to forecast
    )
    optional_inputs = ("LENGTHS", "HORIZON")
    # Output family -> public outputs.
    outputs = {
        "forecast": (TensorSpec("FORECAST", "TYPE_FP32", "[ -1, -1 ]"),
                     TensorSpec("QUANTILES", "TYPE_FP32", "[ -1, -1, -1 ]", prefix="QNT")),
        "classifier": (TensorSpec("LOGITS", "TYPE_FP32", "[ -1, -1 ]"), TensorSpec("LABEL", "TYPE_STRING", "[ -1 ]", prefix="TXT")),
        "embedding": (TensorSpec("EMBEDDING", "TYPE_FP32", "[ -1, 128 ]"),),
    }
    kinds = (
        KindInfo("forecast", "zero-shot quantile forecasts (FORECAST = median, QUANTILES)", "nothing", FORECAST_OPTIONS),
        KindInfo("fork", "a fine-tuned forecast head (only the head tensors that differ are kept)",
                 "a fine-tuned state dict in fracast's layout (.safetensors)", FORECAST_OPTIONS, data="source"),
        KindInfo("classifier", "a linear probe on the series embedding", "--train a label,x1,x2,... CSV", COMMON_OPTIONS,
                 data="train"),
        KindInfo("embedding", "the series embedding [rows, 128]", "nothing", COMMON_OPTIONS),
    )

    def __init__(self, device: str = "cpu", weights: str = "fp32", limits: SeriesLimits = SeriesLimits(),
                 max_pass_rows: int | None = -1) -> None:
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
        super().__init__(device, max_pass_rows)
        self.weights = weights
        self.limits = limits

    # --- serving --------------------------------------------------------------------------------
    def make_executor(self) -> Any:
        from .executor import SeriesExecutor  # noqa: PLC0415 - torch + the network

        return SeriesExecutor(self.weights, self.device, max_pass_rows=self.max_pass_rows)

    def decode(self, task: SeriesTask, series: np.ndarray | None, lengths: np.ndarray | None = None,
               horizon: np.ndarray | None = None) -> SeriesRequest:
        """A request's inputs -> checked rows and horizon; raises RequestError (one line) if bad."""
        return decode_request(task, series, lengths, horizon, self.limits)

    def cost(self, task: SeriesTask, request: SeriesRequest) -> int:
        """Trunk passes the request costs: rows x rounds (a horizon over 48 steps takes a pass per 48)."""
        native = self.executor.backbone.native_horizon
        rounds = -(-int(request.horizon) // native) if request.horizon else 1
        return len(request.rows) * rounds

    def load_task(self, vdir: Path) -> SeriesTask:
        """A task from its version directory (manifest + weights); ArtifactError if it does not fit."""
        vdir = Path(vdir)
        return load_task(read_manifest(vdir), read_weights(vdir), self.executor.backbone)

    # --- building (control plane) ---------------------------------------------------------------
    def build_task(self, vdir: Path, task: str, version: int, kind: str, source: Path | None,
                   options: dict[str, Any], echo: Echo) -> dict[str, Any]:
        """Build and store a task's artifact in ``vdir``, then load it as the host will; its manifest."""
        from . import importers, train  # noqa: PLC0415 - control plane

        vdir = Path(vdir)
        info = {k.name: k for k in self.kinds}.get(kind)
        if info is None:
            raise importers.SourceError(f"unknown series kind {kind!r} (known: {', '.join(KINDS)})")
        unknown = sorted(k for k, v in options.items() if v is not None and k not in info.options)
        if unknown:
            raise importers.SourceError(f"kind {kind!r} takes no option {unknown[0]!r} (it takes: {', '.join(info.options)})")
        fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        if "quantiles" in fields:
            fields["quantiles"] = [float(q) for q in fields["quantiles"]]
        if "max_horizon" in fields and int(fields["max_horizon"]) > MAX_HORIZON:
            raise importers.SourceError(f"max_horizon {fields['max_horizon']} is over the family's limit {MAX_HORIZON}")
        tensors: dict[str, Any] = {}
        if kind in ("forecast", "embedding"):
            if source is not None:
                raise importers.SourceError(f"a {kind} task takes no source")
            fields["head"] = {"type": kind}
        elif kind == "fork":
            if source is None:
                raise importers.SourceError(f"a fork task needs --source: {info.source}")
            more, tensors = importers.build_fork(Path(source), echo)
            fields.update(more)
        else:
            if source is None:
                raise importers.SourceError("a classifier task needs training data: --train a label,x1,x2,... CSV")
            more, tensors = train.train_classifier(self.executor, Path(source), echo)
            fields.update(more)
        manifest = {"task": task, "version": version, "kind": kind, "backbone": BACKBONE,
                    "backbone_fingerprint": fingerprint(self.weights), "backbone_weights": self.weights,
                    "source": str(source or ""), **fields}
        if tensors:
            write_weights(vdir, tensors)
        write_manifest(vdir, manifest)
        self.check_artifact(vdir)
        return read_manifest(vdir)
