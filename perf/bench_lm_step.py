"""LLaVA lm-stage engine step time: a step that admits prompts while rows decode, split vs padded attention.

The continuous-batching engine of the ``llava-tiny`` lm stage (one torch
thread). Each case starts ``decode`` running rows, lets them decode a few
steps, then submits ``prompts`` (image count, prompt bytes) and times the one
step that admits them next to the running rows:

* *split* is :class:`fmplex.generative.forward.LlamaForward`: the decoding rows
  are attended with one query each, the new prompts in a second call, padded
  among themselves;
* *padded* attends every row of such a step in one call, each row's queries
  padded to the longest prompt (how the engine ran mixed steps before).

Both give the same tokens (checked here on a mixed run). A mixed step is what
every running sequence waits for when a request arrives, so its time is the
decode stall that the staged multimodal trace's TPOT and e2e tails are made of.

Prints a table and writes ``perf/results/lm_step.json``. Cases alternate
between the two forwards; each figure is the median over ``--repeats``.
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

CASES: list[tuple[int, list[tuple[int, int]]]] = [  # (decoding rows, [(images, prompt bytes) admitted])
    (8, []),
    (8, [(0, 20)]),
    (8, [(0, 128)]),
    (8, [(4, 128)]),
    (8, [(4, 128)] * 3),
    (1, [(4, 128)]),
    (0, [(4, 128), (0, 20)]),
]


def padded_forward_class() -> type:
    """``LlamaForward`` with the old attention: every row of a step with prompts padded to the longest."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415

    from fmplex.generative.forward import LlamaForward  # noqa: PLC0415

    class PaddedForward(LlamaForward):
        def _attend(self, q: Any, ck: Any, cv: Any, step: Any) -> Any:
            if step.decode_only:
                return super()._attend(q, ck, cv, step)
            b = len(step.rows)
            kv = max(step.max_kv, step.prefill_kv)
            mask = getattr(step, "padded_mask", None)
            if mask is None:  # once per step, as the old pack() built it
                last = torch.tensor(step.lens)[:, None] - 1
                qpos = torch.tensor([s.past for s in step.rows])[:, None] + torch.minimum(torch.arange(step.max_n)[None, :], last)
                mask = step.padded_mask = (torch.arange(kv)[None, None, :] <= qpos[:, :, None])[:, None]
            qb = q.new_zeros(b, q.shape[1], step.max_n, q.shape[2])
            qb[step.row_of, :, step.off_of] = q
            o = F.scaled_dot_product_attention(qb, ck[:b, :, :kv], cv[:b, :, :kv], attn_mask=mask, scale=self.scaling, enable_gqa=True)
            return o[step.row_of, :, step.off_of]

    return PaddedForward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per case and forward (median taken; default 30)")
    args = parser.parse_args()

    import torch

    from fmplex.generative.engine import Engine, SamplingParams
    from fmplex.generative.forward import LlamaForward
    from fmplex.multimodal import models
    from fmplex.multimodal.lm_engine import ByteText, lm_sequence

    enc, lm = tiny_stages("llava-tiny")
    gen = torch.Generator().manual_seed(0)
    forwards = {"split": LlamaForward, "padded": padded_forward_class()}

    def seq(images: int, nbytes: int, max_new: int = 200) -> Any:
        ids = lm.tokenizer.encode("x" * nbytes, images)
        feats = enc.encode(torch.randn(images, 3, 32, 32, generator=gen)) if images else None
        return lm_sequence(lm, "t", ids, feats, SamplingParams(max_tokens=max_new))

    def engine(kind: str) -> Engine:
        fw = forwards[kind](lm.lm, lm.lm_head.weight, lm.config.text_config, max_rows=16, kv_capacity=64)
        return Engine(forward=fw, tokenizer=ByteText(), eos_token_id=models.EOS_ID, max_rows=16, prefill_tokens=100_000,
                      max_context=lm.max_positions)  # fmt: skip

    def admit_step(kind: str, decode: int, prompts: list[tuple[int, int]]) -> float:
        eng = engine(kind)
        for _ in range(decode):
            eng.submit(seq(0, 20))
        for _ in range(4 if decode else 0):
            eng.step()
        for p in prompts:
            eng.submit(seq(*p))
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0

    result: dict = machine_header(backbone="llava-tiny", repeats=args.repeats, cases=[])
    print(f"{'decoding rows':>13}  {'prompts admitted (images, bytes)':<34} {'tokens':>6} {'split ms':>9} {'padded ms':>10} {'split/padded':>13}")
    for decode, prompts in CASES:
        times: dict[str, list[float]] = {k: [] for k in forwards}
        for i in range(args.repeats):
            for kind in forwards if i % 2 == 0 else reversed(list(forwards)):
                times[kind].append(admit_step(kind, decode, prompts))
        ms = {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}
        tokens = sum(len(lm.tokenizer.encode("x" * b, n)) for n, b in prompts)
        ratio = round(ms["split"] / ms["padded"], 2)
        result["cases"].append({"decoding_rows": decode, "prompts": prompts, "prompt_tokens": tokens, "step_ms": ms, "split_over_padded": ratio})
        print(f"{decode:>13}  {str(prompts):<34} {tokens:>6} {ms['split']:>9.2f} {ms['padded']:>10.2f} {ratio:>12.2f}x")
    answers = {}
    for kind in forwards:  # the same mixed run on both: prompts joining running rows at different steps
        gen.manual_seed(1)
        eng, seqs = engine(kind), []
        for k, p in enumerate([(0, 20), (1, 64), (4, 128), (0, 5), (2, 30)]):
            seqs.append(seq(*p, max_new=12))
            eng.submit(seqs[-1])
            if k % 2:
                eng.step()
        eng.run_until_idle()
        answers[kind] = [s.generated for s in seqs]
    result["same_tokens"] = answers["split"] == answers["padded"]
    print(f"same tokens: {result['same_tokens']}")
    write_results("lm_step.json", result)


if __name__ == "__main__":
    main()
