"""In-process figures of the generative backbone: load cost and decode throughput.

    .venv/bin/python perf/bench_generate.py [--tokens 32] [--rows 1 2 4 8] [--server]

Measures (1 torch thread, fp32): the backbone load (GGUF or the de-quantized
cache, whichever this process finds), resident memory after it,
transformers' ``generate`` alone, and the engine's throughput with N
concurrent greedy sequences (all admitted at once, same prompt length, N x
tokens generated), with and without LoRA rows from two tasks of different
ranks mixed into the same batches. ``--server`` also measures through a real
tritonserver (one vFM, gRPC): N concurrent clients of plain infer, the time
to the first streamed piece, and the hosts' memory. Writes
perf/results/generate_bench.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fmplex.generative.engine import Engine, SamplingParams, Sequence  # noqa: E402
from fmplex.generative.lora import load_peft_lora  # noqa: E402
from fmplex.generative.smollm import load_smollm2, set_threads  # noqa: E402
from perf.common import write_results  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint:"


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _adapters(lm, tmp: Path) -> list:  # noqa: ANN001
    import copy  # noqa: PLC0415

    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    out = []
    for name, r in (("r4", 4), ("r16", 16)):
        model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():  # small random deltas: a changed but sane model
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape) * 0.02)
        model.save_pretrained(str(tmp / name))
        del model
        out.append(load_peft_lora(tmp / name, lm.config, name))
    return out


def _run(engine: Engine, rows: int, tokens: int, adapters: list) -> dict:  # noqa: ANN001
    ids = engine.tokenize(PROMPT)
    seqs = []
    for i in range(rows):
        adapter = adapters[i % len(adapters)] if adapters else None
        seqs.append(Sequence(f"t{i % 3}", ids, SamplingParams(max_tokens=tokens, stop=()), adapter=adapter))
    t0 = time.perf_counter()
    for s in seqs:
        engine.submit(s)
    engine.run_until_idle()
    secs = time.perf_counter() - t0
    made = sum(len(s.generated) for s in seqs)  # a row may end early at EOS
    return {"rows": rows, "tokens": made, "seconds": round(secs, 3), "tokens_per_s": round(made / secs, 1)}


def _pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _server(lm, tokens: int, rows_list: list[int]) -> dict:  # noqa: ANN001
    """Through tritonserver: N concurrent gRPC clients, one request each, whole answers."""
    import queue  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    from fmplex.control import serving  # noqa: PLC0415
    from fmplex.control.server import free_ports  # noqa: PLC0415
    from fmplex.control.workflows import start_up  # noqa: PLC0415
    from fmplex.families.generative import OUTPUT  # noqa: PLC0415

    fmplex = str(Path(sys.executable).parent / "fmplex")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for cmd in (["init", str(repo), "--backbone", "smollm2", "--slots", "8"],
                    ["task", "create", "chat", "--backbone", "smollm2", "--kind", "generate", "--repo", str(repo)],
                    ["deploy", "chat", "--offline", "--repo", str(repo)]):
            subprocess.run([fmplex, *cmd], check=True, capture_output=True)
        ports = free_ports()
        t0 = time.perf_counter()
        proc = serving.start(repo, ports, log_path=Path(tmp) / "log.txt")
        start_up(f"127.0.0.1:{ports.grpc}", repo, None)
        ready = time.perf_counter() - t0
        url = f"127.0.0.1:{ports.grpc}"
        try:
            def one(out: list) -> None:
                c = grpcclient.InferenceServerClient(url)
                inp = grpcclient.InferInput("TEXT", [1], "BYTES")
                inp.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
                t = time.perf_counter()
                text = c.infer("chat", [inp], parameters={"max_tokens": tokens}, client_timeout=600).as_numpy(OUTPUT)[0].decode()
                out.append((time.perf_counter() - t, len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])))
                c.close()

            one([])  # warm-up
            runs = []
            for rows in rows_list:
                out: list = []
                threads = [threading.Thread(target=one, args=(out,)) for _ in range(rows)]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                secs = time.perf_counter() - t
                made = sum(n for _, n in out)
                runs.append({"clients": rows, "seconds": round(secs, 2), "tokens_per_s": round(made / secs, 1),
                             "mean_latency_s": round(sum(x for x, _ in out) / len(out), 2)})
                print(f"server, {rows} concurrent clients: {runs[-1]['tokens_per_s']} tokens/s, mean latency {runs[-1]['mean_latency_s']} s")
            c = grpcclient.InferenceServerClient(url)
            got: queue.Queue = queue.Queue()
            c.start_stream(callback=lambda result, error: got.put((time.perf_counter(), result, error)))
            inp = grpcclient.InferInput("TEXT", [1], "BYTES")
            inp.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
            t = time.perf_counter()
            c.async_stream_infer("chat.stream", [inp], parameters={"max_tokens": tokens})
            first, pieces = None, 0
            while True:
                when, result, error = got.get(timeout=300)
                assert error is None, error
                pieces += 1
                first = first or when - t
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            whole = time.perf_counter() - t
            c.stop_stream()
            c.close()
            stubs = subprocess.run(["pgrep", "-f", "triton_python_backend_stub"], capture_output=True, text=True).stdout.split()
            pss = {pid: _pss_mib(int(pid)) for pid in stubs}
            mine = {pid: v for pid, v in pss.items() if "fm.smollm2" in open(f"/proc/{pid}/cmdline").read()}
        finally:
            proc.stop()
    print(f"server ready in {ready:.1f} s; stream: first piece {first * 1e3:.0f} ms, {pieces} responses in {whole:.2f} s; "
          f"host stubs PSS {sorted(round(v) for v in mine.values())} MiB")
    return {"ready_seconds": round(ready, 1), "infer": runs, "stream_first_piece_ms": round(first * 1e3), "stream_responses": pieces,
            "stream_seconds": round(whole, 2), "host_stub_pss_mib": sorted(round(v) for v in mine.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--server", action="store_true", help="also measure through a real tritonserver")
    args = ap.parse_args()
    set_threads(1)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    lm = load_smollm2()
    load = time.perf_counter() - t0
    rss1 = _rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in lm.model.parameters())
    print(f"load {load:.1f} s (tokenizer {lm.tokenizer_seconds:.1f} s), {params / 1e6:.1f}M params, RSS {rss0:.0f} -> {rss1:.0f} MiB (peak {peak:.0f})")
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        lm.model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        lm.model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        hf = args.tokens / (time.perf_counter() - t)
    print(f"transformers generate alone: {hf:.1f} tokens/s")
    engine = Engine(lm, max_rows=max(args.rows))
    _run(engine, 1, 4, [])  # warm-up
    plain = []
    for rows in args.rows:
        res = _run(engine, rows, args.tokens, [])
        plain.append(res)
        print(f"engine, {rows} concurrent sequences: {res['tokens_per_s']} tokens/s")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [None, *_adapters(lm, Path(tmp))]
    mixed = []
    for rows in args.rows:
        res = _run(engine, rows, args.tokens, adapters)
        mixed.append(res)
        print(f"engine, {rows} sequences (base, LoRA r4, LoRA r16 mixed): {res['tokens_per_s']} tokens/s")
    base1 = plain[0]["tokens_per_s"]
    server = _server(lm, args.tokens, args.rows) if args.server else None
    write_results("generate_bench.json", {
        "server": server,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread, fp32",
        "load_seconds": round(load, 2),
        "tokenizer_seconds": round(lm.tokenizer_seconds, 2),
        "parameters": params,
        "rss_mib_before_after_peak": [round(rss0), round(rss1), round(peak)],
        "hf_generate_tokens_per_s": round(hf, 1),
        "engine": plain,
        "engine_lora_mixed": mixed,
        "speedup_vs_1_row": {r["rows"]: round(r["tokens_per_s"] / base1, 2) for r in plain},
    })


if __name__ == "__main__":
    main()
