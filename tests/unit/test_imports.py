"""The shape of the package: every module imports, no import cycles, serving code stays off the control plane.

The import graph is read from the source with ``ast`` and holds every import,
also those inside functions (a lazy import still runs, later): a cycle held
together by import order, or a host that reaches ``fmplex.control`` through a
function-level import, is caught here, not in a server.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fmplex"

# What a host's Python stub imports: the model.py shims of the Python-based
# backends point at these modules (fmplex/control/server.py writes them).
HOST_MODULES = [
    "fmplex.triton_backend.host",
    "fmplex.generative.generate_host",
    "fmplex.multimodal.lm_host",
    "fmplex.multimodal.encode_host",
    "fmplex.baselines.monolithic",
    "fmplex.baselines.single_task",
    "fmplex.families.vision.host",
    "fmplex.families.timeseries.host",
]
# The control plane: the CLI and the control-side family modules. The family
# subpackages (fmplex.families.vision, .timeseries) hold serving code too.
CONTROL_PLANE = (
    "fmplex.control",
    "fmplex.families.base",
    "fmplex.families.encoder",
    "fmplex.families.generative",
    "fmplex.families.multimodal",
    "fmplex.families.triton_config",
    "fmplex.families.single_host",
    "fmplex.families.vision_control",
    "fmplex.families.series_control",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, level: int, here: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(name: str) -> set[str]:
    """The fmplex modules ``name`` imports anywhere in its source."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            targets = [f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in MODULES else mod for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # "fmplex.a.b.attr" -> the module that holds it
                target = target.rpartition(".")[0]
            if target and target != "fmplex" and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_graph_sees_imports() -> None:
    """The parser finds what is there (a graph without edges would pass every test below)."""
    assert "fmplex.registry" in GRAPH["fmplex.triton_backend.host"]
    assert "fmplex.control.workflows" in GRAPH["fmplex.control.cli"]
    assert "fmplex.families.base" in GRAPH["fmplex.families.encoder"]  # relative import
    assert "fmplex.control.triton_api" in GRAPH["fmplex.control.workflows"]  # function-level import


def _needs_triton_stub(name: str, seen: set[str] | None = None) -> bool:
    """The module, or a module it imports at import time, imports the stub's utilities."""
    seen = set() if seen is None else seen
    seen.add(name)
    if "triton_python_backend_utils" in MODULES[name].read_text(encoding="utf-8"):
        return True
    return any(_needs_triton_stub(m, seen) for m in module_level_imports_of(name) if m not in seen)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name: str) -> None:
    if _needs_triton_stub(name):
        pytest.skip("imports triton_python_backend_utils, which exists only inside a Triton stub process")
    importlib.import_module(name)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_inside_fmplex() -> None:
    assert strongly_connected(GRAPH) == []


def module_level_imports_of(name: str) -> set[str]:
    """The fmplex modules ``name`` imports when it is imported (not those inside its functions)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else ():
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("fmplex")}
            elif isinstance(sub, ast.ImportFrom):
                base = _resolve(sub.module or "", sub.level, name, path.name == "__init__.py")
                if base.startswith("fmplex"):
                    found.add(base)
                    found |= {f"{base}.{a.name}" for a in sub.names if f"{base}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES}


def parent_packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


# The family objects (VisionFamily, SeriesFamily) serve and build: a host
# calls their decode/load_task/run_batch, the control plane their build_task,
# which imports the importers and trainers inside that method only. These
# edges are the builders'; the host never takes them.
BUILDER_EDGES = {
    "fmplex.families.vision.family": {"fmplex.families.vision.importers", "fmplex.families.vision.train"},
    "fmplex.families.timeseries.family": {"fmplex.families.timeseries.importers", "fmplex.families.timeseries.train"},
}


def serving_edges(name: str) -> set[str]:
    return GRAPH[name] - BUILDER_EDGES.get(name, set())


def serving_modules() -> set[str]:
    """Everything a host's stub process imports: the host modules, the runtime package, and all they import.

    Importing a module runs its parent packages' ``__init__`` too; of those,
    only the module-level imports count (``fmplex.families`` imports its
    families lazily, inside functions a host never calls)."""
    todo = [m for m in HOST_MODULES if m in MODULES] + [m for m in MODULES if m == "fmplex.runtime" or m.startswith("fmplex.runtime.")]
    seen: set[str] = set()
    parents: set[str] = set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(serving_edges(m))
            for p in parent_packages(m):
                if p not in parents and p not in seen:
                    parents.add(p)
                    todo.extend(module_level_imports_of(p))
    return seen | parents


def test_serving_code_imports_no_control_plane() -> None:
    serving = serving_modules()
    assert "fmplex.triton_backend.host" in serving and "fmplex.registry" in serving
    assert "fmplex.families.vision.host" in serving and "fmplex.families.timeseries.host" in serving
    assert "fmplex.families" in serving  # the package __init__ runs, but imports no family module at import time
    leaks = {m: sorted(d for d in (module_level_imports_of(m) if m == "fmplex.families" else serving_edges(m)) if d.startswith(CONTROL_PLANE)) for m in serving}
    assert {m: d for m, d in leaks.items() if d} == {}
    assert not [m for m in serving if m.startswith(CONTROL_PLANE)]
