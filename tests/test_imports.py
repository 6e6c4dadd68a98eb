"""The package's import graph has no cycles: every import counts, at the top of a module or inside a function
(a lazy import that dodges a cycle at run time still ties the two modules together), TYPE_CHECKING ones too."""

from __future__ import annotations

import ast
from pathlib import Path

import show_attend_tell

PACKAGE = Path(show_attend_tell.__file__).parent
NAME = "show_attend_tell"


def module_name(path: Path, package: Path) -> str:
    """show_attend_tell/x/y.py -> show_attend_tell.x.y; a package's __init__.py -> the package."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its file}."""
    files = {module_name(path, package): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import name` imports the submodule `name` when there is one, else the package
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # import a.b.c of a module a.b: the edge is to a.b
                    target = target.rpartition(".")[0]
                if target.startswith(NAME) and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles_through_lazy_imports(tmp_path):
    package = tmp_path / NAME
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("import math\n")
    (package / "a.py").write_text("from show_attend_tell.low import x\nfrom show_attend_tell import b\n")
    (package / "b.py").write_text("def f():\n    from show_attend_tell.a import y\n")  # the lazy import
    graph = import_graph(package)
    assert graph[f"{NAME}.a"] == {f"{NAME}.low", f"{NAME}.b"} and graph[f"{NAME}.b"] == {f"{NAME}.a"}
    assert find_cycle(graph) == [f"{NAME}.a", f"{NAME}.b", f"{NAME}.a"]
    (package / "b.py").write_text("def f():\n    from . import low\n")
    assert find_cycle(import_graph(package)) is None


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert f"{NAME}.model" in graph and f"{NAME}.decoder" in graph[f"{NAME}.model"]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
