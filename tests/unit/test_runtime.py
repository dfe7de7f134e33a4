"""The host runtime's pure parts: response ledger, slot routing, typed settings (no Triton)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from fmplex.runtime.ledger import DUPLICATE, SEND_FAILED, Answer, ResponseLedger
from fmplex.runtime.routing import SlotRouter
from fmplex.runtime.settings import HostSettings, SchedulerSettings, read_settings
from fmplex.runtime.validation import RequestError

FINAL = 1


class Sender:
    """Records (response, flags); optionally blocks every send until released."""

    def __init__(self, log: list | None = None, block: threading.Event | None = None, fail: bool = False) -> None:
        self.log = log if log is not None else []
        self.block, self.fail = block, fail

    def send(self, response: object, flags: int = 0) -> None:
        if self.block is not None:
            assert self.block.wait(10)
        if self.fail:
            raise RuntimeError("client went away")
        self.log.append((response, flags))


def test_one_final_response_and_a_second_one_is_suppressed_and_counted() -> None:
    ledger = ResponseLedger(FINAL)
    sender = Sender()
    a = Answer(sender, "t")
    assert ledger.final(a, "answer", "ok") is True
    assert ledger.final(a, "late error", "internal") is False
    assert ledger.partial(a, "piece") is False
    assert ledger.close()
    assert sender.log == [("answer", FINAL)]
    assert ledger.counts() == {("t", "ok"): 1, ("t", DUPLICATE): 2}


def test_a_worker_does_not_wait_for_the_send() -> None:
    release = threading.Event()
    log: list = []
    ledger = ResponseLedger(FINAL)
    answers = [Answer(Sender(log, block=release), "t") for _ in range(5)]
    for i, a in enumerate(answers):  # every send blocks: final() must return anyway
        assert ledger.final(a, i, "ok")
    assert log == [] and ledger.counts() == {("t", "ok"): 5}
    time.sleep(0.05)
    release.set()
    assert ledger.close()
    assert [r for r, _ in log] == [0, 1, 2, 3, 4]  # in the order decided
    # each response's time from its decision to its send's return counts the 50 ms they were held
    assert ledger.sends == 5 and 5 * 0.05 <= ledger.send_seconds < 5 * 5.0


def test_stream_pieces_precede_the_final_response() -> None:
    ledger = ResponseLedger(FINAL)
    sender = Sender()
    a = Answer(sender, "t")
    for piece in ("a", "b", "c"):
        assert ledger.partial(a, piece)
    ledger.final(a, "end", "ok")
    ledger.close()
    assert sender.log == [("a", 0), ("b", 0), ("c", 0), ("end", FINAL)]


def test_close_flushes_the_queue_and_later_answers_go_inline() -> None:
    ledger = ResponseLedger(FINAL)
    log: list = []
    for i in range(100):
        ledger.final(Answer(Sender(log), "t"), i, "ok")
    assert ledger.close()
    assert len(log) == 100  # nothing left behind at shutdown
    ledger.final(Answer(Sender(log), "t"), "after", "shutdown")
    assert log[-1] == ("after", FINAL)


def test_a_failed_send_is_counted_and_reported() -> None:
    errors: list[str] = []
    ledger = ResponseLedger(FINAL, on_send_error=lambda task, exc: errors.append(f"{task}: {exc}"))
    ledger.final(Answer(Sender(fail=True), "t"), "x", "ok")
    ledger.close()
    assert ledger.counts() == {("t", "ok"): 1, ("t", SEND_FAILED): 1} and errors == ["t: client went away"]


def test_exactly_once_when_many_threads_race_to_answer() -> None:
    ledger = ResponseLedger(FINAL)
    log: list = []
    answers = [Answer(Sender(log), "t") for _ in range(200)]
    start = threading.Barrier(4)

    def racer(outcome: str) -> None:
        start.wait()
        for a in answers:
            ledger.final(a, outcome, outcome)

    threads = [threading.Thread(target=racer, args=(o,)) for o in ("ok", "expired", "shutdown", "internal")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    counts = ledger.counts()
    assert len(log) == 200 and counts[("t", DUPLICATE)] == 600
    assert sum(n for (_, o), n in counts.items() if o != DUPLICATE) == 200


# --- routing ------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    name: str
    version: int = 1
    deployed_version: int | None = 1


class Reg:
    def __init__(self, slots: dict[int, Entry]) -> None:
        self.slots = slots

    def slot_map(self, backbone: str) -> dict[int, Entry]:
        return self.slots if backbone == "bb" else {}


class View:
    def __init__(self, reg: Reg) -> None:
        self.reg, self.reads = reg, 0

    def current(self) -> Reg:
        self.reads += 1
        return self.reg


def _slot(name: str) -> int | None:
    prefix, _, rest = name.partition("_")
    return int(rest) if prefix in ("OUT", "TXT") and rest.isdigit() else None


def test_router_maps_slot_outputs_to_their_task() -> None:
    reg = Reg({3: Entry("sentiment")})
    router = SlotRouter(View(reg), "bb", "fm.bb", 8, _slot, "OUT_<slot>/TXT_<slot>")  # type: ignore[arg-type]
    route = router.route(["OUT_3", "TXT_3"], reg)  # type: ignore[arg-type]
    assert route.entry.name == "sentiment" and route.slot == 3 and route.wanted == {"OUT_3", "TXT_3"}


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "request slot outputs of one task"),
        (["OUT_1", "OUT_2"], "request slot outputs of one task"),
        (["LOGITS"], "request slot outputs of one task"),
        (["OUT_9"], "slot 9 is outside this host's 8 slots"),
        (["OUT_4"], "no task is deployed on slot 4 of fm.bb"),
    ],
)
def test_router_refuses_what_is_not_one_deployed_slot(names: list[str], message: str) -> None:
    reg = Reg({3: Entry("sentiment")})
    router = SlotRouter(View(reg), "bb", "fm.bb", 8, _slot, "OUT_<slot>/TXT_<slot>")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match=message):
        router.route(names, reg)  # type: ignore[arg-type]


def test_router_rereads_the_registry_at_once_on_an_unknown_slot() -> None:
    old, new = Reg({}), Reg({5: Entry("fresh")})
    view = View(new)
    router = SlotRouter(view, "bb", "fm.bb", 8, _slot, "TXT_<slot>", single_output=True)  # type: ignore[arg-type]
    assert router.route(["TXT_5"], old).entry.name == "fresh" and view.reads == 1  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="exactly one slot output"):
        router.route(["TXT_5", "OUT_5"], new)  # type: ignore[arg-type]


# --- settings -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoSettings(HostSettings):
    max_rows: int = 8
    grace_s: float = 5.0
    policy: str = "wfq"
    stream: bool = False


def _config(**params: str) -> dict:
    return {"parameters": {k: {"string_value": v} for k, v in params.items()}}


def test_settings_are_typed_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMPLEX_TORCH_THREADS", raising=False)
    st = read_settings(_config(max_rows="16", grace_s="0.5", stream="true", unrelated="x"), DemoSettings, repository="/r")
    assert (st.max_rows, st.grace_s, st.policy, st.stream, st.slots, st.repository) == (16, 0.5, "wfq", True, 256, "/r")
    assert read_settings(_config(repository=str(Path("/elsewhere"))), DemoSettings, repository="/r").repository == "/elsewhere"
    monkeypatch.setenv("FMPLEX_TORCH_THREADS", "2")
    assert read_settings(_config(torch_threads="1"), DemoSettings).torch_threads == 2


def test_a_bad_setting_names_its_parameter() -> None:
    with pytest.raises(ValueError, match="host parameter max_rows='many' is not a valid int"):
        read_settings(_config(max_rows="many"), DemoSettings)


def test_scheduler_settings_reach_the_batch_budget_under_their_own_units() -> None:
    st = read_settings(_config(policy="fifo", max_batch_rows="8", saturated_batch_rows="32", light_window_ms="250",
                               max_lag="12", max_queue_delay_us="1500", workers="3"), SchedulerSettings)
    budget = st.make_scheduler(parallel=3, max_tokens=999).budget
    assert (budget.max_rows, budget.saturated_rows, budget.max_tokens, budget.parallel) == (8, 32, 999, 3)
    assert budget.light_window_s == pytest.approx(0.25) and budget.max_queue_delay_s == pytest.approx(0.0015) and budget.max_lag == 12.0
    assert type(st.make_scheduler(1, 1)).__name__ == "FIFOScheduler"
    # Growth is off unless a host turns it on, and grows to saturated_batch_rows when it does.
    assert SchedulerSettings().make_scheduler(2, 100).budget.limits(rows_in_system=1000, light_waiting=False) == (16, 100)
    assert st.make_scheduler(1, 100).budget.limits(rows_in_system=1000, light_waiting=False) == (32, 400)
