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


# Calls into Ray and Serve outside the wrapper (cluster/rayops.py), each with its reason.
# A new call elsewhere fails the test below: put it in rayops, or add it here with a reason.
RAY_CALL_ALLOWED = {
    # declarations, not calls into a running cluster: the deployment classes themselves
    ("offramp/deployments/app.py", "serve.deployment"): "declares the stage deployment",
    ("offramp/deployments/app.py", "serve.ingress"): "declares the ingress deployment",
    ("offramp/bench/serve.py", "serve.deployment"): "declares the plain-Serve contender",
    ("offramp/bench/serve.py", "serve.batch"): "declares the plain-Serve contender's batching",
    # the one local-cluster boot (CLI, benches, test fixtures)
    ("offramp/cluster/local.py", "ray.init"): "joins the local cluster it started",
    ("offramp/cluster/local.py", "ray.shutdown"): "leaves it",
    ("offramp/cluster/local.py", "ray.nodes"): "lists the nodes it started",
    ("offramp/cluster/local.py", "serve.status"): "waits for a deployed app",
    # metrics are recorded in and out of Ray; importing rayops there would pull Serve in
    ("offramp/observability/metrics.py", "ray.is_initialized"): "records only inside a Ray worker",
}


def _ray_calls(path: Path) -> set[str]:
    """``ray.x`` / ``serve.x`` attribute calls and decorators in one module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("ray", "serve"):
            out.add(f"{func.value.id}.{func.attr}")
    return out


def test_ray_and_serve_calls_live_in_the_wrapper():
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        if rel == "offramp/cluster/rayops.py":
            continue
        for call in _ray_calls(path):
            found[(rel, call)] = True
    stray = sorted(k for k in found if k not in RAY_CALL_ALLOWED)
    assert not stray, f"ray./serve. calls outside offramp/cluster/rayops.py: {stray}; move them into rayops " \
                      "or add them to RAY_CALL_ALLOWED with the reason"
    stale = sorted(k for k in RAY_CALL_ALLOWED if k not in found)
    assert not stale, f"allow-list entries no longer needed: {stale}"


def test_each_module_name_means_one_thing():
    """Two modules of offramp share a file name only where listed here with why (two
    ``protocol.py`` once meant the backend contract and the HTTP request models); each
    package's ``__init__``/``cli`` (one command group per package) and generated code aside."""
    explained = {
        # the boundary error types / the same errors as OpenAI error objects and HTTP responses
        "errors.py": ["errors.py", "api/errors.py"],
        # the ASGI (FastAPI) app over any Backend / the Serve application of deployments
        "app.py": ["api/app.py", "deployments/app.py"],
        # the training corpus / the lm-eval task files' data, made from that corpus's held-out split
        "data.py": ["evals/lm_eval_tasks/data.py", "training/data.py"],
    }
    seen: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "proto" in path.relative_to(ROOT).parts[:-1] or path.name in ("__init__.py", "cli.py"):
            continue
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    twice = {name: sorted(paths) for name, paths in seen.items() if len(paths) > 1}
    assert twice == {k: sorted(v) for k, v in explained.items()}, f"module names used twice: {twice}"


def test_each_public_class_and_constant_is_defined_once():
    """A class or UPPER_CASE constant name is defined at the top of one module of offramp
    (``ModelSpec``, ``StageDeployment``, ``Calibration``, ``DTYPES`` and ``PRECISIONS`` once each
    meant two things; ``INTERNAL_MESSAGE`` and ``TASKS`` were copies), except where listed
    with why."""
    import ast

    explained = {
        # each bench's own contenders: what it compares (names differ, so do the meanings)
        "CONTENDERS": ["bench/placement_exits.py", "bench/serve.py"],
    }
    defined: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "proto" in path.relative_to(ROOT).parts[:-1]:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
            else:
                continue
            for name in names:
                if not name.startswith("_"):
                    defined.setdefault(name, []).append(str(path.relative_to(ROOT)))
    twice = {name: sorted(paths) for name, paths in defined.items() if len(paths) > 1}
    assert twice == {k: sorted(v) for k, v in explained.items()}, f"defined in more than one module: {twice}"
