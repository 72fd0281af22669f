"""The import graph of ``src/stargz``, read from the source with ``ast`` (never by importing).

Every ``import`` and ``from ... import`` counts wherever it stands, at module level, inside a
function, or under ``if TYPE_CHECKING:``, since those are exactly how a cycle or a wrong-way
arrow gets hidden rather than removed. An edge goes to the most specific module that exists
(``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``); a package is its
``__init__``. Used by tests/test_import_cycles.py and tests/test_layering.py.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first import}


def module_files(src: Path, package: str = "stargz") -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path, package: str = "stargz") -> Graph:
    """Module -> modules of ``package`` it imports (anywhere in its source)."""
    modules = module_files(src, package)
    graph: Graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, modules) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = here
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in modules else _known(base, modules))
            else:
                continue
            for t in targets:
                if t is not None and t != name:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(graph: Graph, component: list[str]) -> str:
    """One concrete loop through ``component``: ``a (line 3) -> b (line 9) -> a``."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                path.reverse()
                path.append(start)
                return " -> ".join(
                    f"{a} (line {graph[a][b]})" if b else a
                    for a, b in zip(path, [*path[1:], ""], strict=True)
                )
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle")
