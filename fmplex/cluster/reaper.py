"""Stops a replica's tritonserver process group once the replica or its tritonserver is gone.

A replica's tritonserver runs in its own session (process group = its pid), and
its Python stubs run in that group as the replica's grandchildren, each holding
a backbone. When a Ray worker exits (a replica killed, its node lost), Ray
SIGKILLs the worker's *direct* children only: the tritonserver goes, and its
stubs stay, parentless, forever. A reaper that were a direct child of the
replica would be killed in the same sweep, so it detaches (double fork) and
watches the replica and the tritonserver by pid and start time (a reused pid
is not mistaken for them). Once either is gone, it SIGKILLs what is left of
the group; once the group is empty, it exits.

Standard library only: it runs as a script (``python reaper.py ...``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat``), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat; fields[0] is field 3 (state)


def is_running(pid: int, started: int) -> bool:
    return start_time(pid) == started


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch(owner: int, owner_started: int, pgid: int, leader_started: int, poll_s: float = POLL_S) -> None:
    """Block until the owner or the group's leader is gone, then kill the group."""
    while is_running(owner, owner_started) and is_running(pgid, leader_started):
        if not group_alive(pgid):
            return
        time.sleep(poll_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(server_pid: int, label: str = "") -> None:
    """Start a detached reaper for ``server_pid``'s process group, owned by this process.

    ``label`` (e.g. the repository) only goes on the reaper's command line, so
    that it can be told apart in a process listing.
    """
    owner_started = start_time(os.getpid())
    leader_started = start_time(server_pid)
    if owner_started is None or leader_started is None:  # not on Linux /proc, or the server is gone already
        return
    args = [sys.executable, __file__, str(os.getpid()), str(owner_started), str(server_pid), str(leader_started), label]
    # The first process forks the watcher and exits at once; waiting for it leaves no zombie.
    subprocess.run(args, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=30)


def main(argv: list[str]) -> int:
    owner, owner_started, pgid, leader_started = (int(a) for a in argv[:4])
    if os.fork() > 0:
        return 0
    watch(owner, owner_started, pgid, leader_started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
