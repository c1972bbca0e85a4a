"""kvbench's import graph: no cycles (module-level and function-level imports alike), and the policies are
leaves that import only what lies below them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvbench"
# What a module in kvbench/policies/ may import from kvbench (the standard library and torch are fine).
BELOW_POLICIES = ("kvbench.policies", "kvbench.cache", "kvbench.engine.kernels", "kvbench.errors", "kvbench.labels")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvbench modules ``name`` imports anywhere in its body (``from a import b`` names module a.b when
    that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{root}.{base}" if base else root
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {target for target in out if target in known and target != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path of modules that closes it (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_graph_sees_function_level_imports():
    edges = graph()
    assert "kvbench.download" in edges["kvbench.config"]  # imported inside _default_data_dir
    assert "kvbench.engine.kernels" in edges["kvbench.policies.less"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_policies_import_only_what_lies_below_them():
    upward = [
        (name, target)
        for name, targets in graph().items()
        if name.startswith("kvbench.policies")
        for target in sorted(targets)
        if not any(target == low or target.startswith(low + ".") for low in BELOW_POLICIES)
    ]
    assert upward == []
