"""Bringing a host back when its Python stub process dies.

Measured with Triton 2.51: when a Python-backend stub is killed, Triton keeps
the model READY but answers every request with "Stub process ... is not
healthy" — for ever (60 s observed, no restart). A dead host fails every vFM
on it, so ``fmplex serve`` runs this watchdog: it reads each host's stub pid
from the host's own metric (``fmplex_host_pid``), and when that process is
gone it reloads the host in place (a load with the host's own config as an
override makes Triton build a fresh instance; the vFM ensembles stay loaded).
Works where the watchdog runs on the server's machine (it checks the pid).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Callable

from .triton_api import Triton, scrape_metrics


@dataclasses.dataclass
class Recovery:
    host: str
    dead_pid: int
    detected_at: float
    reloaded_s: float  # time the reload call took
    error: str | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead too (the server has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


class HostWatchdog(threading.Thread):
    def __init__(
        self,
        grpc_url: str,
        metrics_url: str,
        hosts: list[str],
        interval: float = 1.0,
        echo: Callable[[str], None] = lambda _m: None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name="fmplex-watchdog", daemon=True)
        self.grpc_url, self.metrics_url, self.hosts = grpc_url, metrics_url, hosts
        self.interval, self.echo, self.api_key = interval, echo, api_key
        self.recoveries: list[Recovery] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def stub_pids(self) -> dict[str, list[int]]:
        """Each host's stub pids, one per instance (label ``instance``)."""
        pids: dict[str, list[int]] = {}
        for (name, labels), value in scrape_metrics(self.metrics_url).items():
            if name == "fmplex_host_pid":
                host = dict(labels).get("host", "")
                if host in self.hosts and value > 0:
                    pids.setdefault(host, []).append(int(value))
        return pids

    def check_once(self) -> list[Recovery]:
        done = []
        for host, pids in self.stub_pids().items():
            dead = [p for p in pids if not _alive(p) and not any(r.dead_pid == p for r in self.recoveries)]
            if not dead:
                continue
            pid = dead[0]
            t0 = time.monotonic()
            self.echo(f"watchdog: the stub of {host} (pid {pid}) is gone; reloading {host}")
            rec = Recovery(host, pid, time.time(), 0.0)
            try:
                with Triton(self.grpc_url, key=self.api_key) as triton:
                    config = triton.client.get_model_config(host, as_json=True, client_timeout=30)["config"]
                    # Triton ignores a load whose override equals the config it last
                    # parsed (a second recovery was a no-op): make every one differ.
                    config.setdefault("parameters", {})["fmplex_recovery"] = {"string_value": f"{pid}-{time.time():.3f}"}
                    triton.load(host, config=json.dumps(config))
                rec.reloaded_s = time.monotonic() - t0
                self.echo(f"watchdog: {host} is back after {rec.reloaded_s:.1f}s")
            except Exception as exc:  # noqa: BLE001 - keep watching; report
                rec.error = str(exc)
                self.echo(f"watchdog: reloading {host} failed: {exc}")
            self.recoveries.append(rec)
            done.append(rec)
        return done

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 - the watchdog must not die
                self.echo(f"watchdog: {exc}")

