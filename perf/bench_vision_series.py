"""fmplex vs the deployments a user would pick instead, for the image and the time-series backbone.

The same comparison as ``perf/bench_baselines.py`` (text) at a smaller scale,
per family (``fm.efficientnet``: digit classifiers trained on load_digits,
one PNG per request; ``fm.fracast``: zero-shot forecasters, one 240-step
window of a statsmodels series per request):

- ``raw``: the family's batched pass (``run_batch``) in a tight loop in this
  process, 1 torch thread: the physical limit, ``raw_limit_rps``;
- ``fmplex``: N tasks as vFMs on one shared host;
- ``isolated``: one model per task with its own backbone copy
  (``fmplex/baselines/single_family_task.py``: the same family code, Triton's
  dynamic batcher, 1 instance x 1 thread), all in one server;
- ``partitioned``: the same, each confined to 1/N of the machine (CFS quota).

Workloads per deployment, in an order rotated every repetition: saturation
(closed loop, ``--concurrency`` requests in flight per task) and a matched
load (open-loop Poisson at ``--matched`` x the raw limit, uniform mix; every
sent request counted, a failed one as the client timeout). Memory: PSS of
the server and its stubs with N tasks. Tasks in a memory budget: measured on
running servers (fmplex: tasks deployed into the live host in chunks, each
answering once; isolated: models loaded one by one), until the budget or a
wall-clock limit (a count cut short by the clock is a lower bound and says so).

Writes perf/results/vision_series_bench.json and prints a markdown table
(docs/benchmarks.md). ``--quick``: 2 repetitions, a 2 GiB budget with 120 s per
budget run, labelled as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmplex import registry  # noqa: E402
from fmplex.control import serving, workflows  # noqa: E402
from fmplex.control.server import TritonProcess, free_ports  # noqa: E402
from fmplex.control.triton_api import Triton  # noqa: E402
from perf import deployments as dep  # noqa: E402
from perf.budget import grow_until_budget, load_until_budget  # noqa: E402
from perf.common import cpu_seconds, machine_header, process_tree, server_memory, timed_rate, write_results  # noqa: E402
from perf.load import Arrival, Driver, Target, poisson, rotations, spread, summarize  # noqa: E402
from perf.report import aggregate  # noqa: E402

DEPLOYMENTS = ("fmplex", "isolated", "partitioned")
WORKLOADS = ("saturation", "matched_uniform")
SHIM = "from fmplex.baselines.single_family_task import TritonPythonModel  # noqa: F401\n"


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class FamilyBench:
    """What differs between the two families in this benchmark."""

    name: str
    backbone: str  # catalog name (fmplex init --backbone)
    kind: str  # the kind of every task
    input: str  # the request's input
    output: str  # the output the driver asks for
    baseline_io: str  # the isolated model's config inputs and outputs

    def payloads(self) -> list[Any]:
        """One request's row each: a PNG (vision) or a float32 window (series)."""
        if self.name == "vision":
            from fmplex.families.vision.demo_data import digit_images  # noqa: PLC0415

            return digit_images(64, (0, 1, 2, 3))[0]
        from fmplex.families.timeseries.demo_data import series  # noqa: PLC0415

        rows = []
        for name in ("sunspots", "elnino", "co2"):
            s = series(name)
            s = s[np.isfinite(s)]
            rows += [np.ascontiguousarray(s[i * 8 : i * 8 + 240], dtype=np.float32) for i in range(8)]
        return rows


VISION = FamilyBench("vision", "efficientnet", "classifier", "IMAGE", "LOGITS", """input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true } ]
output [
  { name: "LOGITS" data_type: TYPE_FP32 dims: [ -1, -1 ] },
  { name: "LABEL" data_type: TYPE_STRING dims: [ -1 ] }
]""")
SERIES = FamilyBench("series", "fracast", "forecast", "SERIES", "FORECAST", """input [ { name: "SERIES" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true } ]
output [
  { name: "FORECAST" data_type: TYPE_FP32 dims: [ -1, -1 ] },
  { name: "QUANTILES" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] }
]""")
BENCHES = {"vision": VISION, "series": SERIES}


