"""The repository's layering: benchmarks -> hetserve -> partitioner -> handlers, no import cycles
(relative, lazy and type-only imports counted), and the product path never imports test support."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a package may import the ones before it, never one after it.
LAYERS = ("handlers", "partitioner", "hetserve", "benchmarks")

def _module(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = ROOT, packages: tuple[str, ...] = LAYERS) -> dict[str, Path]:
    return {_module(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports anywhere: at the top, inside
    functions, relative (``from .x import y``) or for types only (a TYPE_CHECKING import still ties
    two modules together). ``from a import b`` counts as importing ``a.b`` when that is a module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else (node.module or "")
            named |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    found = set()
    for module in named:
        while module and module not in known:  # a name inside a module: the module
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = LAYERS) -> dict[str, set[str]]:
    modules = _modules(root, packages)
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Every set of two or more modules that reach one another (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = set()

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if dep not in index:
                visit(dep)
                low[module] = min(low[module], low[dep])
            elif dep in stack:
                low[module] = min(low[module], index[dep])
        if low[module] == index[module]:
            component = set()
            while not component or module not in component:
                component.add(stack.pop())
            if len(component) > 1:
                cycles.add(frozenset(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def _one_loop(graph: dict[str, set[str]], cycle: frozenset[str]) -> str:
    """A readable path around ``cycle``: a -> b -> ... -> a (breadth first, inside the cycle)."""
    start = min(cycle)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        module = frontier.pop(0)
        for dep in sorted(graph[module] & cycle):
            if dep == start:
                path = [module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return " -> ".join([*reversed(path), start])
            if dep not in came_from:
                came_from[dep] = module
                frontier.append(dep)
    raise AssertionError(f"{sorted(cycle)} is not a cycle")


def test_no_package_imports_one_above_it():
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = [f"{module} imports {dep}" for module, deps in sorted(import_graph().items()) for dep in sorted(deps)
              if rank[dep.split(".")[0]] > rank[module.split(".")[0]]]
    assert not upward, f"imports against {' -> '.join(reversed(LAYERS))}: " + "; ".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    loops = [_one_loop(graph, c) for c in sorted(import_cycles(graph), key=sorted)]
    assert not loops, "import cycle(s): " + "; ".join(loops)


def test_the_cycle_check_sees_relative_lazy_and_type_only_imports(tmp_path):
    pkg = tmp_path / "handlers" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "handlers" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from ..sub.c import other\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from handlers.sub import a\n")
    graph = import_graph(tmp_path, ("handlers",))
    assert graph["handlers.sub"] == {"handlers.sub.a"}
    assert import_cycles(graph) == {frozenset({"handlers.sub.a", "handlers.sub.b", "handlers.sub.c"})}
    assert _one_loop(graph, frozenset({"handlers.sub.a", "handlers.sub.b", "handlers.sub.c"})) == \
        "handlers.sub.a -> handlers.sub.b -> handlers.sub.c -> handlers.sub.a"


def test_serving_without_a_faults_section_never_loads_the_test_support_module():
    code = (
        "import sys\n"
        "import handlers.hetserve_handler, handlers.runtime.assembly\n"
        "from handlers.runtime.config import RuntimeConfig\n"
        "RuntimeConfig.from_model_yaml({'hetserve': {'micro_batch': 2}})\n"
        "print(sorted(m for m in sys.modules if m.startswith('handlers.testing.')))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT)}).stdout.split("\n")
    assert out[0] == "[]", "the product path imported handlers.testing"
    assert out[1] == "False", "the serving package must import without torch"


MAX_CLASS_LINES = 200


def test_no_class_in_handlers_is_over_200_lines():
    """The serving core stays readable a class at a time (issue 24): split by concern instead."""
    long = []
    for path in sorted((ROOT / "handlers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} ({lines} lines)")
    assert not long, f"classes over {MAX_CLASS_LINES} lines: " + "; ".join(long)


def test_the_cli_never_imports_the_benchmarks_infrastructure():
    """``hetserve.benchmarking`` serves ``benchmarks/`` (and tests) only: no other hetserve module
    reaches it, so the CLI does not load it."""
    graph = import_graph()
    inside = "hetserve.benchmarking"
    users = [f"{module} imports {dep}" for module, deps in sorted(graph.items()) for dep in sorted(deps)
             if dep.startswith(inside) and module.startswith("hetserve") and not module.startswith(inside)]
    assert not users, "; ".join(users)


# Inside handlers/, lowest first (docs/architecture.md draws the same): records and facts, the
# executors, the request and runtime logic, the service (and the offline tools' archive reader,
# which reads the runtime's config), the TorchServe adapter. A module's layer is its longest
# prefix here.
HANDLER_LAYERS = (
    ("handlers.errors", "handlers.frontend_limits", "handlers.observability", "handlers.hardware",
     "handlers.artifact"),
    ("handlers.executors", "handlers.testing"),
    ("handlers.protocol", "handlers.processors", "handlers.runtime", "handlers.batching", "handlers.decode_pool"),
    ("handlers.service", "handlers.artifact.contract"),
    ("handlers.hetserve_handler", "handlers.connection_guard"),
)


def _handler_layer(module: str) -> int | None:
    found = [(len(prefix), rank) for rank, layer in enumerate(HANDLER_LAYERS) for prefix in layer
             if module == prefix or module.startswith(prefix + ".")]
    return max(found)[1] if found else None


def test_inside_handlers_no_module_imports_one_above_it():
    graph = import_graph()
    modules = [m for m in graph if m.startswith("handlers.")]
    assert [m for m in modules if _handler_layer(m) is None] == []  # every module has a layer
    upward = [f"{m} imports {d}" for m in sorted(modules) for d in sorted(graph[m])
              if d.startswith("handlers.") and _handler_layer(d) > _handler_layer(m)]
    assert not upward, "; ".join(upward)
