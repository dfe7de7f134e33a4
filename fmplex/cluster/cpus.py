"""Where the simulation's servers run their work: a processor each, or CPUs they share.

The simulation (:mod:`fmplex.cluster.simulate`) hands a model a *job* (a
replica's batch, or a request's pass through a stage of its path) and learns
when it is done. Three models, behind one small interface:

- :class:`Dedicated`: every server owns a processor (the cluster-scale
  figure: a GPU per replica).
- :class:`Sharing`: processor sharing of a few CPUs (or of unlimited ones),
  at most one CPU per job and at most a cap per server: a host that runs two
  batches at once in one Python process gives them only the CPUs its
  interpreter lock lets them take together (1.0-1.6 measured on 2 cores).
  Infinitely fine slices: a job waits only while more jobs than CPUs run.
- :class:`Bursts`: the CPUs as the kernel runs them, one run queue of short
  bursts. A job is a chain of bursts of its server's measured mean length
  (a thread runs, blocks on a lock, a socket or the GIL, and wakes again);
  every burst waits in the queue for a CPU, first come first served, and a
  burst longer than ``quantum_s`` goes back to the queue's tail. Other work
  on the machine is a stream of bursts too. On the calibration machine a
  request is about 300 bursts of 0.07-0.3 ms, and each waits for a CPU
  1.3-1.9x as long as in an M/M/2 queue at the CPUs' load; processor sharing,
  which makes a job wait only while more jobs than CPUs run, showed 3-6x too
  little waiting (docs/scaling-out.md).

Pure and deterministic for a seed, like the rest of the simulation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Protocol

Push = Callable[[float, int, int], None]  # (at, token, version): an event the model wants back


@dataclasses.dataclass
class Job:
    """One run of a server's work; ``server`` is the simulation's, ``left`` seconds of CPU work still to do."""

    server: object
    items: list
    left: float
    burst_s: float = 0.0  # Bursts: the server's mean burst length
    cap: float = 1.0  # Sharing: the most CPUs all running jobs of this server take together
    waited: float = 0.0  # seconds runnable but without a CPU
    began: float = 0.0


class Processors(Protocol):
    def begin(self, jid: int, job: Job, now: float) -> None:
        """Start ``job`` (its id ``jid``) at ``now``."""

    def event(self, token: int, version: int, now: float) -> list[tuple[int, Job]]:
        """One of this model's own events is due: the jobs it finished."""

    def background(self, cpus: float, now: float) -> None:
        """Other work takes ``cpus`` from now on."""


class Dedicated:
    """A processor per server: a job takes exactly its work."""

    def __init__(self, push: Push) -> None:
        self.push, self.jobs = push, {}

    def begin(self, jid: int, job: Job, now: float) -> None:
        self.jobs[jid] = job
        self.push(now + job.left, jid, 0)

    def event(self, token: int, version: int, now: float) -> list[tuple[int, Job]]:
        return [(token, self.jobs.pop(token))]

    def background(self, cpus: float, now: float) -> None:
        pass


class Sharing:
    """Processor sharing: ``cpus`` less other work (None: without limit), shared equally by the running
    jobs, at most one CPU each, and at most ``Job.cap`` CPUs for all the jobs of one server at once (a
    Python process's batches share its interpreter lock), the CPUs a capped server leaves going to the rest."""

    def __init__(self, push: Push, cpus: float | None, background_cpus: float) -> None:
        self.push, self.cpus, self.base = push, cpus, background_cpus
        self.capacity = math.inf if cpus is None else max(1e-6, cpus - background_cpus)
        self.jobs: dict[int, Job] = {}
        self.last, self.version = 0.0, 0
        self._rates: dict[int, float] = {}

    def _share(self) -> None:
        """Water-filling: every job the same rate, except the jobs of servers that reach their cap."""
        groups: dict[int, list[int]] = {}
        for jid, job in self.jobs.items():
            groups.setdefault(id(job.server), []).append(jid)
        order = sorted(groups.values(), key=lambda js: min(1.0, self.jobs[js[0]].cap / len(js)))
        left, count, rates = self.capacity, len(self.jobs), {}
        for js in order:
            per_job = min(1.0, self.jobs[js[0]].cap / len(js))
            fair = min(1.0, left / count)
            rate = min(per_job, fair)
            rates.update(dict.fromkeys(js, rate))
            left, count = left - rate * len(js), count - len(js)
        self._rates = rates

    def _advance(self, now: float) -> None:
        dt = now - self.last
        for jid, job in self.jobs.items():
            rate = self._rates[jid]
            job.left -= dt * rate
            job.waited += dt * (1.0 - rate)
        self.last = now

    def _reschedule(self, now: float) -> None:
        self.version += 1
        self._share()
        if self.jobs:
            jid = min(self.jobs, key=lambda j: (self.jobs[j].left / self._rates[j], j))
            self.push(now + max(0.0, self.jobs[jid].left) / self._rates[jid], jid, self.version)

    def begin(self, jid: int, job: Job, now: float) -> None:
        self._advance(now)
        self.jobs[jid] = job
        self._reschedule(now)

    def event(self, token: int, version: int, now: float) -> list[tuple[int, Job]]:
        if version != self.version:
            return []  # superseded: the sharing changed since
        self._advance(now)
        job = self.jobs.pop(token)
        self._reschedule(now)
        return [(token, job)]

    def background(self, cpus: float, now: float) -> None:
        if self.cpus is None:
            return
        self._advance(now)
        self.capacity = max(1e-6, self.cpus - self.base - cpus)
        self._reschedule(now)


