"""Finding and starting a real tritonserver for an fmplex model repository.

Two servers are supported: a system ``tritonserver`` (an NGC container puts it
in ``/opt/tritonserver``), preferred when present, and the one bundled in the
``nvidia-pytriton`` wheel, which needs its shared libraries, the Python stub
for the running interpreter and the venv's ``bin/`` on ``PATH`` (the stub finds
the interpreter's packages through ``python3`` on ``PATH``).

The host code never lives in a model directory: any file Triton sees change
there (the stub's own ``__pycache__`` included) makes it reload the backbone at
the next load call. So every server gets a private *backend directory* with the
Python backend and a one-line ``fmplex/model.py`` that imports the host from the
installed package; host configs say ``backend: "fmplex"``.

Locking: given an API key, the server restricts every API that can change it
(the model repository: load/unload/index; shared memory, trace and logging
settings) to requests carrying the key: HTTP header ``fmplex-key: <key>``,
gRPC metadata ``triton-grpc-protocol-fmplex-key: <key>`` (Triton prefixes
restricted gRPC headers) -- Triton's ``--http-restricted-api`` and
``--grpc-restricted-protocol``.
Inference, health, metadata, model configs and statistics stay open.
``fmplex serve`` writes a generated key to ``REPO/fmplex.key`` (mode 0600) for
the control plane to read; Triton ignores files at the repository root.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEM_ROOT = Path("/opt/tritonserver")

# What the fmplex backend's model.py holds: the stub imports it from the
# backend directory, and it pulls the host from the installed package.
BACKEND_SHIM = "from fmplex.triton_backend.host import TritonPythonModel  # noqa: F401\n"

# Python-based backends of the multimodal stage hosts (fmplex/multimodal/):
# backend name -> its model.py, assembled beside the fmplex backend.
MULTIMODAL_SHIMS = {
    "fmplex_mm_encode": "from fmplex.multimodal.encode_host import TritonPythonModel  # noqa: F401\n",
    "fmplex_mm_lm": "from fmplex.multimodal.lm_host import TritonPythonModel  # noqa: F401\n",
}


# Python-based backend of the generative (decoder LM) hosts (fmplex/generative/):
# both the whole-answer host and its decoupled streaming twin run this code.
GENERATIVE_SHIMS = {
    "fmplex_gen": "from fmplex.generative.generate_host import TritonPythonModel  # noqa: F401\n",
}


# Python-based backends of the hosts of families that come as one family
# object (fmplex/families/vision, fmplex/families/timeseries).
FAMILY_SHIMS = {
    "fmplex_vision": "from fmplex.families.vision.host import TritonPythonModel  # noqa: F401\n",
    "fmplex_series": "from fmplex.families.timeseries.host import TritonPythonModel  # noqa: F401\n",
}


# Locking the server's control APIs (see the module docstring).
API_KEY_HEADER = "fmplex-key"  # the HTTP header
# Triton prefixes the header of a restricted gRPC protocol: gRPC clients send
# the key as this metadata key (``headers=`` in tritonclient.grpc).
GRPC_API_KEY_HEADER = "triton-grpc-protocol-" + API_KEY_HEADER
KEY_FILE = "fmplex.key"
# Triton's API groups that can change the server: the model repository
# (load, unload, index), shared-memory registration, trace and log settings.
# Left open: health, metadata, inference, model-config (read-only, needed by
# clients such as perf_analyzer) and statistics.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")


class ServerError(RuntimeError):
    """A server could not be found, assembled or started."""


def restricted_api_args(api_key: str, apis: tuple[str, ...] = RESTRICTED_APIS) -> list[str]:
    """Triton flags that demand ``fmplex-key: api_key`` for ``apis`` (HTTP and gRPC)."""
    if not api_key or not (api_key.isascii() and api_key.isprintable()) or any(c.isspace() or c in ",:=" for c in api_key):
        raise ServerError("an API key must be non-empty printable text without spaces, ',', ':' or '='")
    group = ",".join(apis)
    return [
        f"--http-restricted-api={group}:{API_KEY_HEADER}={api_key}",
        f"--grpc-restricted-protocol={group}:{API_KEY_HEADER}={api_key}",
    ]


def generate_key() -> str:
    """A fresh random key (URL-safe: fits headers and Triton's flag syntax)."""
    return secrets.token_urlsafe(32)


def key_path(repository: Path) -> Path:
    return Path(repository) / KEY_FILE


def write_key_file(repository: Path, api_key: str) -> Path:
    """Write ``REPO/fmplex.key`` readable by its owner only (0600).

    Any old file (or a link planted in its place) is removed first and the new
    one is created exclusively, so the key never sits in a wider-open file.
    """
    path = key_path(repository)
    remove_key_file(repository)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (api_key + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return path


def read_key_file(repository: Path) -> str | None:
    """The key ``fmplex serve`` wrote for ``repository``, or None without one."""
    path = key_path(repository)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ServerError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return text or None


def remove_key_file(repository: Path) -> None:
    try:
        os.unlink(key_path(repository))
    except FileNotFoundError:
        pass


@dataclasses.dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """Where a tritonserver binary and its Python backend live."""

    binary: Path
    python_backend: Path  # directory with libtriton_python.so
    stub: Path  # triton_python_backend_stub for this interpreter
    lib_dirs: tuple[Path, ...]  # extra LD_LIBRARY_PATH entries
    kind: str  # "system" or "bundled"


def _bundled_install() -> TritonInstall | None:
    try:
        import pytriton  # noqa: PLC0415 - only needed to locate files
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    binary = root / "bin" / "tritonserver"
    if not binary.exists() or not stub.exists():
        return None
    site = root.parent.parent
    libs = [site / "nvidia_pytriton.libs"]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libs.append(Path(libdir))
    try:
        import nvidia.cuda_runtime  # noqa: PLC0415 - perf_analyzer/cudart lookups

        libs.append(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")
    except ImportError:
        pass
    return TritonInstall(binary, root / "backends" / "python", stub, tuple(libs), "bundled")


def _system_install() -> TritonInstall | None:
    binary = shutil.which("tritonserver")
    if binary is None and (SYSTEM_ROOT / "bin" / "tritonserver").exists():
        binary = str(SYSTEM_ROOT / "bin" / "tritonserver")
    if binary is None:
        return None
    root = Path(binary).resolve().parent.parent
    pyback = root / "backends" / "python"
    stub = pyback / "triton_python_backend_stub"
    if not (pyback / "libtriton_python.so").exists() or not stub.exists():
        return None
    return TritonInstall(Path(binary), pyback, stub, (), "system")


def find_triton(prefer: str = "auto") -> TritonInstall:
    """The tritonserver to run: ``auto`` prefers a system install."""
    order = {"auto": (_system_install, _bundled_install), "system": (_system_install,), "bundled": (_bundled_install,)}
    if prefer not in order:
        raise ServerError(f"unknown server kind '{prefer}' (auto, system, bundled)")
    for probe in order[prefer]:
        found = probe()
        if found is not None:
            return found
    raise ServerError(
        "no tritonserver found: install nvidia-pytriton==0.7.0 (bundled server) or run where /opt/tritonserver exists"
    )


def assemble_backends(install: TritonInstall, into: Path) -> Path:
    """Build a backend directory: ``python/`` (Triton's) and ``fmplex/model.py``."""
    into.mkdir(parents=True, exist_ok=True)
    py = into / "python"
    py.mkdir(exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        src = install.python_backend / name
        if src.exists():
            shutil.copy2(src, py / name)
    shutil.copy2(install.stub, py / "triton_python_backend_stub")
    fm = into / "fmplex"
    fm.mkdir(exist_ok=True)
    (fm / "model.py").write_text(BACKEND_SHIM)
    for backend, shim in MULTIMODAL_SHIMS.items():
        (into / backend).mkdir(exist_ok=True)
        (into / backend / "model.py").write_text(shim)
    for backend, shim in {**GENERATIVE_SHIMS, **FAMILY_SHIMS}.items():
        (into / backend).mkdir(exist_ok=True)
        (into / backend / "model.py").write_text(shim)
    return into


def server_env(install: TritonInstall, torch_threads: int | None = None) -> dict[str, str]:
    env = os.environ.copy()
    extra = os.pathsep.join(str(p) for p in install.lib_dirs)
    if extra:
        env["LD_LIBRARY_PATH"] = extra + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    # The stub finds this interpreter (and so the venv with fmplex) via PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if torch_threads:
        env["FMPLEX_TORCH_THREADS"] = str(torch_threads)
    return env


def server_command(
    install: TritonInstall,
    repository: Path,
    backend_dir: Path,
    ports: Ports,
    *,
    load: list[str] | None = None,
    log_verbose: int = 0,
    extra_args: list[str] | None = None,
    api_key: str | None = None,
) -> list[str]:
    """The tritonserver command line; ``api_key`` locks the control APIs."""
    cmd = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        "--model-control-mode=explicit",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        f"--log-verbose={log_verbose}",
    ]
    for name in load or []:
        cmd.append(f"--load-model={name}")
    if api_key is not None:
        cmd.extend(restricted_api_args(api_key))
    cmd.extend(extra_args or [])
    return cmd


class TritonProcess:
    """A tritonserver child process with its private backend directory.

    Used as a context manager by tests and the demo; ``fmplex serve`` runs it in
    the foreground. Stopping sends SIGINT (Triton drains and unloads models),
    then SIGKILL after a grace period, and always removes the backend dir.
    ``api_key`` locks the server's control APIs (None: unlocked).
    """

    def __init__(
        self,
        repository: Path,
        ports: Ports = Ports(),
        *,
        prefer: str = "auto",
        load: list[str] | None = None,
        log_path: Path | None = None,
        torch_threads: int | None = None,
        extra_args: list[str] | None = None,
        inherit_output: bool = False,
        api_key: str | None = None,
    ) -> None:
        self.inherit_output = inherit_output
        self.api_key = api_key
        if api_key is not None:
            restricted_api_args(api_key)  # refuse a malformed key before assembling anything
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.install = find_triton(prefer)
        self._tmp = Path(tempfile.mkdtemp(prefix="fmplex-backends-"))
        self.backend_dir = assemble_backends(self.install, self._tmp)
        self.cmd = server_command(
            self.install, self.repository, self.backend_dir, ports, load=load, extra_args=extra_args, api_key=api_key
        )
        self.env = server_env(self.install, torch_threads)
        self.log_path = log_path
        self.watchdog: Any = None  # set by serving.start(watchdog=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TritonProcess:
        out: Any = open(self.log_path, "ab") if self.log_path else (None if self.inherit_output else subprocess.DEVNULL)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the HTTP health endpoint; fail fast if the process dies."""
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        url = f"http://127.0.0.1:{self.ports.http}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}{self._log_hint()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout:.0f}s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def stop(self, grace: float = 20.0) -> int | None:
        if self.watchdog is not None:
            self.watchdog.stop()
        code = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                code = self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait()
            except ProcessLookupError:
                pass
        elif self.proc is not None:
            code = self.proc.returncode
        if self.proc is not None:
            # A tritonserver that died (abort, SIGKILL) leaves its Python stubs running in its
            # process group, each holding a backbone; nothing else will ever stop them.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)
        return code

    def launch(self, timeout: float = 120.0) -> TritonProcess:
        """Start and wait until ready; a server that never gets ready is stopped again."""
        self.start()
        try:
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> TritonProcess:
        return self.launch()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports() -> Ports:
    """Three distinct free TCP ports (tests and the demo run side by side).

    Picked at random below the kernel's ephemeral range when there is room:
    a port the kernel hands out for ``bind(0)`` is also one it may hand to
    any outgoing connection (a gRPC client, Ray) in the moment before
    tritonserver binds it, which made a server fail with "Address already in
    use" now and then while many ran side by side. The range starts at
    20000, above the ports Ray gives its workers by default (10002-19999).
    """
    import random  # noqa: PLC0415
    import socket  # noqa: PLC0415

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    chosen: list[int] = []
    if low > 21000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(20000, low)
            if port in chosen:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            chosen.append(port)
            if len(chosen) == 3:
                return Ports(*chosen)
    socks = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return Ports(*(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


# perf_analyzer lives in control/perf.py; kept importable here for older callers.
from .perf import perf_analyzer_command  # noqa: E402,F401
