"""The layout rules a newcomer relies on: layers without import cycles, functions short enough to read in one go,
and errors that become exit codes only at the command line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shard_tools", "distributed_train", "mushroom_demo")


def modules() -> dict[str, ast.Module]:
    return {f"{pkg}.{path.stem}": ast.parse(path.read_text(), str(path))
            for pkg in PACKAGES for path in sorted((ROOT / pkg).glob("*.py"))}


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules `name` imports, at the top or inside a function (both make a dependency)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_among_the_packages_modules():
    trees = modules()
    graph = {name: imports_of(name, tree, set(trees)) for name, tree in trees.items()}
    assert graph["shard_tools.manifest"] and "shard_tools.transport" in graph["shard_tools.manifest"]  # sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module, limit", [("distributed_train.train", 80), (None, 100)])
def test_functions_stay_short(module, limit):
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in modules().items() if module in (None, name)
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]
    assert not long


def test_system_exit_only_at_the_command_line():
    """Library code raises typed errors (shard_tools.errors); only `main()` and `__main__` end the process."""
    offenders = []
    for name, tree in modules().items():
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or func.name == "main":
                continue
            for node in ast.walk(func):
                target = node.exc if isinstance(node, ast.Raise) else node.func if isinstance(node, ast.Call) else None
                text = ast.unparse(target) if target is not None else ""
                if text.startswith(("SystemExit", "sys.exit")):
                    offenders.append(f"{name}.{func.name}")
    assert not offenders
