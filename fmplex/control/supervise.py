"""Keeping tritonserver up under ``fmplex serve``: start it again when it dies.

The host watchdog (watchdog.py) brings back a host whose Python stub died,
inside a live server. Some requests kill tritonserver itself instead
(measured with Triton 2.51: ``classification`` on a BYTES output dies of
SIGFPE; a JSON input whose shape asks for terabytes aborts on bad_alloc),
and every task of the server goes down with it. ``fmplex serve`` therefore
runs the server under this supervisor: when the process exits without being
asked to, it is started again the same way (hosts, then every deployed vFM,
with a fresh watchdog), on the same ports. A server that keeps dying right
after its start is not restarted for ever: past ``max_restarts`` within
``window_s`` the supervisor gives up and reports it.
"""

from __future__ import annotations

import time
from typing import Any, Callable


def exit_code(server: Any) -> int | None:
    """A TritonProcess's exit code; None while it runs (or before it started)."""
    child = getattr(server, "proc", None)
    return None if child is None else child.poll()


class Supervisor:
    """Runs ``launch()``'s server until ``should_stop()``, restarting it when it dies.

    ``current`` is the server running now (None once the supervisor gave
    up); the caller stops it. ``restarts`` counts the restarts made.
    """

    def __init__(
        self,
        launch: Callable[[], Any],
        should_stop: Callable[[], bool],
        *,
        first: Any,
        echo: Callable[[str], None] = lambda _m: None,
        poll_s: float = 0.2,
        max_restarts: int = 5,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.launch, self.should_stop, self.echo = launch, should_stop, echo
        self.poll_s, self.max_restarts, self.window_s = poll_s, max_restarts, window_s
        self.clock, self.sleep = clock, sleep
        self.current: Any = first
        self.restarts = 0
        self._recent: list[float] = []

    def run(self) -> None:
        while not self.should_stop() and self.current is not None:
            code = exit_code(self.current)
            if code is None:
                self.sleep(self.poll_s)
                continue
            self.current.stop()  # its backend directory and watchdog
            self.current = None
            now = self.clock()
            self._recent = [t for t in self._recent if now - t < self.window_s]
            if len(self._recent) >= self.max_restarts:
                self.echo(f"tritonserver died {len(self._recent) + 1} times within {self.window_s:.0f}s (exit code {code}); giving up")
                return
            self._recent.append(now)
            self.restarts += 1
            self.echo(f"tritonserver exited unexpectedly (exit code {code}); restarting it")
            t0 = self.clock()
            try:
                self.current = self.launch()
            except Exception as exc:  # noqa: BLE001 - a failed restart counts as one more death
                self.echo(f"restarting tritonserver failed: {exc}")
                self.current = _Dead(code)
                continue
            self.echo(f"tritonserver is back after {self.clock() - t0:.1f}s (restart {self.restarts})")


class _Dead:
    """Stands for a server whose restart failed: it reads as exited, so the loop tries again."""

    class _Exited:
        def __init__(self, code: int) -> None:
            self.code = code

        def poll(self) -> int:
            return self.code

    def __init__(self, code: int) -> None:
        self.proc = self._Exited(code)

    def stop(self) -> int:
        return self.proc.code