class FamilyDriver(Driver):
    """perf/load.py's driver sending image or series rows instead of sentences."""

    def __init__(self, target: Target, bench: FamilyBench, payloads: Sequence[Any], timeout_s: float) -> None:
        super().__init__(target, ["unused"], timeout_s=timeout_s)
        self.bench = bench
        self.payloads = list(payloads)

    def _request(self, size: int, k: int) -> list:
        rows = [self.payloads[(k + i) % len(self.payloads)] for i in range(size)]
        if self.bench.input == "IMAGE":
            data = np.array(rows, dtype=np.object_)
            if self.target.batch_dim:
                data = data.reshape(1, -1)
            inp = self._grpc.InferInput("IMAGE", list(data.shape), "BYTES")
        else:  # one row per request: [1, T] is the vFM's [rows, T] and the batcher's [batch, T] alike
            data = np.stack(rows).astype(np.float32)
            inp = self._grpc.InferInput("SERIES", list(data.shape), "FP32")
        inp.set_data_from_numpy(data)
        return [inp]


# --- the task every deployment serves ---------------------------------------------------


def source_task(bench: FamilyBench, work: Path) -> tuple[Path, registry.TaskEntry]:
    """One built task (trained classifier / forecaster) that every deployment clones: its version dir and entry."""
    repo = work / f"{bench.name}-source"
    workflows.init_repository(repo, [bench.backbone], slots=4)
    if bench.name == "vision":
        from fmplex.families.vision.demo_data import write_digits_folder  # noqa: PLC0415

        folder = write_digits_folder(work / "digits", 40, (0, 1, 2, 3))
        entry = workflows.create_task(repo, "src", bench.backbone, "classifier", {"train_csv": folder})
    else:
        entry = workflows.create_task(repo, "src", bench.backbone, "forecast", {"horizon": 24})
    return repo / "src" / str(entry.version), entry


def clone_tasks(repo: Path, names: list[str], vdir: Path, entry: registry.TaskEntry) -> None:
    """Copies of the source artifact as registry tasks (not deployed), as ``fmplex task create`` leaves them."""
    with registry.editing(repo) as reg:
        for name in names:
            shutil.copytree(vdir, repo / name / str(entry.version), dirs_exist_ok=True)
            reg.tasks[name] = dataclasses.replace(entry, name=name, slot=None, deployed_version=None, weight=1.0)


def fmplex_repo(bench: FamilyBench, work: Path, names: list[str], vdir: Path, entry: registry.TaskEntry, slots: int = 64,
                workers: str = "auto") -> Path:
    """The N tasks deployed on one host; ``workers``: batches the host runs at once ("auto": one per core, as
    ``make bench`` runs the text host, so the host may use the cores the per-task baselines use)."""
    repo = work / "fmplex-repo"
    workflows.init_repository(repo, [bench.backbone], slots=slots)
    config = repo / registry.load(repo).hosts[bench.backbone].model / "config.pbtxt"
    old = 'parameters { key: "workers" value { string_value: "1" } }'
    assert old in config.read_text(), "the host config's workers parameter moved"
    config.write_text(config.read_text().replace(old, f'parameters {{ key: "workers" value {{ string_value: "{workers}" }} }}'))
    clone_tasks(repo, names, vdir, entry)
    if names:
        workflows.deploy(repo, names)
    return repo


