"""The API key that locks a server's control APIs, without a server.

The restricted-API flags on Triton's command line, the key file ``fmplex
serve`` writes (owner-only) and the control plane reads back, and the headers
``Triton`` sends with the repository calls.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from fmplex.control import triton_api
from fmplex.control.server import (
    API_KEY_HEADER,
    GRPC_API_KEY_HEADER,
    KEY_FILE,
    Ports,
    ServerError,
    TritonInstall,
    generate_key,
    read_key_file,
    server_command,
    write_key_file,
)

FMPLEX = str(Path(sys.executable).parent / "fmplex")
FAKE = TritonInstall(Path("/opt/x/bin/tritonserver"), Path("/opt/x/python"), Path("/opt/x/stub"), (), "system")
GROUPS = "model-repository,shared-memory,trace,logging"


def command(**kw: object) -> list[str]:
    return server_command(FAKE, Path("/repo"), Path("/backends"), Ports(1, 2, 3), load=["fm.minilm"], **kw)  # type: ignore[arg-type]


def test_command_is_locked_only_with_a_key() -> None:
    locked = command(api_key="s3cret")
    assert f"--http-restricted-api={GROUPS}:fmplex-key=s3cret" in locked
    assert f"--grpc-restricted-protocol={GROUPS}:fmplex-key=s3cret" in locked
    assert API_KEY_HEADER == "fmplex-key" and GRPC_API_KEY_HEADER == "triton-grpc-protocol-fmplex-key"
    open_ = command()
    assert not [a for a in open_ if "restricted" in a], open_
    assert [a for a in locked if "restricted" not in a] == open_  # nothing else changes
    # inference, health, metadata, model-config and statistics stay open
    for group in ("inference", "health", "metadata", "statistics", "model-config"):
        assert group not in GROUPS.split(",")


@pytest.mark.parametrize("bad", ["", "a b", "a,b", "a:b", "a=b", "tab\there", "ключ"])
def test_malformed_keys_are_refused(bad: str) -> None:
    with pytest.raises(ServerError, match="API key"):
        command(api_key=bad)


def test_generated_keys_are_random_and_fit_the_flag_syntax() -> None:
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(key) >= 40
        command(api_key=key)  # no ServerError


def test_key_file_is_owner_only_and_read_back(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a wide-open umask
    try:
        path = write_key_file(tmp_path, "first-key")
    finally:
        os.umask(old)
    assert path == tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(tmp_path) == "first-key"

    path.chmod(0o644)  # a loosened old file is replaced, not reused
    write_key_file(tmp_path, "second-key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(tmp_path) == "second-key"


def test_key_file_never_follows_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / KEY_FILE).symlink_to(target)
    write_key_file(repo, "k")
    assert target.read_text() == "untouched"
    assert not (repo / KEY_FILE).is_symlink() and read_key_file(repo) == "k"


def test_no_key_file_means_no_key(tmp_path: Path) -> None:
    assert read_key_file(tmp_path) is None
    (tmp_path / KEY_FILE).write_text("\n")
    assert read_key_file(tmp_path) is None


class FakeClient:
    """Records the calls ``Triton`` makes; refuses them like a locked server if asked."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []
        self.refuse = refuse

    def _call(self, name: str, **kw: object) -> object:
        self.calls.append((name, kw))
        if self.refuse:
            raise InferenceServerException(
                "This protocol is restricted, expecting header 'triton-grpc-protocol-fmplex-key'", status="StatusCode.UNAVAILABLE"
            )
        return {"models": [{"name": "x", "state": "READY"}]}

    def load_model(self, name: str, **kw: object) -> object:
        return self._call("load", **kw)

    def unload_model(self, name: str, **kw: object) -> object:
        return self._call("unload", **kw)

    def get_model_repository_index(self, **kw: object) -> object:
        return self._call("index", **kw)

    def is_model_ready(self, name: str, **kw: object) -> bool:
        return not any(c == "unload" for c, _ in self.calls)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("key", ["abc", None])
def test_triton_sends_the_key_with_repository_calls(key: str | None) -> None:
    t = triton_api.Triton("127.0.0.1:1", timeout=5, key=key)
    t.client.close()
    t.client = fake = FakeClient()  # type: ignore[assignment]
    t.load("x")
    t.unload("x")
    assert t.index() == {"x": {"state": "READY", "version": "", "reason": ""}}
    want = {GRPC_API_KEY_HEADER: key} if key else None
    assert [(c, kw["headers"]) for c, kw in fake.calls] == [("load", want), ("unload", want), ("index", want)]


def test_a_refusal_is_one_clear_message() -> None:
    t = triton_api.Triton("127.0.0.1:1", timeout=5, key="wrong")
    t.client.close()
    t.client = FakeClient(refuse=True)  # type: ignore[assignment]
    for call in (lambda: t.load("x"), lambda: t.unload("x"), t.index):
        with pytest.raises(triton_api.KeyRefused) as info:
            call()
        assert str(info.value) == (
            "the server refused the repository API: wrong or missing key (fmplex-key); "
            "pass --api-key or run on the repository whose fmplex.key the server wrote"
        )


def test_control_commands_read_the_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fmplex.control import cli

    seen: list[str | None] = []

    class Recorder:
        def __init__(self, url: str, key: str | None = None) -> None:
            seen.append(key)

        def require_live(self) -> None:
            pass

        def check_key(self) -> None:
            pass

    monkeypatch.setattr(triton_api, "Triton", Recorder)
    cli._connect("x:1", tmp_path)
    write_key_file(tmp_path, "from-file")
    cli._connect("x:1", tmp_path)
    cli._connect("x:1", tmp_path, "given")  # --api-key / FMPLEX_API_KEY wins
    assert seen == [None, "from-file", "given"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=120)


def test_serve_refuses_bad_key_options_before_starting(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run("init", str(repo)).returncode == 0
    out = run("serve", "--repo", str(repo), "--api-key", "k", "--no-lock")
    assert out.returncode == 2 and "contradict" in out.stderr
    out = run("serve", "--repo", str(repo), "--api-key", "a,b")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "API key must be" in out.stderr
    assert not (repo / KEY_FILE).exists()
    help_ = run("serve", "--help").stdout
    assert "--api-key" in help_ and "--no-lock" in help_
    for cmd in (["deploy"], ["undeploy"], ["status"], ["task", "delete"]):
        assert "--api-key" in run(*cmd, "--help").stdout, cmd