class Bursts:
    """One run queue, ``cpus`` CPUs, jobs as chains of short bursts (exponential, of their server's mean
    length), first come first served, sliced at ``quantum_s``; other work as a Poisson stream of bursts
    of ``background_burst_s`` that takes ``background_cpus`` (plus what :meth:`background` says)."""

    _ARRIVAL = -1  # token of other work's next burst

    def __init__(self, push: Push, cpus: float, background_cpus: float, background_burst_s: float,
                 quantum_s: float, seed: int, wake_s: float = 0.0) -> None:
        self.push, self.cpus, self.base, self.wake = push, max(1, round(cpus)), background_cpus, wake_s
        self.waking: dict[int, tuple[int, float]] = {}  # wake token: (job id, burst seconds)
        self.bg_burst, self.quantum = background_burst_s, quantum_s
        self.rng = random.Random(seed)
        self.queue: deque[tuple[int, float, float]] = deque()  # (job id or _ARRIVAL, burst seconds, queued at)
        self.free = self.cpus
        self.jobs: dict[int, Job] = {}
        self.burst_left: dict[int, float] = {}  # job id: seconds left of its current burst
        self.bg_rate = 0.0  # other work's bursts per second
        self.bg_version = 0
        self.slot = 0  # tokens of running slices: each CPU's slice gets its own
        self.running: dict[int, tuple[int, float]] = {}  # slice token: (job id or _ARRIVAL, seconds left of the burst after it)
        self.background(0.0, 0.0)

    def _draw(self, job: Job) -> float:
        return min(job.left, self.rng.expovariate(1.0 / job.burst_s)) if job.burst_s > 0 else job.left

    def _dispatch(self, now: float) -> None:
        while self.free and self.queue:
            owner, burst, since = self.queue.popleft()
            if owner != self._ARRIVAL:
                self.jobs[owner].waited += now - since
            run = min(burst, self.quantum)
            self.free -= 1
            self.slot += 1
            token = 4 * self.slot
            self.running[token] = (owner, burst - run)
            self.push(now + run, token, 0)

    def _ready(self, jid: int, now: float) -> None:
        """A job's thread wants its next burst: it joins the run queue after the wake-up latency."""
        job = self.jobs[jid]
        burst = self._draw(job)
        job.left -= burst
        if self.wake <= 0:
            self.queue.append((jid, burst, now))
            return
        self.slot += 1
        token = 4 * self.slot + 3  # tokens: 4k slices, 4k+1 other work's arrivals, 4k+3 wake-ups
        self.waking[token] = (jid, burst)
        job.waited += self.wake
        self.push(now + self.wake, token, 0)

    def begin(self, jid: int, job: Job, now: float) -> None:
        self.jobs[jid] = job
        self._ready(jid, now)
        self._dispatch(now)

    def event(self, token: int, version: int, now: float) -> list[tuple[int, Job]]:
        done: list[tuple[int, Job]] = []
        if token % 4 == 3:  # a woken thread joins the run queue
            jid, burst = self.waking.pop(token)
            self.queue.append((jid, burst, now))
            self._dispatch(now)
            return done
        if token % 4 == 1:  # other work's next burst arrives
            if version == self.bg_version and self.bg_rate > 0:
                self.queue.append((self._ARRIVAL, self.rng.expovariate(1.0 / self.bg_burst), now))
                self.push(now + self.rng.expovariate(self.bg_rate), 1, self.bg_version)
                self._dispatch(now)
            return done
        owner, rest = self.running.pop(token)
        self.free += 1
        if rest > 1e-12:  # sliced: back to the tail for the rest of the burst
            self.queue.append((owner, rest, now))
        elif owner != self._ARRIVAL:
            job = self.jobs[owner]
            if job.left > 1e-12:  # the thread wakes again for its next burst
                self._ready(owner, now)
            else:
                done.append((owner, self.jobs.pop(owner)))
        self._dispatch(now)
        return done

    def background(self, cpus: float, now: float) -> None:
        self.bg_version += 1
        self.bg_rate = max(0.0, self.base + cpus) / self.bg_burst if self.bg_burst > 0 else 0.0
        if self.bg_rate > 0:
            self.push(now + self.rng.expovariate(self.bg_rate), 1, self.bg_version)
