"""The library's import graph has no cycle: every import, at module level or inside a function,
read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "agentprune"


def module_name(path: Path) -> str:
    """``agentprune.pruning.catalog`` for ``.../agentprune/pruning/catalog.py``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, modules: set[str], here: str) -> set[str]:
    """The library modules a file imports anywhere in it (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``)."""
    out: set[str] = set()
    package = (
        here
        if (PACKAGE.parent / here.replace(".", "/") / "__init__.py").exists()
        else (here.rpartition(".")[0])
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                child = f"{base}.{alias.name}"
                if child in modules:
                    out.add(child)
                elif base in modules:
                    out.add(base)
    out.discard(here)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules it imports (package ``__init__`` files import nothing)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {
        name: imported(ast.parse(path.read_text(encoding="utf-8")), modules, name)
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    # steps imports torch-side modules inside its functions only.
    assert "agentprune.models" in graph["agentprune.steps"]
    assert "agentprune.pruning.registry" in graph["agentprune.pruning.methods"]


def test_the_library_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_registry_imports_no_method() -> None:
    graph = import_graph()
    methods = {"agentprune.pruning.methods", "agentprune.pruning.icbs.method"}
    methods.add("agentprune.agents.method")
    assert not graph["agentprune.pruning.registry"] & methods
    assert methods <= graph["agentprune.pruning.catalog"]
