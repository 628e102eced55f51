"""The package's layering: the product path never imports test support, and no module cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Modules under handlers. that ``path`` imports at run time (TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
        and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("handlers"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("handlers")}
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_handlers_modules_import_each_other_without_cycles():
    graph = {_module(p): _imports(p) for p in (ROOT / "handlers").rglob("*.py")}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        assert state.get(name) != 1, f"import cycle: {' -> '.join([*trail, name])}"
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


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
