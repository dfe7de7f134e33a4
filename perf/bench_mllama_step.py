"""Mllama engine step time: each row on the transformers modules vs one batched forward, 1/4/8 rows.

The lm stage's engine step for ``mllama-tiny`` (one torch thread), with rows
of mixed image counts (0, 1, 3 images, cycled): a prefill step of all rows,
then decode steps of all rows. *per-row* runs each row's prefill / decode on
the stage's own transformers modules one after the other (how the engine ran
Mllama rows before :class:`fmplex.multimodal.mllama_forward.MllamaForward`);
*batched* is ``MllamaForward``. Both give the same tokens (checked here too).

Prints a table and writes ``perf/results/mllama_step.json``. The machines are
shared: read the figures as an order of magnitude.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf.common import machine_header, tiny_stages, write_results  # noqa: E402

IMAGES = (0, 1, 3)
DECODE_STEPS = 16


class RowForward:
    """The per-row baseline: each row's prefill / decode step on the stage's transformers modules."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def __call__(self, rows: list[Any], n_old: int) -> Any:
        import torch  # noqa: PLC0415

        out = []
        for r, seq in enumerate(rows):
            if r < n_old:
                out.append(self.lm.step(seq.state, seq.generated[-1]))
            else:
                logits, seq.state = self.lm.prefill(seq.prompt_ids, seq.context)
                out.append(logits[-1])
        return torch.stack(out)


def run_rows(forward: Any, make_rows: Any, n: int) -> tuple[float, list[float], list[list[int]]]:
    """One prefill step of ``n`` fresh rows, then DECODE_STEPS decode steps: seconds of each, tokens."""
    rows = make_rows(n)
    t0 = time.perf_counter()
    logits = forward(rows, 0)
    prefill = time.perf_counter() - t0
    if not isinstance(forward, RowForward):
        logits = logits[0]
    for seq, row in zip(rows, logits):
        seq.generated.append(int(row.argmax()))
    decode = []
    for _ in range(DECODE_STEPS):
        t0 = time.perf_counter()
        logits = forward(rows, len(rows))
        decode.append(time.perf_counter() - t0)
        if not isinstance(forward, RowForward):
            logits = logits[0]
        for seq, row in zip(rows, logits):
            seq.generated.append(int(row.argmax()))
    if hasattr(forward, "reset"):
        forward.reset()
    return prefill, decode, [s.generated for s in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per configuration (median taken; default 5)")
    args = parser.parse_args()

    import torch

    from fmplex.generative.engine import SamplingParams
    from fmplex.multimodal.lm_engine import lm_sequence
    from fmplex.multimodal.mllama_forward import MllamaForward

    enc, lm = tiny_stages("mllama-tiny")
    gen = torch.Generator().manual_seed(0)
    feats = {k: enc.encode(torch.randn(k, 3, 32, 32, generator=gen)) if k else None for k in IMAGES}

    def make_rows(n: int) -> list[Any]:
        rows = []
        for i in range(n):
            k = IMAGES[i % len(IMAGES)]
            ids = lm.tokenizer.encode(f"request {i}: describe what you see in detail, please.", k)
            rows.append(lm_sequence(lm, "t", ids, feats[k], SamplingParams(max_tokens=DECODE_STEPS + 1)))
        return rows

    result: dict = machine_header(backbone="mllama-tiny", images_per_row=list(IMAGES), decode_steps=DECODE_STEPS, rows={})
    print(f"{'rows':>4} {'mode':>8} {'prefill ms':>11} {'decode ms/step':>15}")
    for n in (1, 4, 8):
        batched = MllamaForward(lm.lm, lm.lm_head.weight, lm.config.text_config, tiles=lm.tiles, patches=lm.patches,
                                image_token_id=lm.image_token_id, max_rows=n, kv_capacity=64)  # fmt: skip
        entry = {}
        tokens = {}
        for mode, forward in (("per_row", RowForward(lm)), ("batched", batched)):
            run_rows(forward, make_rows, n)  # warm-up
            prefills, decodes = [], []
            for _ in range(args.repeats):
                prefill, decode, tokens[mode] = run_rows(forward, make_rows, n)
                prefills.append(prefill)
                decodes.append(statistics.median(decode))
            entry[mode] = {"prefill_ms": round(1e3 * statistics.median(prefills), 2),
                           "decode_step_ms": round(1e3 * statistics.median(decodes), 2)}  # fmt: skip
            print(f"{n:>4} {mode:>8} {entry[mode]['prefill_ms']:>11.2f} {entry[mode]['decode_step_ms']:>15.2f}")
        entry["same_tokens"] = tokens["per_row"] == tokens["batched"]
        entry["decode_speedup"] = round(entry["per_row"]["decode_step_ms"] / entry["batched"]["decode_step_ms"], 2)
        entry["prefill_speedup"] = round(entry["per_row"]["prefill_ms"] / entry["batched"]["prefill_ms"], 2)
        print(f"{n:>4} speedup: prefill x{entry['prefill_speedup']}, decode x{entry['decode_speedup']}, same tokens: {entry['same_tokens']}")
        result["rows"][str(n)] = entry
    write_results("mllama_step.json", result)


if __name__ == "__main__":
    main()
