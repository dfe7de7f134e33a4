"""Tasks that fit a memory budget, measured on running servers.

Both deployments get the same mix of task kinds in turn (a trained
classifier, a LoRA r8 adapter, a soft prompt, a bottleneck adapter), so the
count is not flattered by the smallest kind:

- ``fmplex``: tasks are deployed into the running server in chunks, each
  answering one request (its extension resident: the host's extension
  budget is set to the whole memory budget, so nothing is evicted); when a
  host's slot pool is full another host (its own server) is started. The
  memory is the PSS of every server process (tritonserver + stubs).
- ``isolated``: one model per task (1 instance x 1 thread, its smallest
  footprint) loaded one by one into one server.

Each stops when the budget is passed or a wall-clock limit runs out; a count
cut short by the clock is a lower bound and says so. Nothing is projected.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fmplex import registry
from fmplex.families import encoder as encoder_family
from fmplex.control import serving
from fmplex.control.server import TritonProcess, free_ports
from fmplex.control.triton_api import Triton
from perf import deployments as dep
from perf.common import server_memory

ROOT = Path(__file__).resolve().parents[1]
MAX_SLOTS = 4096  # the largest slot pool a host accepts (fmplex init --slots)


@dataclasses.dataclass(frozen=True)
class KindSource:
    kind: str  # label in the mix
    version_dir: Path  # a built artifact (manifest + weights)
    entry: registry.TaskEntry  # its registry entry (template)
    family: str  # public outputs: classifier | embedding


def kind_sources(work: Path, log: Callable[[str], None] = print) -> list[KindSource]:
    """One built task of each kind, made with the real libraries (peft) and
    ``fmplex task create``, as a user would."""
    sys.path.insert(0, str(ROOT))
    from tests.kinds import adapter, lora, prompt  # noqa: PLC0415 - sources made with peft/transformers

    repo = work / "kinds-repo"
    encoder_family.init_hosts(repo, ["minilm"])
    dep.add_fmplex_tasks(repo, ["k_classifier"], offset=0)
    made = {"lora_r8": lora.make(work, seed=1, rank=8), "prompt": prompt.make(work, seed=2), "adapter": adapter.make(work, seed=3)}
    for label, src in made.items():
        subprocess.run([dep.FMPLEX, "task", "create", f"k_{label}", "--repo", str(repo), *src.create_args], check=True, capture_output=True)
    reg = registry.load(repo)
    out = []
    for label in ("classifier", *made):
        e = reg.task(f"k_{label}")
        out.append(KindSource(label, repo / e.name / str(e.version), e, e.outputs_family))
    log("   kinds: " + ", ".join(f"{k.kind} ({k.entry.kind}, {sum(f.stat().st_size for f in k.version_dir.iterdir()) / 1024:.0f} KiB)" for k in out))
    return out


def _add_tasks(repo: Path, names: list[str], kinds: list[KindSource], offset: int) -> dict[str, str]:
    """Copies of the kind artifacts as registry tasks (not deployed); name -> kind label."""
    labels = {}
    with registry.editing(repo) as reg:
        for i, name in enumerate(names):
            k = kinds[(offset + i) % len(kinds)]
            shutil.copytree(k.version_dir, repo / name / str(k.entry.version), dirs_exist_ok=True)
            reg.tasks[name] = dataclasses.replace(k.entry, name=name, slot=None, deployed_version=None, weight=1.0)
            labels[name] = k.kind
    return labels


def _answer_once(url: str, names: list[str], timeout_s: float = 300.0) -> list[str]:
    """One request per task, all in flight together; the errors, if any."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    client = grpcclient.InferenceServerClient(url)
    errors: list[str] = []
    left = threading.Semaphore(0)
    try:
        for n in names:
            inp = grpcclient.InferInput("TEXT", [1], "BYTES")
            inp.set_data_from_numpy(np.array([b"warm the task up"], dtype=np.object_))

            def done(result: object, error: object, n: str = n) -> None:
                if error is not None:
                    errors.append(f"{n}: {error}"[:200])
                left.release()

            client.async_infer(n, [inp], callback=done, client_timeout=timeout_s)
        for _ in names:
            if not left.acquire(timeout=timeout_s + 10):
                errors.append("no answer in time")
                break
    finally:
        client.close()
    return errors


