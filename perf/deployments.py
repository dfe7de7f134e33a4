"""The deployments the baseline benchmark compares, generated as real Triton repositories.

- ``fmplex``: N tasks as vFMs (ensembles) on one shared host (``fmplex init`` +
  ``fmplex deploy``, as a user would).
- ``isolated`` (best-effort co-location): one Python-backend model per task,
  each with its own backbone copy and head, Triton's dynamic batcher on, all
  in one server competing for the same cores.
- ``partitioned`` (spatial partitioning): the same per-task models, each
  confined to a fixed 1/N share of the machine: a CFS CPU quota of
  cores/N in its own cgroup (the CPU analogue of an MPS active-thread
  percentage; pinned cores where no cgroup is writable); on a GPU, CUDA MPS
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` = 100/N per model process.

Every task is a classifier cloned from the embedded repository's trained
tasks (sentiment, topic, intent in turn), so all deployments compute the same
answers (``tests/e2e/test_baselines.py`` checks they agree with fmplex).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fmplex import registry
from fmplex.families import encoder as encoder_family
from fmplex.control.server import Ports, TritonProcess
from fmplex.kinds import outputs_of

ROOT = Path(__file__).resolve().parents[1]
# The trained classifier tasks every deployment clones. FMPLEX_BENCH_TASKS names another repository
# holding the same three tasks (perf/gpu_check.sh trains them on a random-init backbone: an artifact
# records the backbone weights it was built on and is refused by any other).
EMBEDDED = Path(os.environ.get("FMPLEX_BENCH_TASKS") or ROOT / "model_repository")
SOURCES = ("sentiment", "topic", "intent")  # trained classifier tasks of the embedded repository
FMPLEX = str(Path(sys.executable).parent / "fmplex")
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
SHIM = "from fmplex.baselines.single_task import TritonPythonModel  # noqa: F401\n"


def task_names(n: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)] if n <= 100 else [f"{prefix}{i:04d}" for i in range(n)]


def source_of(i: int) -> Path:
    return EMBEDDED / SOURCES[i % len(SOURCES)] / "1"


# --- fmplex -------------------------------------------------------------------------


def fmplex_repo(work: Path, names: list[str], *, slots: int = registry.DEFAULT_SLOTS, max_batch_rows: int | None = None,
                device: str = "cpu", workers: str = "auto", extension_budget_mb: float | None = None) -> Path:
    """A fresh repository with ``names`` as deployed classifier vFMs (offline)."""
    repo = work / "fmplex-repo"
    kwargs: dict = {"workers": workers} if max_batch_rows is None else {"max_batch_rows": max_batch_rows, "workers": workers}
    if extension_budget_mb is not None:
        kwargs["extension_budget_mb"] = extension_budget_mb
    encoder_family.init_hosts(repo, ["minilm"], slots, **kwargs)
    if device != "cpu":
        cfg = repo / "fm.minilm" / "config.pbtxt"
        cfg.write_text(cfg.read_text() + f'parameters {{ key: "device" value {{ string_value: "{device}" }} }}\n')
    if not names:
        return repo
    add_fmplex_tasks(repo, names, offset=0)
    subprocess.run([FMPLEX, "deploy", "--repo", str(repo), "--offline", *names], check=True, capture_output=True)
    return repo


def add_fmplex_tasks(repo: Path, names: list[str], offset: int) -> None:
    """Task artifacts + registry entries (not deployed); copies, not links, as
    ``fmplex task create`` would leave them."""
    with registry.editing(repo) as reg:
        for i, name in enumerate(names):
            shutil.copytree(source_of(offset + i), repo / name / "1", dirs_exist_ok=True)
            reg.tasks[name] = registry.TaskEntry(name, "minilm", "classifier", 1)


def set_weights(repo: Path, weights: dict[str, float]) -> None:
    """A live registry edit, exactly what ``fmplex task set-weight`` does."""
    with registry.editing(repo) as reg:
        for name, w in weights.items():
            reg.task(name).weight = w


# --- per-task baselines -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Partition:
    cpu_quota: float  # cores
    cpu_cores: tuple[int, ...]  # affinity fallback
    gpu_percent: int  # MPS active-thread percentage (GPU runs only)


def partitions(n: int, device: str = "cpu") -> list[Partition]:
    """A fixed 1/n share of the machine per task."""
    cores = os.cpu_count() or 1
    return [
        Partition(cpu_quota=cores / n, cpu_cores=(i % cores,), gpu_percent=max(1, 100 // n) if device != "cpu" else 0)
        for i in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class BaselineSetting:
    """How a per-task baseline model runs: Triton instances (stub processes,
    each with its own backbone copy), torch threads per instance, and the
    dynamic batcher's largest batch."""

    instances: int = 1
    threads: int = 1
    max_batch: int = 16

    @property
    def label(self) -> str:
        return f"{self.instances} instance(s) x {self.threads} thread(s), batch {self.max_batch}"


