"""The cost of sharing: one mixed batch of every extension kind vs the alternatives.

Side by side in one process, on the host's own executor (1 torch thread):

- ``plain``: R rows for each of N plain embedding tasks in one batch
  (what the shared backbone costs with no extensions at all);
- ``mixed``: the same rows, but each task has a different extension kind
  (LoRA r4 and r16, soft prompt, adapter, forked top layers with a cls and a
  token head, ONNX pooled and token heads) — one shared batch;
- ``separate``: the same tasks, each task's rows as its own forward pass
  (what a deployment without cross-task batching does).

Prints rows/s of each and the ratios, writes ``perf/results/extensions_bench.json``
with bytes per task of each kind.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmplex.backbones import get_backbone  # noqa: E402
from perf.common import write_results  # noqa: E402
from fmplex.control import importers  # noqa: E402
from fmplex.triton_backend.executor import Executor, WorkItem, set_threads  # noqa: E402
from fmplex.triton_backend.extensions import extension_class  # noqa: E402
from fmplex.triton_backend.extensions.embedding import EmbeddingExtension  # noqa: E402
from fmplex.runtime.validation import Rows  # noqa: E402

SENTENCES = [
    "The service was quick and the food arrived hot.",
    "Stocks fell sharply after the central bank raised rates.",
    "Can I book a table for two at eight tonight?",
    "The striker scored twice in the second half.",
]


def build_tasks(tmp: Path, ex: Executor) -> dict[str, object]:
    from tests.kinds import adapter, fork, lora, onnx, prompt  # noqa: PLC0415 - sources made with peft/transformers/onnx

    spec = get_backbone("minilm")
    sources = {
        "lora_r4": lora.make(tmp, seed=1, rank=4),
        "lora_r16": lora.make(tmp, seed=2, rank=16, targets=("query", "key", "intermediate.dense", "output.dense")),
        "prompt": prompt.make(tmp, seed=3),
        "adapter": adapter.make(tmp, seed=4),
        "fork_cls": fork.make(tmp, seed=5, head="cls", layers=2),
        "fork_token": fork.make(tmp, seed=6, head="token", layers=1),
        "onnx_pooled": onnx.make(tmp, seed=7, mode="pooled"),
        "onnx_token": onnx.make(tmp, seed=8, mode="hidden"),
    }
    tasks = {}
    for name, src in sources.items():
        args = dict(zip(src.create_args[::2], src.create_args[1::2]))
        kind = args["--kind"]
        options = {"labels": args["--labels"].split(",") if "--labels" in args else None,
                   "onnx_input": args.get("--onnx-input", "pooled"), "onnx_family": args.get("--onnx-family", "classifier")}
        built = importers.build(kind, Path(args["--source"]), spec, options, lambda m: None)
        manifest = {"kind": kind, "backbone": "minilm", "task": name, "head": {"type": "embedding"}, **built.manifest}
        art = tmp / f"art_{name}"
        art.mkdir()
        for fname, path in built.files.items():
            (art / fname).write_bytes(Path(path).read_bytes())
        tasks[name] = extension_class(kind)(manifest, built.tensors, spec, config=ex.config, artifact_dir=art)
    return tasks


def rate(ex: Executor, batches: list[list[WorkItem]], seconds: float) -> float:
    for b in batches:
        ex.run(b)  # warm up
    rows = sum(len(it.rows.texts or []) for b in batches for it in b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            for it in b:
                it.result = it.error = None
            ex.run(b)
        n += rows
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rows per task per batch")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    set_threads(1)
    spec = get_backbone("minilm")
    ex = Executor(spec)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks(Path(tmp), ex)
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.rows)]
        plain = [EmbeddingExtension({"kind": "embedding", "backbone": "minilm", "task": f"p{i}"}, {}, spec) for i in range(len(tasks))]
        mixed = [[WorkItem(Rows(texts=texts), ext) for ext in tasks.values()]]
        plain_batch = [[WorkItem(Rows(texts=texts), ext) for ext in plain]]
        separate = [[WorkItem(Rows(texts=texts), ext)] for ext in tasks.values()]
        ex.run(mixed[0])
        errors = [it.error for it in mixed[0] if it.error]
        if errors:
            raise SystemExit(f"mixed batch failed: {errors}")
        r_plain = rate(ex, plain_batch, seconds)
        r_mixed = rate(ex, mixed, seconds)
        r_sep = rate(ex, separate, seconds)
        per_kind = {name: ext.nbytes for name, ext in tasks.items()}
    rows = args.rows * len(tasks)
    results = {
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(), "torch_threads": 1},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "batch": {"tasks": len(tasks), "rows_per_task": args.rows, "rows": rows},
        "rows_per_s": {"plain_shared_batch": r_plain, "mixed_shared_batch": r_mixed, "separate_per_task": r_sep},
        "ratios": {"mixed_vs_plain": r_mixed / r_plain, "mixed_vs_separate": r_mixed / r_sep},
        "bytes_per_task": per_kind,
    }
    print(f"== {len(tasks)} tasks x {args.rows} rows = {rows} rows per batch (1 torch thread)")
    print(f"   plain tasks, one shared batch : {r_plain:8.1f} rows/s")
    print(f"   all kinds,   one shared batch : {r_mixed:8.1f} rows/s   ({r_mixed / r_plain:.2f}x plain)")
    print(f"   each task as its own forward  : {r_sep:8.1f} rows/s   (mixed is {r_mixed / r_sep:.2f}x this)")
    print("== bytes per task")
    for name, b in per_kind.items():
        print(f"   {name:<12} {b / 1024:10.1f} KiB")
    write_results("extensions_bench.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
