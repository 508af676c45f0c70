"""kvq_sim's imports flow one way: read from the source with `ast` (every import, those inside functions too),
no cycle, no module importing a later layer, no private module of another package, no torch or triton."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import kvq_sim

SRC = Path(kvq_sim.__file__).parent

#: Layers, lowest first: a module may import its own layer and those before it, never a later one.
LAYERS = (
    ("base", ("__init__", "errors", "configs", "files", "fitting")),
    ("descriptions", ("models", "weightgemv", "recipes", "hardware", "grids", "measurements", "engines", "deployment")),
    ("cost model", ("memory", "latency", "multigpu")),
    ("planner", ("planner", "provenance", "api")),
    ("calibration", ("calibrate", "validate", "published", "fitpresets")),
    ("output", ("render", "report_data", "figures", "report", "cli")),
)
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
#: kvq-sim runs without torch (the CLI starts instantly); kvq_kernels imports torch when imported
FORBIDDEN = ("torch", "triton", "kvq_kernels")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; `from . import x` counts as kvq_sim.x."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "kvq_sim" + (f".{node.module}" if node.module else "") if node.level else node.module
            out.append((node.lineno, base))
            # `from pkg import name` may name a submodule: kvq_sim's own are known, others are checked by name
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if not node.module or node.level == 0]
    return out


def _graph() -> dict[str, dict[str, int]]:
    """kvq_sim module -> {imported module: line}, over every module of the package."""
    return {p.stem: dict((name, line) for line, name in _imports(p)) for p in sorted(SRC.glob("*.py"))}


def _own(name: str) -> str | None:
    """The kvq_sim module an import names, or None for another package."""
    parts = name.split(".")
    if parts[0] != "kvq_sim":
        return None
    return parts[1] if len(parts) > 1 and (SRC / f"{parts[1]}.py").is_file() else "__init__"


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, .., a] along its edges, or None (graphlib finds it)."""
    try:
        TopologicalSorter(edges).prepare()  # reads each value as the key's predecessors: the path comes reversed
    except CycleError as e:
        return e.args[1][::-1]
    return None


def _edges() -> dict[str, set[str]]:
    return {m: {o for name in deps if (o := _own(name)) and o != m} for m, deps in _graph().items()}


def test_every_module_has_a_layer():
    assert sorted(set(_graph()) - set(LAYER)) == [], "place each new module in LAYERS"


def test_no_import_cycle():
    assert _cycle(_edges()) is None


def test_no_module_imports_a_later_layer():
    upward = [
        f"{m} ({LAYERS[LAYER[m]][0]}) imports {o} ({LAYERS[LAYER[o]][0]})"
        for m, deps in _edges().items()
        for o in sorted(deps)
        if LAYER.get(o, -1) > LAYER.get(m, len(LAYERS))
    ]
    assert upward == []


def _bad_imports(module: str, deps: dict[str, int]) -> list[str]:
    """Imports of torch, triton or kvq_kernels, and of another package's private modules (`kvq_core._x`)."""
    bad = []
    for name, line in deps.items():
        parts = name.split(".")
        if parts[0] in FORBIDDEN:
            bad.append(f"kvq_sim/{module}.py:{line} imports {name} (kvq-sim imports no torch, triton or kvq_kernels)")
        elif parts[0] not in ("kvq_sim", "__future__") and any(p.startswith("_") for p in parts[1:]):
            bad.append(f"kvq_sim/{module}.py:{line} imports private {name}")
    return bad


def test_no_private_module_of_another_package_and_no_torch():
    assert [b for m, deps in _graph().items() for b in _bad_imports(m, deps)] == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """Imports inside functions and relative ones are seen, bad ones named; the cycle search finds a 3-cycle."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from kvq_core import _quant\n    from . import api\n    import triton.language\n")
    deps = {name: line for line, name in _imports(f)}
    assert list(deps) == ["kvq_core", "kvq_core._quant", "kvq_sim", "kvq_sim.api", "triton.language"]
    assert _bad_imports("m", deps) == [
        "kvq_sim/m.py:2 imports private kvq_core._quant",
        "kvq_sim/m.py:4 imports triton.language (kvq-sim imports no torch, triton or kvq_kernels)",
    ]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None
