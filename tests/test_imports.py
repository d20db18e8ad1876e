"""The package's import graph: no cycles; the model artifact's library (segmentor, backbones, layers, heads, hub,
inference), the kernels and the data never import training, serving or a command; serving never imports the
training loop's task except through the one bridge from a run (``seg.train.pretrained``). Imports are read from the
source (function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "seg"
LIBRARY = ("seg.model.segmentor", "seg.model.backbones", "seg.model.layers", "seg.model.heads", "seg.model.hub",
           "seg.model.inference", "seg.kernels", "seg.data")
ABOVE_LIBRARY = ("seg.train", "seg.serve", "seg.model.convert")


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (``from seg.a import b`` counts as seg.a.b when that is a
    module, else seg.a; a module importing its own package is not an edge)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        base_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = base_parts[: len(base_parts) - node.level + 1] if node.level else []
                base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walker_finds_a_cycle_and_an_upward_import(tmp_path) -> None:
    pkg = tmp_path / "seg"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text("from seg.layers.a import A\n")
    (pkg / "layers" / "a.py").write_text("def f():\n    from seg import task\n")
    (pkg / "task.py").write_text("from .layers import a\n")
    graph = import_graph(pkg)
    assert graph["seg.layers"] == {"seg.layers.a"} and graph["seg.layers.a"] == {"seg.task"}
    assert cycles(graph) == [["seg.layers", "seg.layers.a", "seg.task"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_library_does_not_import_task_cli_or_commands() -> None:
    graph = import_graph(PACKAGE)
    assert {"seg.model.segmentor", "seg.model.backbones", "seg.model.layers", "seg.model.heads"} <= set(graph)
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() if within(name, LIBRARY)
                    for target in targets if within(target, ABOVE_LIBRARY))
    assert upward == []


def test_serving_reaches_training_only_through_a_run() -> None:
    graph = import_graph(PACKAGE)
    crossing = sorted(f"{name} -> {target}" for name, targets in graph.items() if within(name, ("seg.serve",))
                      for target in targets if within(target, ("seg.train",)) and target != "seg.train.pretrained")
    assert crossing == []
