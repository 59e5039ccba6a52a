"""The package's import graph: every module imports, no import cycle, and scoring never depends on training.

The graph is read from the source with ``ast`` (every ``import``/``from ... import`` anywhere in a module,
including the ones inside functions, which still make one module need the other), so a cycle hidden behind
a lazy import counts. Command: ``.venv/bin/pytest -q tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "artifactqc"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: {intra-package modules it imports}}`` (a package counts as its ``__init__``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                # "from . import x" / "from .pkg import mod": the names may be modules themselves
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # "artifactqc.io.load_volume" -> "artifactqc.io"
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("artifactqc"):
                    graph[mod].add(t)
    # importing a submodule runs its parent packages' __init__ first; they are not edges of the module itself
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_reader_sees_lazy_imports():
    g = {"a": {"b"}, "b": {"a"}}
    assert find_cycle(g) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "artifactqc.io" in graph["artifactqc.cohort"]  # a top-level relative import
    assert "artifactqc.provenance" in graph["artifactqc.cohort"]  # an import inside a function


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_package_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_scoring_does_not_depend_on_training():
    graph = import_graph()
    scoring = [m for m in graph if m == "artifactqc.encoder" or m.startswith("artifactqc.encoder.")]
    assert scoring, "no artifactqc.encoder package"
    bad = {}
    for m in scoring:  # directly or through any other module
        seen, todo = set(), [m]
        while todo:
            for t in graph[todo.pop()] - seen:
                seen.add(t)
                todo.append(t)
        bad[m] = sorted(t for t in seen if t.startswith("artifactqc.training"))
    assert not any(bad.values()), f"scoring modules depend on training code: {bad}"
