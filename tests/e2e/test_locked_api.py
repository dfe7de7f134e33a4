"""A server started by ``fmplex serve`` locks its control APIs behind a key.

Runs the real ``fmplex serve`` (own copy of the embedded repository, free
ports, stopped at the end): it generates a key and writes REPO/fmplex.key.
A client without the key cannot load, unload or list models, nor change log
or trace settings, over HTTP or gRPC, and the vFM stays loaded and serving;
the control plane (CLI reading the key file, or tritonclient with the header)
can. Inference, health, metadata, model configs and statistics stay open.

Also: names and pickle-only sources that ``task create`` must refuse.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fmplex.control.server import GRPC_API_KEY_HEADER, KEY_FILE, free_ports

from .conftest import EMBEDDED, FMPLEX, text_input

REFUSED = (
    "the server refused the repository API: wrong or missing key (fmplex-key); "
    "pass --api-key or run on the repository whose fmplex.key the server wrote"
)
HTTP_REFUSED = {"error": "This API is restricted, expecting header 'fmplex-key'"}
GRPC_REFUSED = "This protocol is restricted, expecting header 'triton-grpc-protocol-fmplex-key'"


class Locked:
    def __init__(self, repo: Path, http_port: int, grpc_port: int, metrics_port: int) -> None:
        self.repo, self.http_port, self.grpc_port, self.metrics_port = repo, http_port, grpc_port, metrics_port

    @property
    def key(self) -> str:
        return (self.repo / KEY_FILE).read_text().strip()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [FMPLEX, *args, "--repo", str(self.repo), "--url", self.grpc_url]
        full = {k: v for k, v in os.environ.items() if k != "FMPLEX_API_KEY"}
        full.update(env or {})
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=full)

    def http(self, method: str, path: str, body: dict[str, object] | None = None, key: str | None = None) -> tuple[int, object]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["fmplex-key"] = key
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    work = tmp_path_factory.mktemp("locked")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)
    (repo / KEY_FILE).unlink(missing_ok=True)
    ports = free_ports()
    out_path = work / "serve.out"
    env = {k: v for k, v in os.environ.items() if k != "FMPLEX_API_KEY"}
    cmd = [
        FMPLEX, "serve", "--repo", str(repo), "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
        "--metrics-port", str(ports.metrics), "--log", str(work / "tritonserver.log"),
    ]
    with open(out_path, "wb") as out:
        serve = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "serving; Ctrl-C to stop" not in out_path.read_text(errors="replace"):
            assert serve.poll() is None, f"fmplex serve exited {serve.returncode}: {out_path.read_text()}"
            assert time.monotonic() < deadline, f"fmplex serve not up in 300 s: {out_path.read_text()}"
            time.sleep(0.2)
        text = out_path.read_text()
        assert f"key written to {repo / KEY_FILE}" in text and "failed to load" not in text, text
        yield Locked(repo, ports.http, ports.grpc, ports.metrics)
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)  # serve stops tritonserver cleanly
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()


def infer_ok(locked: Locked, task: str = "sentiment") -> None:
    """The vFM is loaded and answers (without any key)."""
    client = grpcclient.InferenceServerClient(locked.grpc_url)
    try:
        assert client.is_model_ready(task)
        r = client.infer(task, [text_input(grpcclient, ["a wonderful, moving film"])], client_timeout=60)
        assert r.as_numpy("LABEL") is not None and len(r.as_numpy("LABEL")) == 1
    finally:
        client.close()


def test_serve_writes_an_owner_only_key_file(locked: Locked) -> None:
    path = locked.repo / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(locked.key) >= 40
    # the key file is no model: Triton's index does not list it
    status, index = locked.http("POST", "/v2/repository/index", key=locked.key)
    assert status == 200 and KEY_FILE not in {m["name"] for m in index}  # type: ignore[union-attr]


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_http_without_the_key_cannot_touch_the_repository(locked: Locked, key: str | None) -> None:
    for path, body in [
        ("/v2/repository/index", None),
        ("/v2/repository/models/sentiment/unload", None),
        ("/v2/repository/models/sentiment/load", None),
        ("/v2/repository/models/sentiment/load", {"parameters": {"config": json.dumps({"max_batch_size": 1})}}),
        ("/v2/repository/models/fm.minilm/unload", None),
        ("/v2/logging", {"log_verbose_level": 1}),
        ("/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
    ]:
        status, answer = locked.http("POST", path, body, key=key)
        assert (status, answer) == (403, HTTP_REFUSED), path
    infer_ok(locked)
    status, _ = locked.http("POST", "/v2/repository/index", key=locked.key)
    assert status == 200


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_grpc_without_the_key_cannot_touch_the_repository(locked: Locked, key: str | None) -> None:
    client = grpcclient.InferenceServerClient(locked.grpc_url)
    headers = {GRPC_API_KEY_HEADER: key} if key else None
    calls = {
        "index": lambda: client.get_model_repository_index(headers=headers),
        "unload": lambda: client.unload_model("sentiment", headers=headers),
        "unload host": lambda: client.unload_model("fm.minilm", headers=headers),
        "load": lambda: client.load_model("sentiment", headers=headers),
        "load new config": lambda: client.load_model("sentiment", headers=headers, config=json.dumps({"max_batch_size": 1})),
        "log settings": lambda: client.update_log_settings({"log_verbose_level": 1}, headers=headers),
        "trace settings": lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, headers=headers),
    }
    try:
        for what, call in calls.items():
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNAVAILABLE", what
            assert info.value.message() == GRPC_REFUSED, what
    finally:
        client.close()
    infer_ok(locked)


def test_inference_health_metadata_and_statistics_need_no_key(locked: Locked) -> None:
    g = grpcclient.InferenceServerClient(locked.grpc_url)
    h = httpclient.InferenceServerClient(locked.http_url)
    try:
        for c in (g, h):
            assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("embed")
            assert c.get_server_metadata()
            assert c.get_model_metadata("sentiment")
            assert c.get_model_config("sentiment")
            assert c.get_inference_statistics("sentiment")
        r = h.infer("embed", [text_input(httpclient, ["open to all"])])
        vec = r.as_numpy("EMBEDDING")
        assert vec.shape == (1, 384) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
        assert g.infer("topic", [text_input(grpcclient, ["the match ended 2-1"])], client_timeout=60).as_numpy("LABEL") is not None
    finally:
        g.close()
        h.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{locked.metrics_port}/metrics", timeout=5) as resp:
        assert b"fmplex_" in resp.read()


def test_cli_with_a_wrong_key_is_refused_in_one_line(locked: Locked) -> None:
    for args, env in [
        (("undeploy", "intent", "--api-key", "wrong-key"), None),
        (("undeploy", "intent"), {"FMPLEX_API_KEY": "wrong-key"}),
        (("deploy", "intent", "--api-key", "wrong-key"), None),
        (("status", "--api-key", "wrong-key"), None),
        (("task", "delete", "intent", "--force", "--api-key", "wrong-key"), None),
    ]:
        out = locked.cli(*args, env=env)
        assert out.returncode == 1, args
        assert "Traceback" not in out.stderr
        assert out.stderr.strip() == f"Error: {REFUSED}", (args, out.stderr)
    key_file = locked.repo / KEY_FILE
    hidden = key_file.with_name("key.aside")
    key_file.rename(hidden)  # no key at all: no file, no option, no env
    try:
        for args in (("status",), ("undeploy", "intent")):
            out = locked.cli(*args)
            assert out.returncode == 1 and out.stderr.strip() == f"Error: {REFUSED}", (args, out.stderr)
    finally:
        hidden.rename(key_file)
    infer_ok(locked, "intent")
    reg = json.loads((locked.repo / "fmplex.registry.json").read_text())
    assert reg["tasks"]["intent"]["slot"] is not None, "a refused undeploy must leave the registry as it was"
    assert (locked.repo / "intent" / "config.pbtxt").exists()


def test_cli_reads_the_key_file_and_controls_the_server(locked: Locked) -> None:
    out = locked.cli("undeploy", "intent")
    assert out.returncode == 0 and "undeployed intent" in out.stdout, out.stderr
    client = grpcclient.InferenceServerClient(locked.grpc_url)
    try:
        assert not client.is_model_ready("intent")
        out = locked.cli("deploy", "intent")
        assert out.returncode == 0 and "deployed intent v1" in out.stdout, out.stderr
        r = client.infer("intent", [text_input(grpcclient, ["hi, good morning"])], client_timeout=60)
        assert r.as_numpy("LABEL")[0] == b"greeting"
        out = locked.cli("status", "--metrics-url", f"http://127.0.0.1:{locked.metrics_port}/metrics")
        assert out.returncode == 0, out.stderr
        rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines() if ln.strip()}
        assert rows["host"][2].startswith("READY") and rows["intent"][2] == "READY", out.stdout
        # the same key by hand: tritonclient with the header
        key = {GRPC_API_KEY_HEADER: locked.key}
        client.unload_model("intent", headers=key)
        assert not client.is_model_ready("intent")
        client.load_model("intent", headers=key)
        assert client.is_model_ready("intent")
        names = {m["name"] for m in client.get_model_repository_index(headers=key, as_json=True)["models"]}
        assert {"fm.minilm", "intent", "sentiment"} <= names
    finally:
        client.close()
    status, _ = locked.http("POST", "/v2/repository/models/intent/unload", key=locked.key)
    assert status == 200
    status, _ = locked.http("POST", "/v2/repository/models/intent/load", key=locked.key)
    assert status == 200
    infer_ok(locked, "intent")


# --- what task create refuses (no server) ---------------------------------------


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("names") / "sub" / "repo"
    out = subprocess.run([FMPLEX, "init", str(repo)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return repo


def one_line_error(out: subprocess.CompletedProcess[str], words: str) -> None:
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], out.stderr


@pytest.mark.parametrize("name", ["../evil", "a/b", ".x", "x y"])
def test_task_create_refuses_unsafe_names(plain_repo: Path, name: str) -> None:
    before = sorted(p.name for p in plain_repo.parent.iterdir()), sorted(p.name for p in plain_repo.iterdir())
    out = subprocess.run(
        [FMPLEX, "task", "create", name, "--kind", "embedding", "--repo", str(plain_repo)], capture_output=True, text=True, timeout=180
    )
    one_line_error(out, "invalid task name")
    assert (sorted(p.name for p in plain_repo.parent.iterdir()), sorted(p.name for p in plain_repo.iterdir())) == before


class _Payload:
    """Unpickling this runs a command: proof that a source was never unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind, peft_type", [("lora", "LORA"), ("prompt", "PROMPT_TUNING"), ("fork", None)])
def test_pickle_only_sources_are_refused(plain_repo: Path, tmp_path: Path, kind: str, peft_type: str | None) -> None:
    source = tmp_path / "src"
    source.mkdir()
    marker = tmp_path / "UNPICKLED"
    if peft_type:
        cfg = {"peft_type": peft_type, "r": 4, "lora_alpha": 8, "target_modules": ["query"], "num_virtual_tokens": 4, "token_dim": 384}
        (source / "adapter_config.json").write_text(json.dumps(cfg))
    else:
        from fmplex.backbones import get_backbone

        cfg = json.loads((get_backbone("minilm").locate() / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    (source / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (source / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    out = subprocess.run(
        [FMPLEX, "task", "create", f"evil_{kind}", "--kind", kind, "--source", str(source), "--repo", str(plain_repo)],
        capture_output=True, text=True, timeout=180,
    )
    one_line_error(out, "safetensors" if peft_type else "never loads pickle")
    assert "pickle" in out.stderr
    assert not marker.exists(), "a pickle was loaded"
    assert not (plain_repo / f"evil_{kind}").exists()