def baseline_repo(bench: FamilyBench, work: Path, names: list[str], vdir: Path, partitioned: bool, device: str = "cpu") -> Path:
    """One model per task with its own backbone copy (1 instance x 1 thread, dynamic batcher, batch 16)."""
    repo = work / "baseline-repo"
    parts = dep.partitions(len(names), device) if partitioned else [None] * len(names)
    for name, part in zip(names, parts):
        art = work / "baseline-artifacts" / name / "1"
        shutil.copytree(vdir, art, dirs_exist_ok=True)
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.py").write_text(SHIM)
        params = {"artifact": str(art), "torch_threads": "1", "device": device}
        if part is not None:
            params |= {"cpu_quota": f"{part.cpu_quota:g}", "cpu_cores": ",".join(map(str, part.cpu_cores))}
        ptext = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
        (repo / name / "config.pbtxt").write_text(f"""# Baseline written by perf/bench_vision_series.py: task '{name}' alone on its own {bench.backbone} copy.
name: "{name}"
backend: "python"
max_batch_size: 16
dynamic_batching {{ }}
{bench.baseline_io}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{ptext}
""")
    return repo


# --- measurements -----------------------------------------------------------------------


def raw_limit(bench: FamilyBench, vdir: Path, payloads: list[Any], seconds: float) -> dict[str, float]:
    """Rows/s of the family's batched pass in this process (1 torch thread), by batch size."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    if bench.name == "vision":
        from fmplex.families.vision.family import VisionFamily  # noqa: PLC0415

        fam: Any = VisionFamily()
        task = fam.load_task(vdir)
        rows = [fam.decode(np.array([p], dtype=np.object_), None) for p in payloads[:16]]
        batches = {b: [(task, np.concatenate(rows[:b]))] for b in (1, 8, 16)}
    else:
        from fmplex.families.timeseries.family import SeriesFamily  # noqa: PLC0415

        fam = SeriesFamily()
        task = fam.load_task(vdir)
        batches = {b: [(task, fam.decode(task, np.stack(payloads[:b])))] for b in (1, 16, 64) if b <= len(payloads)}
    return {f"batch_{b}": timed_rate(lambda items=items: fam.run_batch(items), b, seconds)["rows_per_s"] for b, items in batches.items()}


def start(kind: str, bench: FamilyBench, work: Path, names: list[str], vdir: Path, entry: registry.TaskEntry) -> tuple[TritonProcess, Target]:
    ports = free_ports()
    work.mkdir(parents=True, exist_ok=True)
    if kind == "fmplex":
        repo = fmplex_repo(bench, work, names, vdir, entry)
        proc = serving.start(repo, ports, log_path=work / "fmplex.log")
        return proc, Target(kind, f"127.0.0.1:{ports.grpc}", {t: t for t in names}, output=bench.output)
    repo = baseline_repo(bench, work, names, vdir, partitioned=kind == "partitioned")
    proc = dep.start(repo, ports, names, work / f"{kind}.log")
    return proc, Target(kind, f"127.0.0.1:{ports.grpc}", {t: t for t in names}, batch_dim=True, output=bench.output)


def line(k: str, s: dict[str, Any]) -> str:
    return (f"   {k:<16} offered {s['offered_rps']:6.1f}, served {s['throughput_rps']:6.1f} req/s, failed {s['failed']}, "
            f"p50 {s['p50_ms']:7.1f} p99 {s['p99_ms']:7.1f} ms, memory {s.get('memory_mib', float('nan')):6.0f} MiB PSS")


def run_deployment(kind: str, bench: FamilyBench, work: Path, names: list[str], vdir: Path, entry: registry.TaskEntry,
                   payloads: list[Any], matched: float, cfg: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc, target = start(kind, bench, work, names, vdir, entry)
    up = time.perf_counter() - t0
    log(f"== {bench.name} {kind}: {len(names)} tasks, up in {up:.1f} s")
    res: dict[str, Any] = {"startup_s": up}
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        driver = FamilyDriver(target, bench, payloads, cfg.timeout)
        try:
            driver.closed_loop({t: 1 for t in names}, 2.0)  # warm-up
            d = cfg.duration
            pids = process_tree(pid)
            c0, w0 = cpu_seconds(pids), time.perf_counter()
            sat = summarize(driver.closed_loop({t: cfg.concurrency for t in names}, d), (0.5, d), timeout_s=cfg.timeout)
            c1, span = cpu_seconds(pids), time.perf_counter() - w0
            sat["memory_mib"] = server_memory(pid)["pss_mib"]
            res["saturation"] = sat
            # Where the cores went while saturated (1.0 = one core busy): the model processes and Triton's front end.
            # On a shared machine, N model processes get more of it than one host process: a cause to read beside the rates.
            res["cpu_cores_busy"] = {"models": sum(c1.get(p, 0) - c0.get(p, 0) for p in pids if p != pid and p in c0) / span,
                                     "triton_frontend": (c1.get(pid, 0) - c0.get(pid, 0)) / span}
            log(line("saturation", sat) + "; cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in res["cpu_cores_busy"].items()))
            s = summarize(driver.open_loop(poisson(matched, d, names, seed=7)), (0.0, d), timeout_s=cfg.timeout)
            s["memory_mib"] = server_memory(pid)["pss_mib"]
            res["matched_uniform"] = s
            log(line("matched uniform", s))
            res["memory"] = server_memory(pid)
        finally:
            driver.close()
    finally:
        proc.stop()
        if kind == "partitioned":
            dep.remove_partitions()
    return res


def _answer_once(bench: FamilyBench, url: str, names: list[str], payload: Any, timeout_s: float = 300.0) -> int:
    """One request per task, all in flight together; how many failed."""
    target = Target("budget", url, {n: n for n in names}, output=bench.output)
    driver = FamilyDriver(target, bench, [payload], timeout_s)
    try:
        recs = driver.open_loop([Arrival(0.0, n, 1) for n in names])
    finally:
        driver.close()
    return sum(r.latency_s is None for r in recs) + max(0, len(names) - len(recs))


def budget_fmplex(bench: FamilyBench, work: Path, vdir: Path, entry: registry.TaskEntry, payload: Any, budget_mib: float,
                  wall_s: float, step: int, slots: int) -> dict[str, Any]:
    """Deploy clones into the running host in chunks (each answering once) until the budget, the slots or the clock."""
    repo = fmplex_repo(bench, work / "budget-fmplex", [], vdir, entry, slots=slots)
    ports = free_ports()
    proc = serving.start(repo, ports, log_path=work / "budget-fmplex.log")
    url = f"127.0.0.1:{ports.grpc}"
    unanswered = 0
    try:
        assert proc.proc is not None
        pid = proc.proc.pid
        with Triton(url, timeout=300) as triton:

            def add(fitted: int) -> int | str:
                nonlocal unanswered
                if fitted >= slots:
                    return f"slot pool of one host ({slots})"
                chunk = [f"v{i:05d}" for i in range(fitted, min(fitted + step, slots))]
                clone_tasks(repo, chunk, vdir, entry)
                workflows.deploy(repo, chunk, triton=triton, check=False)
                unanswered += _answer_once(bench, url, chunk, payload)
                return fitted + len(chunk)

            res = grow_until_budget(add, lambda: server_memory(pid)["pss_mib"], budget_mib, wall_s, log,
                                    lambda n, mem: f"   fmplex budget: {n:5d} tasks, {mem:7.0f} MiB PSS")
    finally:
        proc.stop()
    return {**res, "unanswered": unanswered}


def budget_isolated(bench: FamilyBench, work: Path, vdir: Path, budget_mib: float, wall_s: float, limit: int) -> dict[str, Any]:
    """Load one-copy-per-task models one by one until the budget or the clock."""
    names = dep.task_names(limit, "b")
    repo = baseline_repo(bench, work / "budget-iso", names, vdir, partitioned=False)
    return load_until_budget(repo, names, work / "budget-isolated.log", budget_mib, wall_s, log, "isolated budget")


# --- one family -------------------------------------------------------------------------


def bench_family(bench: FamilyBench, work: Path, cfg: argparse.Namespace) -> dict[str, Any]:
    vdir, entry = source_task(bench, work)
    payloads = bench.payloads()
    names = dep.task_names(cfg.tasks)
    runs: list[dict[str, Any]] = []
    for r, order in enumerate(rotations(list(cfg.only), cfg.repetitions)):
        raw = raw_limit(bench, vdir, payloads, cfg.raw_seconds)
        matched = round(cfg.matched * max(raw.values()), 1)
        log(f"== {bench.name} repetition {r + 1}/{cfg.repetitions}: raw " + ", ".join(f"{k} {v:.1f}" for k, v in raw.items())
            + f" rows/s; matched load {matched} req/s; order {' > '.join(order)}")
        run: dict[str, Any] = {"repetition": r + 1, "order": order, "raw": raw, "raw_limit_rps": max(raw.values()),
                               "matched_load_rps": matched, "deployments": {}}
        for d in order:
            run["deployments"][d] = run_deployment(d, bench, work / f"{bench.name}-{d}-r{r + 1}", names, vdir, entry, payloads, matched, cfg)
        runs.append(run)
    out: dict[str, Any] = {"tasks": cfg.tasks, "kind": bench.kind, "runs": runs, "summary": summarize_runs(runs, cfg.only)}
    if not cfg.skip_budget:
        log(f"== {bench.name}: tasks in a {cfg.budget_mib / 1024:g} GiB budget (measured; wall-clock limit {cfg.budget_wall_s:.0f} s each)")
        out["budget"] = {
            "budget_mib": cfg.budget_mib,
            "fmplex": budget_fmplex(bench, work, vdir, entry, payloads[0], cfg.budget_mib, cfg.budget_wall_s, cfg.budget_step, cfg.budget_slots),
            "isolated": budget_isolated(bench, work, vdir, cfg.budget_mib, cfg.budget_wall_s, limit=64),
        }
    return out


def summarize_runs(runs: list[dict[str, Any]], deployments: Sequence[str]) -> dict[str, Any]:
    """Medians over the repetitions with [min, max] (perf/report.py's aggregate), per deployment and workload."""
    raw = spread([r["raw_limit_rps"] for r in runs])
    return {"raw_limit_rps": {"median": raw["median"], "range": [raw["min"], raw["max"]]},
            **{d: {w: aggregate(runs, d, w) for w in WORKLOADS} for d in deployments}}


def render_markdown(family: str, res: dict[str, Any], header: dict[str, Any]) -> str:
    """The docs/benchmarks.md table of one family: median [min..max] over the repetitions."""
    s = res["summary"]
    raw = s["raw_limit_rps"]

    def cell(agg: dict[str, Any], f: str, spec: str) -> str:
        lo, hi = agg["range"][f]
        return f"{agg[f]:{spec}} [{lo:{spec}}..{hi:{spec}}]"

    lines = [f"**{family}** ({res['tasks']} {res['kind']} tasks, {len(res['runs'])} repetitions; raw batched pass "
             f"{raw['median']:.1f} [{raw['range'][0]:.1f}..{raw['range'][1]:.1f}] rows/s)", "",
             "| deployment | saturation req/s | cores its models got, saturated | matched: offered req/s | matched p50 ms | matched p99 ms | failed | memory, N tasks (MiB PSS) |",
             "|---|---|---|---|---|---|---|---|"]
    for d in (k for k in DEPLOYMENTS if k in s):
        sat, m = s[d]["saturation"], s[d]["matched_uniform"]
        cores = spread([r["deployments"][d].get("cpu_cores_busy", {}).get("models", float("nan")) for r in res["runs"]])["median"]
        lines.append(f"| {d} | {cell(sat, 'throughput_rps', '.1f')} | {cores:.2f} | {m['offered_rps']:.1f} | {cell(m, 'p50_ms', '.0f')} | "
                     f"{cell(m, 'p99_ms', '.0f')} | {sat['failed'] + m['failed']} | {cell(sat, 'memory_mib', '.0f')} |")
    b = res.get("budget")
    if b:
        for d in ("fmplex", "isolated"):
            x = b[d]
            bound = "" if x["budget_reached"] else " (lower bound: " + x["stopped_by"] + ")"
            lines.append(f"\nTasks in {b['budget_mib'] / 1024:g} GiB, {d}: **{x['tasks']}**{bound}; curve (tasks, MiB) "
                         + ", ".join(f"({n}, {mem:.0f})" for n, mem in x["curve"][:3]) + (" ..." if len(x["curve"]) > 3 else ""))
    lines.append(f"\nLoad average at start {header['load_average_at_start']} (machine shared with other work: contended figures).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, a 2 GiB budget, 120 s per budget run (says so in the results)")
    ap.add_argument("--families", default="vision,series", help="comma-separated: vision, series")
    ap.add_argument("--only", default=",".join(DEPLOYMENTS), help="comma-separated subset of deployments")
    ap.add_argument("--tasks", type=int, default=4, help="tasks per deployment (default 4)")
    ap.add_argument("--repetitions", type=int, help="repetitions, order rotated each time (default 3; quick 2)")
    ap.add_argument("--duration", type=float, help="seconds per workload (default 8)")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop requests in flight per task")
    ap.add_argument("--matched", type=float, default=0.45, help="matched offered load, fraction of the raw limit")
    ap.add_argument("--timeout", type=float, default=10.0, help="client timeout, s; a failed request counts as this")
    ap.add_argument("--budget-gib", type=float, help="memory budget for tasks in budget (default 8; quick 2)")
    ap.add_argument("--budget-wall-s", type=float, help="wall-clock limit of each budget run, s (default 600; quick 120)")
    ap.add_argument("--skip-budget", action="store_true")
    cfg = ap.parse_args()
    cfg.repetitions = cfg.repetitions or (2 if cfg.quick else 3)
    cfg.duration = cfg.duration or 8.0  # a saturated request takes seconds on a loaded 2-core machine: a shorter window sees few answers
    cfg.raw_seconds = 1.5 if cfg.quick else 4.0
    cfg.budget_mib = (cfg.budget_gib or (2.0 if cfg.quick else 8.0)) * 1024
    cfg.budget_wall_s = cfg.budget_wall_s or (120.0 if cfg.quick else 600.0)
    cfg.budget_step, cfg.budget_slots = (64, 1024) if cfg.quick else (256, 4096)
    cfg.only = [d for d in cfg.only.split(",") if d]
    if set(cfg.only) - set(DEPLOYMENTS):
        ap.error(f"unknown deployment(s); known: {', '.join(DEPLOYMENTS)}")
    families = [f for f in cfg.families.split(",") if f]
    if set(families) - set(BENCHES):
        ap.error(f"unknown family; known: {', '.join(BENCHES)}")
    import torch  # noqa: PLC0415

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (the finally blocks) when killed
    torch.set_num_threads(1)
    header = machine_header(quick=cfg.quick, fmplex_workers="auto", repetitions=cfg.repetitions, duration_s=cfg.duration, concurrency=cfg.concurrency,
                            matched_fraction=cfg.matched, timeout_ms=cfg.timeout * 1e3, when=time.strftime("%Y-%m-%d %H:%M:%S"))
    results: dict[str, Any] = {**header, "families": {}}
    work = Path(tempfile.mkdtemp(prefix="fmplex-vs-bench-"))
    t0 = time.perf_counter()
    try:
        for f in families:
            results["families"][f] = bench_family(BENCHES[f], work / f, cfg)
            write_results("vision_series_bench.json", results)  # after each family: a partial run still leaves its figures
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dep.remove_partitions()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = time.perf_counter() - t0
    write_results("vision_series_bench.json", results)
    for f, res in results["families"].items():
        print("\n" + render_markdown(f, res, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
