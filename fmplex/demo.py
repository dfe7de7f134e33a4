"""``make demo``: the embedded repository, served for real, queried over HTTP and gRPC.

Starts tritonserver on ``model_repository/`` (copied to a scratch directory so
the checkout stays clean), sends requests to four vFMs that share one MiniLM
host, prints what they answer and what Triton counted, and stops the server.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from fmplex import registry
from fmplex.control import serving
from fmplex.control.server import free_ports
from fmplex.control.triton_api import Triton, scrape_metrics

DEFAULT_REPO = Path(__file__).resolve().parent.parent / "model_repository"


def _text_input(mod: object, texts: list[str]) -> object:
    inp = mod.InferInput("TEXT", [len(texts)], "BYTES")  # type: ignore[attr-defined]
    inp.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=object))
    return inp


def run(repo: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="fmplex-demo-"))
    shutil.copytree(repo, work / "repo")
    ports = free_ports()
    log = work / "tritonserver.log"
    print(f"== starting tritonserver on a copy of {repo} (http :{ports.http}, grpc :{ports.grpc}; log {log})")
    t0 = time.monotonic()
    proc = serving.start(work / "repo", ports, log_path=log, echo=print)
    print(f"== up in {time.monotonic() - t0:.1f}s ({proc.install.kind} server)\n")
    try:
        http = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
        reviews = ["The pasta was wonderful and the staff were so kind.", "Broke after two days, a total waste of money."]
        headlines = ["Striker scores twice as the home side wins the cup final", "Chipmaker unveils a faster processor for laptops"]
        utterances = ["hi there, good morning!", "can I reserve a table for four tonight?"]

        print("== HTTP  sentiment")
        r = http.infer("sentiment", [_text_input(httpclient, reviews)])
        for text, label, logits in zip(reviews, r.as_numpy("LABEL"), r.as_numpy("LOGITS")):
            print(f"   {label.decode():<9} {np.round(logits, 2)}  <- {text}")
        print("== gRPC  topic")
        r = grpc.infer("topic", [_text_input(grpcclient, headlines)])
        for text, label in zip(headlines, r.as_numpy("LABEL")):
            print(f"   {label.decode():<11} <- {text}")
        print("== gRPC  intent")
        r = grpc.infer("intent", [_text_input(grpcclient, utterances)])
        for text, label in zip(utterances, r.as_numpy("LABEL")):
            print(f"   {label.decode():<10} <- {text}")
        print("== HTTP  embed (cosine similarity of sentence embeddings)")
        pair = ["A man is playing the guitar.", "Someone strums a guitar on stage.", "The stock market fell sharply."]
        emb = http.infer("embed", [_text_input(httpclient, pair)]).as_numpy("EMBEDDING")
        print(f"   shape {emb.shape}; sim(0,1)={float(emb[0] @ emb[1]):.3f}  sim(0,2)={float(emb[0] @ emb[2]):.3f}")

        print("\n== what Triton counted per vFM, and the shared host's own metrics")
        reg = registry.load(work / "repo")
        with Triton(f"127.0.0.1:{ports.grpc}") as triton:
            for t in sorted(reg.tasks.values(), key=lambda t: t.name):
                st = triton.statistics(t.name)
                print(f"   {t.name:<10} slot {t.slot:<3} weight {t.weight:<4g} ok {st.get('success', 0):<3} avg {st.get('ms_request', 0):6.2f} ms")
            host = triton.statistics("fm.minilm")
            print(f"   fm.minilm  (host) requests {host.get('success', 0)} in {host.get('execution', 0)} execute() calls")
        sent_rows = len(reviews) + len(headlines) + len(utterances) + len(pair)
        deadline = time.monotonic() + 5  # the host publishes its counters every 0.25 s
        while True:
            metrics = scrape_metrics(f"http://127.0.0.1:{ports.metrics}/metrics")
            batches = sum(v for (n, _), v in metrics.items() if n == "fmplex_batch_batches_total")
            rows = sum(v for (n, _), v in metrics.items() if n == "fmplex_batch_rows_total")
            if rows >= sent_rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"   host batches {batches:.0f}, rows {rows:.0f}")
        http.close()
        grpc.close()
    finally:
        print("\n== stopping tritonserver")
        code = proc.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"== stopped (exit code {code})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="repository to serve (default: the embedded one)")
    args = ap.parse_args(argv)
    return run(args.repo)


if __name__ == "__main__":
    sys.exit(main())
