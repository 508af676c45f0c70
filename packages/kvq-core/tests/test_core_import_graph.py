"""kvq_core's imports flow one way: read from the source with `ast` (every import, those inside functions
too), no cycle, no module importing a later layer, no private module of another package (`kvq_kernels._x`)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import kvq_core

SRC = Path(kvq_core.__file__).parent

#: Layers, lowest first: a module may import its own layer and those before it, never a later one.
LAYERS = (
    (
        "formats",
        (
            "__init__",
            "formats",
            "formats.stream",
            "formats.accounting",
            "formats.kv",
            "formats.methods",
            "splits",
            "provenance",
        ),
    ),
    ("quant", ("quant", "packing", "attention")),
    (
        "codecs",
        (
            "codec_base",
            "codecs_affine",
            "codecs_nuq",
            "codecs_fp8",
            "codecs_pq",
            "codecs_rotate",
            "codecs_lowrank",
            "codecs_vidkv",
            "codecs",
        ),
    ),
    ("caches", ("cache_tiers", "cache_staircase", "cache", "calibration_file")),
    (
        "transformers",
        ("hf_layer", "cache_xquant", "cache_minicache", "hf_cache", "calibration", "hf_peers", "eval", "models"),
    ),
    ("CLIs", ("cli_eval",)),
)
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def _module_name(path: Path, root: Path = SRC) -> str:
    """kvq_core-relative dotted name of a source file: cache.py -> "cache", formats/kv.py -> "formats.kv",
    formats/__init__.py -> "formats", __init__.py -> "__init__"."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; `from . import x` counts as `<package>.x`."""
    package = ["kvq_core", *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            out.append((node.lineno, base))
            # `from pkg import name` may name a submodule; each name is resolved against the known modules
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _sources(root: Path = SRC) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _graph(root: Path = SRC) -> dict[str, dict[str, int]]:
    """kvq_core module -> {imported module: line}, over every module of the package."""
    return {_module_name(p, root): dict((name, line) for line, name in _imports(p, root)) for p in _sources(root)}


def _own(name: str, modules: set[str]) -> str | None:
    """The kvq_core module an import names (the longest known prefix), or None for another package."""
    parts = name.split(".")
    if parts[0] != "kvq_core":
        return None
    for n in range(len(parts) - 1, 0, -1):
        if ".".join(parts[1 : n + 1]) in modules:
            return ".".join(parts[1 : n + 1])
    return "__init__"


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, .., a] along its edges, or None (graphlib finds it)."""
    try:
        TopologicalSorter(edges).prepare()  # reads each value as the key's predecessors: the path comes reversed
    except CycleError as e:
        return e.args[1][::-1]
    return None


def _edges(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    modules = set(graph)
    return {m: {o for name in deps if (o := _own(name, modules)) and o != m} for m, deps in graph.items()}


def _bad_imports(module: str, deps: dict[str, int]) -> list[str]:
    """Imports of another package's private modules (`kvq_kernels._launch`)."""
    return [
        f"kvq_core/{module}:{line} imports private {name}"
        for name, line in deps.items()
        if name.split(".")[0] not in ("kvq_core", "__future__") and any(p.startswith("_") for p in name.split(".")[1:])
    ]


def test_every_module_has_a_layer():
    assert sorted(set(_graph()) - set(LAYER)) == [], "place each new module in LAYERS"


def test_no_import_cycle():
    assert _cycle(_edges(_graph())) is None


def test_no_module_imports_a_later_layer():
    upward = [
        f"{m} ({LAYERS[LAYER[m]][0]}) imports {o} ({LAYERS[LAYER[o]][0]})"
        for m, deps in _edges(_graph()).items()
        for o in sorted(deps)
        if LAYER.get(o, -1) > LAYER.get(m, len(LAYERS))
    ]
    assert upward == []


def test_no_private_module_of_another_package():
    assert [b for m, deps in _graph().items() for b in _bad_imports(m, deps)] == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """Imports inside functions, relative ones and ones in a subpackage are seen and resolved, private
    modules of other packages named; the cycle search finds a 3-cycle and a cycle through lazy imports."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("def g():\n    from kvq_kernels._launch import interpreting\n    from . import b\n")
    (tmp_path / "b.py").write_text("from .sub.c import x\n")
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "sub" / "c.py").write_text("from .. import a\nfrom . import d\n")
    graph = _graph(tmp_path)
    assert graph["a"] == {
        "kvq_kernels._launch": 2,
        "kvq_kernels._launch.interpreting": 2,
        "kvq_core": 3,
        "kvq_core.b": 3,
    }
    assert _bad_imports("a.py", graph["a"]) == [
        "kvq_core/a.py:2 imports private kvq_kernels._launch",
        "kvq_core/a.py:2 imports private kvq_kernels._launch.interpreting",
    ]
    assert _edges(graph) == {"a": {"__init__", "b"}, "b": {"sub.c"}, "sub": set(), "sub.c": {"__init__", "a", "sub"}}
    assert _cycle(_edges(graph)) == ["a", "b", "sub.c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None
