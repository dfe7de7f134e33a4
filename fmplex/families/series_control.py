"""Time-series backbones (Fracast-0) on the ``fmplex_series`` host: the control-plane side.

Everything about the backbone and its tasks is ``fmplex.families.timeseries``'s
``SeriesFamily``; this module only plugs it into the family interface (host
config with the slot outputs, kinds, options, vFMs). See docs/timeseries.md.
"""

from __future__ import annotations

from typing import Any

import click

from fmplex.backbones import SERIES

from .base import OptionError
from .single_host import SingleHostFamily


class SeriesBackbones(SingleHostFamily):
    name = "timeseries"
    summary = "time-series backbones: zero-shot and fine-tuned forecasts, classifiers and embeddings on one shared host"
    backend = "fmplex_series"
    catalog = SERIES
    host_outputs = (("OUT_", "TYPE_FP32", "[ -1, -1 ]"), ("QNT_", "TYPE_FP32", "[ -1, -1, -1 ]"), ("TXT_", "TYPE_STRING", "[ -1 ]"))
    optional_inputs = ("LENGTHS", "HORIZON")
    host_params = {
        "max_batch_rows": 64, "max_rows_per_request": 256, "workers": "1", "policy": "wfq",
        "max_lag": 256, "max_queue_delay_us": 0, "extension_budget_mb": 256,
        "saturated_batch_rows": 0, "light_window_ms": 1000,  # growth off: see SchedulerSettings
    }  # fmt: skip
    object_path = "fmplex.families.timeseries.family:SeriesFamily"
    error_paths = ("fmplex.families.timeseries.importers:SourceError", "fmplex.families.timeseries.train:TrainError")

    def usage(self, kind: Any) -> str:
        return {
            "forecast": "nothing to give [--horizon N --max-horizon M --quantiles 0.1,0.5,0.9]",
            "fork": "--source finetuned.safetensors (fracast's layout) [--horizon N ...]",
            "classifier": "--train series.csv (label,x1,x2,...)",
            "embedding": "nothing to give: fmplex task create sig --backbone fracast --kind embedding",
        }.get(kind.name, kind.source)

    def create_options(self) -> list[click.Option]:
        return [
            click.Option(["--horizon"], type=click.IntRange(1), default=None, help="Series forecast tasks: default steps to forecast."),
            click.Option(["--max-horizon"], type=click.IntRange(1), default=None, help="Series forecast tasks: the most steps a request may ask (HORIZON)."),
            click.Option(["--quantiles"], default=None, help="Series forecast tasks: comma-separated quantiles, a subset of 0.1..0.9."),
            click.Option(["--min-context"], type=click.IntRange(8), default=None, help="Series tasks: finite values a row needs (at least 8)."),
            click.Option(["--missing"], type=click.Choice(["mask", "reject"]), default=None,
                         help="Series tasks: NaN inside a row is a missing value (mask) or a bad request (reject)."),
        ]  # fmt: skip

    def family_options(self, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: options.get(k) for k in ("horizon", "max_horizon", "min_context", "missing")}
        q = options.get("quantiles")
        if q:
            try:
                out["quantiles"] = [float(x) for x in q.split(",")]
            except ValueError:
                raise OptionError(f"--quantiles must be comma-separated numbers, got {q!r}") from None
        return {k: v for k, v in out.items() if v is not None}
