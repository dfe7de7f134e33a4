"""Driving a running tritonserver from the control plane (gRPC repository API).

Loads and unloads are synchronous in Triton's repository API; we still confirm
readiness (or its absence) ourselves so that a deploy returns only once the
vFM answers, and an undeploy only once Triton routes nothing more to it.

A server started with an API key (``fmplex serve`` does by default) refuses
the repository API without it: ``Triton(url, key=...)`` sends the key with
every load, unload and index call.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fmplex.prometheus import Series, parse_prometheus

from .server import API_KEY_HEADER, GRPC_API_KEY_HEADER


class ControlError(RuntimeError):
    """The server refused or failed an operation."""


class KeyRefused(ControlError):
    """The server is locked and the request carried no key or a wrong one."""


KEY_REFUSED = (
    f"the server refused the repository API: wrong or missing key ({API_KEY_HEADER}); "
    "pass --api-key or run on the repository whose fmplex.key the server wrote"
)


def _refused(exc: InferenceServerException) -> bool:
    """Triton's answer to a restricted call without the right key."""
    return "is restricted, expecting header" in (exc.message() or "")


class Triton:
    def __init__(self, url: str = "localhost:8001", timeout: float = 120.0, key: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(url=url)
        # Sent with the restricted calls only (an unlocked server ignores it).
        self.headers = {GRPC_API_KEY_HEADER: key} if key else None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Triton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def live(self) -> bool:
        try:
            return bool(self.client.is_server_live(client_timeout=5))
        except InferenceServerException:
            return False

    def require_live(self) -> None:
        if not self.live():
            raise ControlError(f"no tritonserver answers at {self.url} (start one with 'fmplex serve')")

    def ready(self, name: str) -> bool:
        try:
            return bool(self.client.is_model_ready(name, client_timeout=5))
        except InferenceServerException:
            return False

    def load(self, name: str, config: str | None = None) -> float:
        """Load (or reload) a model and wait until it is ready; seconds taken."""
        t0 = time.monotonic()
        try:
            self.client.load_model(name, headers=self.headers, config=config, client_timeout=self.timeout)
        except InferenceServerException as exc:
            if _refused(exc):
                raise KeyRefused(KEY_REFUSED) from None
            raise ControlError(f"loading '{name}' failed: {exc.message()}") from None
        self._wait(name, True)
        return time.monotonic() - t0

    def unload(self, name: str) -> float:
        t0 = time.monotonic()
        try:
            self.client.unload_model(name, headers=self.headers, unload_dependents=False, client_timeout=self.timeout)
        except InferenceServerException as exc:
            if _refused(exc):
                raise KeyRefused(KEY_REFUSED) from None
            raise ControlError(f"unloading '{name}' failed: {exc.message()}") from None
        self._wait(name, False)
        return time.monotonic() - t0

    def _wait(self, name: str, ready: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while self.ready(name) != ready:
            if time.monotonic() > deadline:
                raise ControlError(f"'{name}' did not become {'ready' if ready else 'unavailable'} in {self.timeout:.0f}s")
            time.sleep(0.05)

    def check_key(self) -> None:
        """Fail now (KeyRefused) if a locked server would refuse our repository calls.

        The control plane calls it before editing the repository, so that a
        wrong key never leaves the registry out of step with the server.
        """
        self.index()

    def index(self) -> dict[str, dict[str, Any]]:
        """Model name -> {state, version, reason} from the repository index."""
        try:
            idx = self.client.get_model_repository_index(headers=self.headers, as_json=True, client_timeout=10)
        except InferenceServerException as exc:
            if _refused(exc):
                raise KeyRefused(KEY_REFUSED) from None
            raise ControlError(f"reading the repository index failed: {exc.message()}") from None
        out: dict[str, dict[str, Any]] = {}
        for m in idx.get("models", []):
            out[m["name"]] = {"state": m.get("state", ""), "version": m.get("version", ""), "reason": m.get("reason", "")}
        return out

    def statistics(self, name: str) -> dict[str, Any]:
        """Summed request counts and mean latencies (ms) of one model's versions."""
        try:
            stats = self.client.get_inference_statistics(name, as_json=True, client_timeout=10)
        except InferenceServerException:
            return {}
        total = {"success": 0, "fail": 0, "execution": 0, "ms_request": 0.0, "ms_queue": 0.0}
        ns = {"request": 0, "queue": 0}
        for mv in stats.get("model_stats", []):
            inf = mv.get("inference_stats", {})
            total["success"] += int(inf.get("success", {}).get("count", 0))
            total["fail"] += int(inf.get("fail", {}).get("count", 0))
            total["execution"] += int(mv.get("execution_count", 0))
            ns["request"] += int(inf.get("success", {}).get("ns", 0))
            ns["queue"] += int(inf.get("queue", {}).get("ns", 0))
        if total["success"]:
            total["ms_request"] = ns["request"] / total["success"] / 1e6
            total["ms_queue"] = ns["queue"] / total["success"] / 1e6
        return total


def scrape_metrics(metrics_url: str, prefix: str = "fmplex_") -> Series:
    """Prometheus text from Triton's metrics port, filtered to fmplex's own ({} if unreachable)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError:
        return {}
    return parse_prometheus(text, (prefix,))
