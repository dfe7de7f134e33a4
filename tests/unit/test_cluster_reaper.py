"""The replica reaper: a server's process group (server + its children) goes when the owner or the server goes.

Real processes stand in for the replica (owner), its tritonserver (group
leader, own session) and a stub (the leader's child): no Ray, no Triton.
Ray's way of ending a worker is imitated: SIGKILL the worker's direct children
and the worker; the stub must not survive it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from fmplex.cluster import reaper

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")

# The owner starts a "server" in its own session whose child ("stub") sleeps, spawns the reaper, prints the pids.
OWNER = """
import subprocess, sys, time
from fmplex.cluster import reaper
server = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True)
stub = int(server.stdout.readline())
reaper.spawn(server.pid, label=sys.argv[1])
print(server.pid, stub, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    return reaper.start_time(pid) is not None


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _reapers(label: str) -> list[int]:
    """Running reaper processes carrying ``label``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
            except OSError:
                continue
            if reaper.__file__.encode() in args and label.encode() in args and _alive(int(entry)):
                out.append(int(entry))
    return out


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _no_reaper_left(label: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _reapers(label):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def family() -> tuple[subprocess.Popen[str], int, int, str]:
    label = f"reaper-test-{uuid.uuid4().hex}"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, label], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    server, stub = (int(x) for x in owner.stdout.readline().split())
    yield owner, server, stub, label
    for pid in (stub, server):
        try:
            os.killpg(server, signal.SIGKILL) if pid == server else os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    owner.kill()
    owner.wait()


def test_the_reaper_is_detached_from_its_owner(family: tuple[subprocess.Popen[str], int, int, str]) -> None:
    owner, _server, _stub, label = family
    (pid,) = _reapers(label)
    assert pid not in _children_of(owner.pid)  # not a direct child: Ray's sweep of a dead worker's children misses it


def test_owner_killed_the_way_ray_does_leaves_no_stub(family: tuple[subprocess.Popen[str], int, int, str]) -> None:
    owner, server, stub, label = family
    children = _children_of(owner.pid)
    assert server in children
    for pid in children:  # Ray SIGKILLs the worker's direct children ...
        os.kill(pid, signal.SIGKILL)
    owner.kill()  # ... and the worker goes
    owner.wait()
    assert _wait_gone(stub), "the stub outlived its server and its owner"
    assert _no_reaper_left(label)


def test_owner_crash_takes_a_running_server_with_it(family: tuple[subprocess.Popen[str], int, int, str]) -> None:
    owner, server, stub, label = family
    owner.kill()  # the worker dies alone (its node lost): the server and its stub still run
    owner.wait()
    assert _wait_gone(server) and _wait_gone(stub)
    assert _no_reaper_left(label)


def test_a_dead_server_takes_its_stub_while_the_owner_lives(family: tuple[subprocess.Popen[str], int, int, str]) -> None:
    owner, server, stub, _label = family
    os.kill(server, signal.SIGKILL)  # left a zombie: the owner has not reaped it
    assert _wait_gone(stub)
    assert owner.poll() is None


def test_a_stopped_group_lets_the_reaper_exit_and_leaves_the_owner_alone(family: tuple[subprocess.Popen[str], int, int, str]) -> None:
    owner, server, _stub, label = family
    assert len(_reapers(label)) == 1
    os.killpg(server, signal.SIGKILL)  # the owner stopped its server (TritonProcess.stop)
    assert _no_reaper_left(label), "the reaper stayed after its group was gone"
    assert owner.poll() is None
