"""What only a decode engine knows, as host metrics: steps, rows per step, tokens, running rows.

Both hosts that run :class:`~fmplex.generative.engine.Engine` -- the SmolLM2
host and the multimodal LM stage -- publish these under the same
``fmplex_gen_*`` names. No Triton imports: ``metrics`` is the host's
:class:`fmplex.runtime.metrics.HostMetrics`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENGINE_COUNTERS", "EngineMetrics"]

ENGINE_COUNTERS = (
    ("steps", "decode steps (one batched forward each)"),
    ("rows", "sequences summed over decode steps"),
    ("multi_row_steps", "decode steps that carried more than one sequence"),
    ("tokens_generated", "tokens generated"),
    ("prefill_tokens", "prompt tokens prefilled"),
    ("admitted", "sequences admitted into the running batch"),
)


class EngineMetrics:
    """Publishes an engine's counters; called when the host's metrics flush (``Host.publish``), so at
    most once per metrics interval (each update is an IPC message) and once more after the last step.
    A timer of its own would miss that last flush: an idle host wakes for one flush and then sleeps."""

    def __init__(self, metrics: Any, engine: Any) -> None:
        self.metrics = metrics
        self.engine = engine

    def publish(self) -> None:
        st = self.engine.stats
        for key, doc in ENGINE_COUNTERS:
            self.metrics.bump(f"fmplex_gen_{key}_total", float(getattr(st, key)), doc)
        self.metrics.gauge("fmplex_gen_max_rows", st.max_rows, "most sequences one decode step carried")
        self.metrics.gauge("fmplex_gen_running", len(self.engine.running), "sequences in the running batch")
