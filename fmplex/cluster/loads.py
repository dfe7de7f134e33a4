"""Measured loads for live placement: what the ingress sees of each request, decayed over time.

Pure (no Ray, no Triton, no clock of its own: every call is given ``now``),
so the ingress feeds it and the unit tests drive it with made-up times.

What is measured, and why this and not the hosts' batch metrics: the ingress
sees every request start and end, so it knows, per replica, the time during
which at least one request was in flight there (its *busy* time) and how many
requests it finished; per task, how many requests it sent where. Nothing
needs scraping and nothing depends on a family's host exporting metrics.

- a task's **rate**: requests per second, exponentially decayed with time
  constant ``tau_s`` (a steady rate ``r`` reads ``r`` after a few ``tau_s``;
  a task that stops fades to ``1/e`` of its rate in ``tau_s``);
- a replica's **cost per request**: its decayed busy seconds over its decayed
  request count, i.e. the seconds of replica time one request takes there;
- a task's **load on a replica**: its rate there times that cost, the share
  of the replica's time it takes (the shares of a replica's tasks add up to
  its busy fraction, at most 1).

Limits, stated: a busy replica batches, so "busy" means "at least one request
in flight", not "compute saturated"; a replica's cost is averaged over its
tasks (one replica cannot tell a cheap task from an expensive one); a new
meter starts from zero, so early loads read low; one ingress replica sees
all traffic (with several, each would measure its own share).
"""

from __future__ import annotations

import dataclasses
import math

TAU_S = 10.0  # decay time constant of rates and busy time
LOAD_STEP = 0.1  # loads are rounded to this share of a replica before placement compares them


@dataclasses.dataclass
class _Decayed:
    """A sum that decays by ``exp(-dt / tau)``; ``value`` is as of ``at``."""

    value: float = 0.0
    at: float = 0.0

    def advance(self, now: float, tau: float) -> None:
        if now > self.at:
            self.value *= math.exp(-(now - self.at) / tau)
            self.at = now


@dataclasses.dataclass
class _Replica:
    inflight: int = 0
    busy: _Decayed = dataclasses.field(default_factory=_Decayed)  # decayed busy seconds
    count: _Decayed = dataclasses.field(default_factory=_Decayed)  # decayed finished requests


class LoadMeter:
    """Per task and replica: decayed request counts and replica busy time (see the module doc)."""

    def __init__(self, tau_s: float = TAU_S) -> None:
        if tau_s <= 0:
            raise ValueError(f"tau_s must be positive, got {tau_s}")
        self.tau = tau_s
        self._replicas: dict[str, _Replica] = {}
        self._pairs: dict[tuple[str, str], _Decayed] = {}  # (task, replica) -> decayed finished requests

    def _busy_until(self, rep: _Replica, now: float) -> None:
        """Bring a replica's busy time up to ``now`` (busy throughout if anything is in flight)."""
        dt = now - rep.busy.at
        rep.busy.advance(now, self.tau)
        if dt > 0 and rep.inflight > 0:
            rep.busy.value += self.tau * (1.0 - math.exp(-dt / self.tau))  # integral of decayed 1 over dt

    def started(self, task: str, replica: str, now: float) -> None:
        rep = self._replicas.setdefault(replica, _Replica(busy=_Decayed(at=now), count=_Decayed(at=now)))
        self._busy_until(rep, now)
        rep.inflight += 1

    def finished(self, task: str, replica: str, now: float) -> None:
        """One request on ``replica`` for ``task`` ended (answered or failed): it counts once, here."""
        rep = self._replicas.get(replica)
        if rep is None:
            return
        self._busy_until(rep, now)
        rep.inflight = max(0, rep.inflight - 1)
        rep.count.advance(now, self.tau)
        rep.count.value += 1.0
        pair = self._pairs.setdefault((task, replica), _Decayed(at=now))
        pair.advance(now, self.tau)
        pair.value += 1.0

    def replicas(self) -> list[str]:
        """The replicas this meter has seen a request on."""
        return sorted(self._replicas)

    def forget(self, replica: str) -> None:
        """A replica left the table: its history says nothing about the others."""
        self._replicas.pop(replica, None)
        for key in [k for k in self._pairs if k[1] == replica]:
            del self._pairs[key]

    def rates(self, now: float) -> dict[str, float]:
        """Requests per second per task (all replicas together)."""
        out: dict[str, float] = {}
        for (task, _), pair in self._pairs.items():
            pair.advance(now, self.tau)
            out[task] = out.get(task, 0.0) + pair.value / self.tau
        return out

    def costs(self, now: float) -> dict[str, float]:
        """Seconds of replica time per request, per replica that finished any request."""
        out = {}
        for rid, rep in self._replicas.items():
            self._busy_until(rep, now)
            rep.count.advance(now, self.tau)
            if rep.count.value > 1e-9:
                out[rid] = rep.busy.value / rep.count.value
        return out

    def shares(self, now: float) -> dict[str, dict[str, float]]:
        """Per replica, per task: the task's rate there times the replica's cost per request
        (a share of that replica's time), rounded to ``LOAD_STEP``; zeros are left out."""
        costs = self.costs(now)
        out: dict[str, dict[str, float]] = {}
        for (task, rid), pair in sorted(self._pairs.items()):
            if rid not in costs:
                continue
            pair.advance(now, self.tau)
            share = quantize(pair.value / self.tau * costs[rid])
            if share > 0:
                out.setdefault(rid, {})[task] = share
        return out


def quantize(load: float) -> float:
    """``load`` to the nearest ``LOAD_STEP``: smaller differences are measurement noise, so two
    replicas whose loads differ by less compare equal (and placement falls back to task counts)."""
    return round(round(load / LOAD_STEP) * LOAD_STEP, 6)


def task_totals(shares: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each task's load over all the replicas holding it."""
    out: dict[str, float] = {}
    for per_task in shares.values():
        for task, share in per_task.items():
            out[task] = round(out.get(task, 0.0) + share, 6)
    return out
