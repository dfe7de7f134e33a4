"""The raw forward of ``fm.efficientnet``: rows per second at batch 1, 8 and 32, one torch thread.

The physical limit of the vision backbone on this machine, with nothing of
Triton or scheduling around it: the package's network in this process, the
pooled features of preprocessed rows (scikit-image photographs) in a tight
loop. Also times the preprocessing of one encoded image (JPEG decode, resize,
crop, normalise), which the host does per row before the batch forms, and the
shared pass of a mixed batch (six tasks of four kinds, 32 rows) through the
family's executor (its default CPU chunking: passes of at most 8 rows), to
compare with the raw forward of the same 32 rows at once and in passes of 8.

Writes ``perf/results/vision_forward.json`` and prints a table. The machines
are shared: read the figures as an order of magnitude.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf.common import machine_header, timed_rate, write_results  # noqa: E402

OUT = ROOT / "perf" / "results" / "vision_forward.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="time per measurement (default 6)")
    args = parser.parse_args()

    import io

    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    from fmplex.families.vision import model as net
    from fmplex.families.vision.preprocess import decode_image

    torch.set_num_threads(1)
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG")
    jpeg = buf.getvalue()
    rows = np.stack([decode_image(jpeg)] * 32)
    model = net.build_model()

    import os

    results: dict = machine_header(forward={})
    print(f"{'what':<28}{'rows':>6}{'median ms':>12}{'rows/s':>10}")
    for batch in (1, 8, 32):
        x = torch.from_numpy(rows[:batch])

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                net.features(model, x)

        r = timed_rate(forward, batch, args.seconds)
        results["forward"][f"batch_{batch}"] = r
        print(f"{'raw forward':<28}{batch:>6}{r['median_ms']:>12}{r['rows_per_s']:>10}")

    x32 = torch.from_numpy(rows)

    def forward_in_eights() -> None:
        with torch.inference_mode():
            for i in range(0, 32, 8):
                net.features(model, x32[i : i + 8])

    r = timed_rate(forward_in_eights, 32, args.seconds)
    results["forward"]["batch_32_in_passes_of_8"] = r
    print(f"{'raw forward, passes of 8':<28}{32:>6}{r['median_ms']:>12}{r['rows_per_s']:>10}")

    r = timed_rate(lambda: decode_image(jpeg), 1, args.seconds / 2)
    results["preprocess_jpeg_451x300"] = r
    print(f"{'preprocess (JPEG 451x300)':<28}{1:>6}{r['median_ms']:>12}{r['rows_per_s']:>10}")

    results["mixed_batch"] = _mixed(rows, args.seconds)
    r = results["mixed_batch"]
    print(f"{'mixed batch (6 tasks)':<28}{r['rows']:>6}{r['median_ms']:>12}{r['rows_per_s']:>10}")
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(OUT.name, results)


def _mixed(rows, seconds: float) -> dict:  # noqa: ANN001
    """32 rows of six tasks (embedding, two classifiers, forks at stage 14 and 17, LoRA) in one run_batch."""
    import torch

    from fmplex.families.vision.executor import VisionExecutor
    from fmplex.families.vision.model import N_STAGES
    from fmplex.families.vision.loading import load_task
    from fmplex.families.vision.weights import load_state_dict

    ex = VisionExecutor()
    state = load_state_dict()
    g = torch.Generator().manual_seed(0)
    head = {"head.weight": torch.randn(10, 1280, generator=g) * 0.01, "head.bias": torch.zeros(10)}
    labels = [f"c{i}" for i in range(10)]

    def fork(point: int) -> dict:
        from fmplex.families.vision.fork import stage_keys

        return {f"fork.{k}": state[k].clone() for s in range(point, N_STAGES) for k in stage_keys(s)}

    lora = {"lora.15.project.A": torch.randn(4, 1152, generator=g) * 0.01, "lora.15.project.B": torch.randn(320, 4, generator=g) * 0.01}
    base = {"backbone": "fm.efficientnet"}
    tasks = [
        load_task({**base, "task": "e", "kind": "embedding"}, {}),
        load_task({**base, "task": "c", "kind": "classifier", "head": {"type": "linear"}, "labels": labels}, dict(head)),
        load_task({**base, "task": "f14", "kind": "fork", "fork": {"point": 14}, "head": {"type": "linear"}, "labels": labels},
                  {**fork(14), **head}),
        load_task({**base, "task": "f17", "kind": "fork", "fork": {"point": N_STAGES}, "head": {"type": "linear"}, "labels": labels},
                  dict(head)),
        load_task({**base, "task": "l", "kind": "lora", "lora": {"scale": 2.0}}, lora),
        load_task({**base, "task": "c2", "kind": "classifier", "head": {"type": "linear"}, "labels": labels}, dict(head)),
    ]
    counts = [6, 6, 5, 5, 5, 5]
    items, at = [], 0
    for task, n in zip(tasks, counts):
        items.append((task, rows[at : at + n]))
        at += n
    return timed_rate(lambda: ex.run_batch(items), sum(counts), seconds)


if __name__ == "__main__":
    main()
