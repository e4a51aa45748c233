"""No import cycles among llmos modules. Read from the source with ast, so an import inside
a function (the usual way a cycle is hidden) counts as much as one at the top.
`from llmos.x import y` is an edge to llmos.x.y when that is a module, else to llmos.x;
importing llmos.x.y is not counted as importing the package llmos.x (its __init__ is then
already being imported, so it closes no cycle)."""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "llmos"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> dict[str, int]:
    """The llmos modules that `module` imports, each with the line of its first import."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    out: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name == "llmos" or name.startswith("llmos."):
            out.setdefault(name, line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    paths = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    return {m: imports_of(p.read_text(), m, p.name == "__init__.py", set(paths)) for m, p in paths.items()}


def cycles(graph: dict[str, dict]) -> list[tuple[list[str], list[str]]]:
    """Per group of modules that import each other (a strongly connected component): its
    members, and one shortest cycle through them (first module repeated at the end)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:   # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(sorted(g), _shortest_cycle(graph, min(g), g)) for g in groups]


def _shortest_cycle(graph: dict[str, dict], start: str, group: set[str]) -> list[str]:
    came_from: dict[str, str] = {}
    todo = deque([start])
    while todo:
        v = todo.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w in group and w not in came_from:
                came_from[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n  ".join(steps)


def test_the_graph_was_read():
    graph = import_graph()
    assert "llmos.cli.jobs" in graph["llmos.cli.main"]            # from llmos.cli.jobs import jobs
    assert "llmos.protocol" in graph["llmos.kernel.core"]
    assert "llmos.client.sync_client" in graph["llmos.client"]   # from llmos.client.sync_client import Client


def test_imports_inside_functions_and_relative_ones_count():
    source = "from . import b\nfrom .c import X\n\ndef f():\n    from llmos.p import d\n    import llmos.p.e\n"
    modules = {"llmos.p", "llmos.p.a", "llmos.p.b", "llmos.p.c", "llmos.p.d", "llmos.p.e"}
    assert imports_of(source, "llmos.p.a", False, modules) == {"llmos.p.b": 1, "llmos.p.c": 2, "llmos.p.d": 5,
                                                               "llmos.p.e": 6}


def test_the_cycle_finder():
    graph = {"a": {"b": 1}, "b": {"c": 1, "a": 2}, "c": {"a": 3}, "d": {"d": 1}, "e": {"a": 1}}
    assert sorted(cycles(graph)) == [(["a", "b", "c"], ["a", "b", "a"]), (["d"], ["d", "d"])]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles among llmos modules:\n" + "\n".join(
        f"- {' -> '.join(c)}\n  {describe(graph, c)}" + (f"\n  (the group: {', '.join(g)})" if len(g) > 2 else "")
        for g, c in found)
