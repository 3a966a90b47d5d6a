"""The shape of the package: which part of ``offramp`` imports which.

A part is a subpackage (``offramp.ops``, ``offramp.deployments``, ...) or a top-level module
(``offramp.cli``, ``offramp.errors``, ...). The graph of parts must stay acyclic, so each part
can be read, tested and changed from the bottom up; and the benches (``offramp.bench``) are
a leaf: only the command line reaches them, by name through ``offramp.cli.COMMAND_MODULES``.
Every import statement counts, at module level or inside a function: a lazy import still
ties the two parts together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import offramp

ROOT = Path(offramp.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``offramp/``."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _part(module: str) -> str:
    """``offramp.ops.engine`` -> ``offramp.ops``; ``offramp.cli`` -> ``offramp.cli``."""
    return ".".join(module.split(".")[:2])


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``offramp`` modules (or packages) that ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from offramp import bench` imports the module offramp.bench, not a name of offramp
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m == "offramp" or m.startswith("offramp.")}


def package_graph() -> dict[str, dict[str, set[str]]]:
    """part -> {part it imports: the modules of the first that import the second}."""
    modules = _modules()
    graph: dict[str, dict[str, set[str]]] = {_part(m): {} for m in modules}
    for module, path in modules.items():
        for target in _imported(module, path, modules):
            if _part(target) != _part(module):
                graph[_part(module)].setdefault(_part(target), set()).add(module)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as ``[a, b, ..., a]``, or None when it is acyclic."""
    state: dict[str, str] = {}  # node -> "open" (on the current path) or "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b", "c"}}) == ["b", "b"]


def test_package_graph_is_acyclic():
    graph = package_graph()
    assert {"offramp.ops", "offramp.deployments", "offramp.bench", "offramp.cli"} <= set(graph)
    cycle = find_cycle({part: set(deps) for part, deps in graph.items()})
    if cycle:
        why = "\n".join(f"  {a} -> {b}: imported by {', '.join(sorted(graph[a][b]))}"
                        for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle between offramp's parts: {' -> '.join(cycle)}\n{why}")


def test_only_the_command_line_reaches_the_benches():
    importers = {part: sorted(deps["offramp.bench"]) for part, deps in package_graph().items()
                 if "offramp.bench" in deps}
    assert importers == {}, f"modules outside offramp/bench/ import it: {importers}"
    cli = ast.parse((ROOT / "cli.py").read_text())
    assert "offramp.bench" in {n.value for n in ast.walk(cli) if isinstance(n, ast.Constant)}
