"""What every benchmark here shares: the results folder and perf_analyzer inputs."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, results: Any, folder: Path = RESULTS) -> Path:
    """perf/results/<name> (or ``folder``/<name>) as indented JSON; prints where it went."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"== written {out}")
    return out


def text_input_file(path: Path, texts: list[str]) -> Path:
    """A perf_analyzer --input-data file with one TEXT request of these rows
    (BYTES inputs need real text: random bytes are not UTF-8)."""
    from fmplex.control.perf import text_input_file as write  # noqa: PLC0415

    return write(path, texts)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (tritonserver and its stub processes)."""
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        pids += [int(k) for k in kids]
        frontier += [int(k) for k in kids]
    return pids


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds so far of each live process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def server_memory(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) of tritonserver and every descendant (the stubs)."""
    pids = process_tree(pid)
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return {"processes": len(pids), "rss_mib": rss / 1024, "pss_mib": pss / 1024}


def timed_rate(fn: Callable[[], Any], rows: int, seconds: float) -> dict[str, Any]:
    """Median time of ``fn`` (``rows`` rows per call) after one warm-up call, repeated for
    ``seconds`` and at least 3 times; rows per second at that median."""
    fn()
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"rows": rows, "calls": len(times), "median_ms": round(med * 1e3, 2), "rows_per_s": round(rows / med, 1)}


def machine_header(**extra: Any) -> dict[str, Any]:
    """What every results file starts with: the machine, torch's threads and the load when it began
    (the machines are shared, so the load says how contended the figures are)."""
    import torch  # noqa: PLC0415

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], **extra}  # fmt: skip


def tiny_stages(backbone: str) -> tuple[Any, Any]:
    """The encode and lm stages of a tiny multimodal backbone, written to a scratch directory and
    loaded as the stage hosts load them (one torch thread): ``(EncodeStage, LMStage)``."""
    import tempfile  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from fmplex.multimodal import models  # noqa: PLC0415
    from fmplex.multimodal.stages import EncodeStage, LMStage  # noqa: PLC0415

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"encode": Path(tmp) / "encode", "lm": Path(tmp) / "lm"}
        models.write_stages(backbone, dirs)
        return EncodeStage(models.read_stage(dirs["encode"], "encode")), LMStage(models.read_stage(dirs["lm"], "lm"))