def grow_until_budget(add: Callable[[int], int | str], memory: Callable[[], float], budget_mib: float, wall_s: float,
                      log: Callable[[str], None], line: Callable[[int, float], str]) -> dict[str, Any]:
    """The tasks-in-budget loop every deployment shares: ``add(n)`` puts more tasks beside the ``n``
    that fit so far and returns the new count (or a string: why no more can be added); after each
    addition ``memory()`` (MiB PSS) is logged with ``line(count, mib)``. Stops when the memory passes
    the budget (the last addition does not count), when ``add`` says so or when the clock runs out:
    a count cut short by the clock is a lower bound, and ``stopped_by`` says so."""
    t_end = time.monotonic() + wall_s
    curve = [(0, memory())]
    fitted, reached, stopped_by = 0, False, "wall-clock limit"
    if curve[0][1] > budget_mib:
        reached, stopped_by = True, "budget (passed before the first task)"
    while not reached and time.monotonic() < t_end:
        count = add(fitted)
        if isinstance(count, str):
            stopped_by = count
            break
        mem = memory()
        curve.append((count, mem))
        log(line(count, mem))
        if mem > budget_mib:
            reached, stopped_by = True, "budget"
            break
        fitted = count
    return {"tasks": fitted, "budget_reached": reached, "stopped_by": stopped_by, "curve": curve}


def load_until_budget(repo: Path, names: list[str], log_path: Path, budget_mib: float, wall_s: float,
                      log: Callable[[str], None], label: str) -> dict[str, Any]:
    """One-copy-per-task models of ``repo`` loaded one by one into one server (started with none)
    until the budget, the clock or the last of ``names``."""
    ports = free_ports()
    proc = dep.start(repo, ports, [], log_path)
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        with Triton(f"127.0.0.1:{ports.grpc}", timeout=300) as triton:

            def add(fitted: int) -> int | str:
                if fitted >= len(names):
                    return f"task limit {len(names)}"
                triton.load(names[fitted])
                return fitted + 1

            return grow_until_budget(add, lambda: server_memory(pid)["pss_mib"], budget_mib, wall_s, log,
                                     lambda n, mem: f"   {label}: {n:3d} tasks, {mem:7.0f} MiB PSS")
    finally:
        proc.stop()


def budget_fmplex(work: Path, kinds: list[KindSource], budget_mib: float, wall_s: float, step: int,
                  log: Callable[[str], None] = print, slots: int = MAX_SLOTS) -> dict[str, Any]:
    """Deploy the kind mix into running hosts until the budget or the clock runs out."""
    servers: list[tuple[Path, TritonProcess, str]] = []
    labels: dict[str, str] = {}
    errors = 0

    def memory() -> float:
        return sum(server_memory(p.proc.pid)["pss_mib"] for _, p, _ in servers if p.proc is not None)

    def new_host() -> None:
        h = len(servers)
        repo = dep.fmplex_repo(work / f"budget-fmplex-{h}", [], slots=slots, extension_budget_mb=budget_mib)
        ports = free_ports()
        proc = serving.start(repo, ports, log_path=work / f"budget-fmplex-{h}.log")
        servers.append((repo, proc, f"127.0.0.1:{ports.grpc}"))
        log(f"   fmplex: host {h + 1} up (slots {slots})")

    def add(deployed: int) -> int:
        nonlocal errors
        repo, _, url = servers[-1]
        on_host = sum(1 for t in registry.load(repo).tasks.values() if t.deployed)
        if on_host >= slots:
            new_host()
            repo, _, url = servers[-1]
            on_host = 0
        chunk = [f"v{i:05d}" for i in range(deployed, deployed + min(step, slots - on_host))]
        labels.update(_add_tasks(repo, chunk, kinds, deployed))
        subprocess.run([dep.FMPLEX, "deploy", "--repo", str(repo), "--url", url, *chunk], check=True, capture_output=True)
        bad = _answer_once(url, chunk)
        errors += len(bad)
        if bad:
            log(f"   fmplex: {len(bad)} of {len(chunk)} new tasks did not answer, e.g. {bad[0]}")
        return deployed + len(chunk)

    try:
        new_host()
        res = grow_until_budget(add, memory, budget_mib, wall_s, log,
                                lambda n, mem: f"   fmplex: {n:5d} tasks on {len(servers)} host(s), {mem:7.0f} MiB PSS")
    finally:
        for _, proc, _ in servers:
            proc.stop()
    mix: dict[str, int] = {}
    for i in range(res["tasks"]):
        k = labels[f"v{i:05d}"]
        mix[k] = mix.get(k, 0) + 1
    return {**res, "hosts": len(servers), "slots_per_host": slots, "mix": mix, "unanswered": errors, "wall_limit_s": wall_s}


def budget_isolated(work: Path, kinds: list[KindSource], budget_mib: float, wall_s: float, limit: int,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load one-copy-per-task models one by one until the budget or the clock runs out."""
    names = dep.task_names(limit, "b")
    sources = [(k.version_dir, k.family) for k in kinds]
    repo = dep.baseline_repo(work / "budget-iso", names, "isolated", sources=sources)
    res = load_until_budget(repo, names, work / "budget-isolated.log", budget_mib, wall_s, log, "isolated")
    mix: dict[str, int] = {}
    for i in range(res["tasks"]):
        k = kinds[i % len(kinds)].kind
        mix[k] = mix.get(k, 0) + 1
    return {**res, "setting": "1 instance x 1 thread", "mix": mix, "wall_limit_s": wall_s}
