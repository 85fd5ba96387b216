"""The package's import graph (every import statement, function-level ones included): no
circles, and no upward arrows from the bottom layer -- ``ops`` imports nothing of ``data``,
``engine``, ``models``, ``losses`` or the command-line modules (docs/design.md section 3)."""

from __future__ import annotations

import ast
from pathlib import Path

import mgm_fast

ROOT = Path(mgm_fast.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # the longest project module the import names (``from x import y``: y may be a module)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circles():
    # a package's __init__ re-exporting its submodules is not a circle of the code
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in _graph().items()}
    graph = {name: {t for t in targets if not (t.startswith(name + ".") and name in graph)} for name, targets in graph.items()}
    assert _cycles(graph) == []


def test_ops_import_nothing_above_them():
    above = ("mgm_fast.data", "mgm_fast.engine", "mgm_fast.models", "mgm_fast.losses", "mgm_fast.train",
             "mgm_fast.bench", "mgm_fast.stepcost", "mgm_fast.evaluate", "mgm_fast.compat")
    upward = sorted((name, target) for name, targets in _graph().items() if name.startswith("mgm_fast.ops")
                    for target in targets if target.startswith(above))  # fmt: skip
    assert upward == []
