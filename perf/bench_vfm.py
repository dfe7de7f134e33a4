"""What a vFM costs over the bare backbone, and what a task costs in memory.

Side by side in one run (these machines are shared and noisy, so read the
ratios rather than the absolute figures):

1. ``raw``: the host's own executor in this process, 1 torch thread, batched
   forwards of the same sentence in a tight loop (batch 1, 16, 64): the
   physical limit of the backbone on this machine.
2. ``vfm``: perf_analyzer against one vFM (an ensemble on the shared host)
   over gRPC, one sentence per request, at several concurrencies; and four
   perf_analyzers against four vFMs at once (the requests mix in the host).
3. ``memory``: resident and proportional memory of tritonserver plus all its
   stub processes with 3 tasks deployed, then with 30 (each having answered).

Writes ``perf/results/vfm_bench.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmplex import registry  # noqa: E402
from fmplex.backbones import get_backbone  # noqa: E402
from fmplex.control import serving  # noqa: E402
from fmplex.control import perf as pa  # noqa: E402
from fmplex.control.server import free_ports  # noqa: E402
from perf.common import server_memory, text_input_file, write_results  # noqa: E402

SENTENCE = "The service was quick and the food arrived hot."


def raw_forward(batches: list[int], seconds: float) -> dict[str, float]:
    from fmplex.triton_backend.executor import Executor, set_threads  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    set_threads(1)
    ex = Executor(get_backbone("minilm"))
    ids = np.asarray(ex.tokenizer(SENTENCE)["input_ids"], dtype=np.int64)
    out = {}
    for b in batches:
        rows = [ids] * b
        ex.encode(rows)  # warm up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ex.encode(rows)
            n += b
        out[f"batch_{b}"] = n / (time.perf_counter() - t0)
    return out


def perf_analyzer(url: str, models: list[str], concurrency: int, data: Path, interval_ms: int) -> dict[str, float]:
    """Run one perf_analyzer per model at once; throughput and p99 per model."""
    options = pa.PerfOptions(url, "grpc", concurrency_range=str(concurrency), measurement_interval_ms=interval_ms,
                             stability_percentage=100 if len(models) > 1 else 30, max_trials=10, percentile=99)
    targets = [pa.PerfTarget(m, "text", data, ["--shape", "TEXT:1"], streaming=False) for m in models]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fmplex-pa-") as work:
        for r in pa.run(targets, options, Path(work), echo=lambda _line: None, timeout=300):
            if not r.ok:
                raise RuntimeError(f"perf_analyzer on {r.model} failed:\n{r.error()}")
            out[f"{r.model}_rps"] = r.throughputs[0]
            if r.rows[0].get("p99 latency"):
                out[f"{r.model}_p99_ms"] = int(r.rows[0]["p99 latency"]) / 1000
    out["total_rps"] = sum(v for k, v in out.items() if k.endswith("_rps"))
    return out


def clone_tasks(repo: Path, source: str, count: int) -> list[str]:
    """``count`` more classifier tasks, each its own artifact copy (no training)."""
    names = []
    with registry.editing(repo) as reg:
        src = reg.task(source)
        for i in range(count):
            name = f"clone{i:03d}"
            shutil.copytree(repo / source / "1", repo / name / "1")
            reg.tasks[name] = registry.TaskEntry(name, src.backbone, src.kind, 1)
            names.append(name)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter measurements")
    ap.add_argument("--tasks", type=int, default=30, help="tasks deployed for the memory figure")
    args = ap.parse_args()
    interval = 2000 if args.quick else 5000
    fmplex_cli = str(Path(sys.executable).parent / "fmplex")
    results: dict[str, object] = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print("== raw batched forward (this process, 1 torch thread)")
    raw = raw_forward([1, 16, 64], 3.0 if args.quick else 8.0)
    results["raw_seq_per_s"] = raw
    for k, v in raw.items():
        print(f"   {k:<9} {v:8.1f} seq/s")

    work = Path(tempfile.mkdtemp(prefix="fmplex-bench-"))
    repo = work / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    data = work / "input.json"
    text_input_file(data, [SENTENCE])
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / "server.log")
    url = f"127.0.0.1:{ports.grpc}"
    try:
        assert proc.proc is not None
        vfm: dict[str, object] = {}
        for c in (1, 8, 32):
            r = perf_analyzer(url, ["sentiment"], c, data, interval)
            vfm[f"one_vfm_c{c}"] = r
            print(f"== perf_analyzer sentiment c={c:<3} {r['sentiment_rps']:8.1f} infer/s  p99 {r.get('sentiment_p99_ms', 0):7.1f} ms")
        r = perf_analyzer(url, ["sentiment", "topic", "intent", "embed"], 8, data, interval)
        vfm["four_vfms_c8_each"] = r
        print(f"== four vFMs at once, c=8 each: {r['total_rps']:8.1f} infer/s in total")
        results["vfm"] = vfm
        best = max(max(v["total_rps"] for v in vfm.values()), 0.0)  # type: ignore[index]
        results["vfm_best_rps"] = best
        results["vfm_vs_raw_batch16"] = best / raw["batch_16"]
        results["vfm_vs_raw_batch64"] = best / raw["batch_64"]
        print(f"== best vFM throughput / raw batch-16 forward = {results['vfm_vs_raw_batch16']:.2f}; / batch-64 = {results['vfm_vs_raw_batch64']:.2f}")

        deployed = [t.name for t in registry.load(repo).tasks.values() if t.deployed]
        subprocess.run([fmplex_cli, "undeploy", "--repo", str(repo), "--url", url, deployed[-1]], check=True, capture_output=True)
        three = deployed[:3]
        mem3 = server_memory(proc.proc.pid)
        print(f"== memory with {len(three)} tasks: {mem3['rss_mib']:.0f} MiB RSS, {mem3['pss_mib']:.0f} MiB PSS in {mem3['processes']} processes")
        more = clone_tasks(repo, "sentiment", args.tasks - 3)
        t0 = time.perf_counter()
        subprocess.run([fmplex_cli, "deploy", "--repo", str(repo), "--url", url, *more], check=True, capture_output=True)
        deploy_s = time.perf_counter() - t0
        import numpy as np  # noqa: PLC0415
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        client = grpcclient.InferenceServerClient(url)
        for name in three + more:
            inp = grpcclient.InferInput("TEXT", [1], "BYTES")
            inp.set_data_from_numpy(np.array([SENTENCE.encode()], dtype=object))
            client.infer(name, [inp], client_timeout=60)
        client.close()
        memn = server_memory(proc.proc.pid)
        print(f"== memory with {len(three) + len(more)} tasks: {memn['rss_mib']:.0f} MiB RSS, {memn['pss_mib']:.0f} MiB PSS "
              f"(+{(memn['pss_mib'] - mem3['pss_mib']) / len(more) * 1024:.0f} KiB PSS per task); {len(more)} deploys in {deploy_s:.1f}s")
        results["memory"] = {"tasks_3": mem3, f"tasks_{len(three) + len(more)}": memn, "deploy_seconds": deploy_s,
                             "per_task_kib_pss": (memn["pss_mib"] - mem3["pss_mib"]) / len(more) * 1024}
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_results("vfm_bench.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
