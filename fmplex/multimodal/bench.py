"""Figures for the multimodal stages: load time, latency per request shape,
encoder batching under concurrency.

    python -m fmplex.multimodal.bench [--seconds 10] [--clients 8] [--max-encode-batch 16]

Starts its own tritonserver on a fresh repository with both tiny backbones
(free ports; always stopped), prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _infer(client: Any, mod: Any, task: str, n: int, rng: np.random.Generator) -> float:
    t = mod.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"Describe the picture."], dtype=object))
    inputs = [t]
    if n:
        im = mod.InferInput("IMAGES", [n, 3, 32, 32], "FP32")
        im.set_data_from_numpy(rng.standard_normal((n, 3, 32, 32)).astype(np.float32))
        inputs.append(im)
    t0 = time.perf_counter()
    client.infer(task, inputs, outputs=[mod.InferRequestedOutput("TOKEN_IDS")])
    return time.perf_counter() - t0


def _encoder(client: Any, model: str) -> dict[str, Any]:
    st = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in st.get("batch_stats", [])}
    return {"images": int(st.get("inference_count", 0)), "batches": int(st.get("execution_count", 0)), "sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--max-encode-batch", type=int, default=16)
    ap.add_argument("--encode-queue-delay-us", type=int, default=500)
    ap.add_argument("--lm-instances", type=int, default=1)
    ap.add_argument("--sequential", type=int, default=30, help="requests per shape for the latency table")
    args = ap.parse_args()

    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    from fmplex.control import serving  # noqa: PLC0415
    from fmplex.control.server import free_ports  # noqa: PLC0415

    from fmplex.control import workflows  # noqa: PLC0415
    from fmplex.families import multimodal as control  # noqa: PLC0415

    out: dict[str, Any] = {
        "max_encode_batch": args.max_encode_batch,
        "encode_queue_delay_us": args.encode_queue_delay_us,
        "lm_instances": args.lm_instances,
    }
    with tempfile.TemporaryDirectory(prefix="fmplex-mm-bench-") as tmp:
        repo = Path(tmp) / "repo"
        t0 = time.perf_counter()
        for b in ("llava-tiny", "mllama-tiny"):
            places = control.placements("shared")
            places["lm"] = control.StagePlacement(instances=args.lm_instances)
            control.init_multimodal(repo, b, places, max_encode_batch=args.max_encode_batch,
                                   encode_queue_delay_us=args.encode_queue_delay_us)
            workflows.create_task(repo, f"a-{b}", b, options=dict(prompt="USER: ", max_new_tokens=8))
            workflows.create_task(repo, f"b-{b}", b, options=dict(prompt="Q: ", max_new_tokens=8))
            workflows.deploy(repo, [f"a-{b}"])
            workflows.deploy(repo, [f"b-{b}"])
        out["init_s"] = round(time.perf_counter() - t0, 2)
        ports = free_ports()
        t0 = time.perf_counter()
        proc = serving.start(repo, ports, log_path=Path(tmp) / "server.log")
        out["server_ready_s"] = round(time.perf_counter() - t0, 2)
        try:
            log = (Path(tmp) / "server.log").read_text(errors="replace")
            out["stage_load_s"] = {
                line.split("stage ")[1].split(":")[0]: float(line.rsplit("loaded in ", 1)[1].split("s")[0])
                for line in log.splitlines()
                if "loaded in" in line and "fmplex " in line
            }
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
            rng = np.random.default_rng(0)
            latency: dict[str, dict[str, float]] = {}
            for b in ("llava-tiny", "mllama-tiny"):
                for n in (0, 1, 3):
                    _infer(client, grpcclient, f"a-{b}", n, rng)  # warm
                    ts = sorted(_infer(client, grpcclient, f"a-{b}", n, rng) for _ in range(args.sequential))
                    latency[f"{b} images={n}"] = {
                        "p50_ms": round(1e3 * statistics.median(ts), 2),
                        "p90_ms": round(1e3 * ts[int(0.9 * (len(ts) - 1))], 2),
                    }
            out["sequential_latency_8_new_tokens"] = latency
            # Concurrency: clients alternate two tasks of llava-tiny, each request with --images images.
            before = _encoder(client, "fm.llava-tiny.encode")
            done: list[float] = []
            stop = time.perf_counter() + args.seconds

            def run(i: int) -> None:
                c = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
                r = np.random.default_rng(i)
                while time.perf_counter() < stop:
                    done.append(_infer(c, grpcclient, ("a-" if i % 2 else "b-") + "llava-tiny", args.images, r))
                c.close()

            threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            after = _encoder(client, "fm.llava-tiny.encode")
            sizes = {s: after["sizes"].get(s, 0) - before["sizes"].get(s, 0) for s in after["sizes"]}
            images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
            ts = sorted(done)
            out["concurrent"] = {
                "clients": args.clients,
                "images_per_request": args.images,
                "requests": len(ts),
                "requests_per_s": round(len(ts) / wall, 1),
                "p50_ms": round(1e3 * statistics.median(ts), 1),
                "p90_ms": round(1e3 * ts[int(0.9 * (len(ts) - 1))], 1),
                "encoder_images": images,
                "encoder_batches": batches,
                "mean_encoder_batch": round(images / max(batches, 1), 2),
                "encoder_batch_sizes": {str(s): c for s, c in sorted(sizes.items()) if c},
            }
            client.close()
        finally:
            proc.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