def isolated_settings(cores: int) -> dict[str, BaselineSetting]:
    """The isolated baseline's candidate settings: one thread; as many threads
    as cores in one instance; as many instances as cores (duplicates dropped)."""
    cand = {
        "1x1": BaselineSetting(1, 1),
        f"1x{cores}threads": BaselineSetting(1, cores),
        f"{cores}instances": BaselineSetting(cores, 1),
    }
    seen: dict[BaselineSetting, str] = {}
    for name, s in cand.items():
        seen.setdefault(s, name)
    return {name: s for s, name in seen.items()}


def partitioned_settings(batches: tuple[int, ...] = (4, 16, 64)) -> dict[str, BaselineSetting]:
    """The partitioned baseline's candidates: its batch size (the partition fixes the rest)."""
    return {f"batch{b}": BaselineSetting(1, 1, b) for b in batches}


def single_task_config(name: str, artifact: Path, *, max_batch: int = 16, partition: Partition | None = None, device: str = "cpu",
                       instances: int = 1, threads: int = 1, family: str = "classifier") -> str:
    params = {"artifact": str(artifact), "torch_threads": str(threads), "device": device}
    if partition is not None:
        params["cpu_quota"] = f"{partition.cpu_quota:g}"
        params["cpu_cores"] = ",".join(map(str, partition.cpu_cores))
        if partition.gpu_percent:
            params["gpu_percent"] = str(partition.gpu_percent)
    ptext = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    outputs = ",\n".join(f'  {{ name: "{o.name}" data_type: {o.data_type} dims: {o.dims} }}' for o in outputs_of(family))
    kind = "KIND_CPU" if device == "cpu" else "KIND_MODEL"
    return f"""# Baseline written by perf/deployments.py: task '{name}' alone on its own backbone copy.
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
dynamic_batching {{ }}
input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true }} ]
output [
{outputs}
]
instance_group [ {{ kind: {kind} count: {instances} }} ]
{ptext}
"""


def baseline_repo(work: Path, names: list[str], kind: str, device: str = "cpu", setting: BaselineSetting = BaselineSetting(),
                  sources: list[tuple[Path, str]] | None = None) -> Path:
    """``isolated`` or ``partitioned``: one model directory per task.

    ``sources``: (artifact version directory, output family) per task;
    default: the embedded trained classifiers in turn."""
    if kind not in ("isolated", "partitioned"):
        raise ValueError(f"unknown baseline '{kind}'")
    repo = work / f"{kind}-repo"
    arts = work / f"{kind}-artifacts"
    parts = partitions(len(names), device) if kind == "partitioned" else [None] * len(names)
    for i, (name, part) in enumerate(zip(names, parts)):
        src, family = sources[i % len(sources)] if sources else (source_of(i), "classifier")
        art = arts / name / "1"
        shutil.copytree(src, art, dirs_exist_ok=True)
        mdir = repo / name
        (mdir / "1").mkdir(parents=True, exist_ok=True)
        (mdir / "1" / "model.py").write_text(SHIM)
        (mdir / "config.pbtxt").write_text(single_task_config(name, art, partition=part, device=device, instances=setting.instances,
                                                              threads=setting.threads, max_batch=setting.max_batch, family=family))
    return repo


def remove_partitions() -> int:
    """Remove the cgroups partitioned models made (after their server stopped)."""
    removed = 0
    for root in (CGROUP_V1, Path("/sys/fs/cgroup")):
        for group in root.glob("fmplex-partition-*"):
            try:
                group.rmdir()
                removed += 1
            except OSError:
                pass
    return removed


def partition_report(names: list[str]) -> dict[str, str]:
    """How each partitioned model was confined, read back from the cgroups."""
    out = {}
    for name in names:
        g1, g2 = CGROUP_V1 / f"fmplex-partition-{name}", Path("/sys/fs/cgroup") / f"fmplex-partition-{name}"
        if (g1 / "cpu.cfs_quota_us").exists():
            procs = (g1 / "cgroup.procs").read_text().split()
            out[name] = f"cgroup v1 quota {int((g1 / 'cpu.cfs_quota_us').read_text()) / 1e5:.3f} cores, pids {procs}"
        elif (g2 / "cpu.max").exists():
            out[name] = f"cgroup v2 cpu.max {(g2 / 'cpu.max').read_text().strip()}"
        else:
            out[name] = "no cgroup (affinity fallback; see the server log)"
    return out


# --- servers ------------------------------------------------------------------------


def start(repo: Path, ports: Ports, load: list[str], log: Path) -> TritonProcess:
    return TritonProcess(repo, ports, load=load, log_path=log).launch(timeout=600)
