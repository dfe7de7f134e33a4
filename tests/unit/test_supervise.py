"""The supervisor of ``fmplex serve``: a dead server is started again, a crash loop is not."""

from __future__ import annotations

from fmplex.control.supervise import Supervisor


class FakeChild:
    def __init__(self, dies_after: int | None, code: int = -8) -> None:
        self.polls, self.dies_after, self.code = 0, dies_after, code

    def poll(self) -> int | None:
        self.polls += 1
        return self.code if self.dies_after is not None and self.polls > self.dies_after else None


class FakeServer:
    def __init__(self, dies_after: int | None) -> None:
        self.proc = FakeChild(dies_after)
        self.stopped = 0

    def stop(self) -> int | None:
        self.stopped += 1
        return self.proc.code


def run(launches: list[FakeServer | Exception], first: FakeServer, loops: int, **kw: object) -> tuple[Supervisor, list[str]]:
    said: list[str] = []
    pending = list(launches)
    ticks = {"n": 0}

    def launch() -> FakeServer:
        item = pending.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def should_stop() -> bool:
        ticks["n"] += 1
        return ticks["n"] > loops

    sup = Supervisor(launch, should_stop, first=first, echo=said.append, sleep=lambda _s: None, **kw)  # type: ignore[arg-type]
    sup.run()
    return sup, said


def test_a_dead_server_is_stopped_and_started_again() -> None:
    first, second = FakeServer(dies_after=2), FakeServer(dies_after=None)
    sup, said = run([second], first, loops=10)
    assert first.stopped == 1 and sup.current is second and sup.restarts == 1
    assert any("exit code -8" in s for s in said) and any("back after" in s for s in said)


def test_a_running_server_is_left_alone() -> None:
    first = FakeServer(dies_after=None)
    sup, said = run([], first, loops=20)
    assert sup.current is first and sup.restarts == 0 and first.stopped == 0 and said == []


def test_a_failed_restart_is_retried() -> None:
    first, third = FakeServer(dies_after=0), FakeServer(dies_after=None)
    sup, said = run([RuntimeError("port busy"), third], first, loops=10)
    assert sup.current is third and sup.restarts == 2
    assert any("port busy" in s for s in said)


def test_a_crash_loop_gives_up() -> None:
    servers = [FakeServer(dies_after=0) for _ in range(10)]
    sup, said = run(servers[1:], servers[0], loops=100, max_restarts=3, window_s=1e9, clock=lambda: 0.0)
    assert sup.current is None and sup.restarts == 3
    assert "giving up" in said[-1]
