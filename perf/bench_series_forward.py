"""The raw forward of ``fm.fracast``: rows per second at batch 1, 16 and 64, one torch thread.

The physical limit of the series backbone on this machine, with nothing of
Triton or scheduling around it: fracast's own ``FracastModel.forecast_batch``
(normalisation, trunk over the 2048-step context, head; 48 steps) on windows
of the statsmodels sunspots series, in a tight loop. Also: the trunk alone
(the shared pass), the head alone (what a ``fork`` adds per row), and a mixed
batch of 64 rows from four tasks of three kinds through the family's executor
(its default CPU chunking), to compare with the raw forward of 64 rows.

Writes ``perf/results/series_forward.json`` and prints a table. The machines
are shared: read the figures as an order of magnitude.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf.common import machine_header, timed_rate, write_results  # noqa: E402

OUT = ROOT / "perf" / "results" / "series_forward.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from fmplex.families.timeseries import demo_data as dd
    from fmplex.families.timeseries.family import SeriesFamily
    from fmplex.families.timeseries.model import Backbone, base_state, normalise, reference_model

    torch.set_num_threads(1)
    sun = dd.series("sunspots")
    windows = [np.array(sun[i : i + 240]) for i in range(64)]
    ref = reference_model("fp32", args.device)
    bb = Backbone("fp32", args.device)
    result: dict = machine_header(device=args.device, context_steps=bb.width, horizon=bb.native_horizon,
                                  forward={}, parts={}, executor={})
    for b in (1, 16, 64):
        batch = np.stack(windows[:b])
        result["forward"][f"batch_{b}"] = r = timed_rate(lambda batch=batch: ref.forecast_batch(batch), b, args.seconds)
        print(f"forecast_batch  batch {b:3d}: {r['rows_per_s']:8.1f} rows/s  ({r['median_ms']} ms/call)", flush=True)

    norm = normalise(windows[:16], bb.width)
    values, valid = bb.tensors(norm)
    with torch.inference_mode():
        hidden = bb.trunk(values, valid)
        result["parts"]["trunk_batch_16"] = r1 = timed_rate(lambda: bb.trunk(values, valid), 16, args.seconds)
        result["parts"]["head_batch_16"] = r2 = timed_rate(lambda: bb.quantiles_of(bb.head, hidden, values, valid), 16, args.seconds)
    print(f"trunk alone     batch  16: {r1['rows_per_s']:8.1f} rows/s; head alone: {r2['rows_per_s']:8.1f} rows/s", flush=True)

    fam = SeriesFamily(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        state = base_state("fp32")
        state["head.out_proj.bias"] = state["head.out_proj.bias"] + 0.01
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items() if k.startswith("head.")}, f"{tmp}/ft.safetensors")
        tasks = []
        for name, kind, source in (("a", "forecast", None), ("b", "forecast", None), ("ft", "fork", Path(f"{tmp}/ft.safetensors")),
                                   ("e", "embedding", None)):
            fam.build_task(Path(tmp) / name / "1", name, 1, kind, source, {}, lambda s: None)
            tasks.append(fam.load_task(Path(tmp) / name / "1"))
    items = [(tasks[i % 4], fam.decode(tasks[i % 4], w[None, :])) for i, w in enumerate(windows)]
    result["executor"]["mixed_64_rows_4_tasks"] = r = timed_rate(lambda: fam.run_batch(items), 64, args.seconds)
    result["executor"]["max_pass_rows"] = fam.executor.max_pass_rows
    print(f"executor, 64 rows of 4 tasks (forecast x2, fork, embedding): {r['rows_per_s']:8.1f} rows/s", flush=True)

    write_results(OUT.name, result)


if __name__ == "__main__":
    main()
