"""The house rules, read from the source: no import cycles inside autoquant (eager or lazy),
the core imports no concrete strategy or evaluator, no module imports another's private
names, small files and functions, and every package says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as
FOLDERS = {"autoquant": "autoquant", "strategies": "autoquant.strategies",
           "evaluators": "autoquant.evaluators"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # of body, docstring left out


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every runtime import, inside functions too; imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if module in MODULES and len(targets) < len(names) or not names:
                targets.append(module)
            for target in targets:
                if target in MODULES and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_there_is_no_import_cycle_inside_autoquant_eager_or_lazy() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle_when_there_is_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_core_never_imports_a_concrete_strategy_or_evaluator() -> None:
    plugins = ("autoquant.strategies", "autoquant.evaluators")
    offenders = [f"{name} -> {target}" for name, targets in _graph().items()
                 if not name.startswith(plugins) for target in targets
                 if target.startswith(plugins)]
    assert offenders == []


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = []
    for name, path in MODULES.items():
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not module.startswith("autoquant") or module == name:
                continue
            offenders += [f"{name}: from {module} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__")
                          and f"{module}.{n}" not in MODULES]
    assert offenders == []


def test_files_and_functions_stay_small() -> None:
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: "
                                f"{body[-1].end_lineno - body[0].lineno + 1} lines")
    assert too_long == []


def test_every_package_says_what_it_owns() -> None:
    undocumented = [name for name, path in MODULES.items()
                    if path.name == "__init__.py"
                    and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert undocumented == []


def test_every_public_module_declares_all() -> None:
    missing = [name for name, path in MODULES.items()
               if not path.name.startswith("_") and path.name != "__main__.py"
               and "__all__" not in path.read_text(encoding="utf-8")
               and path.name != "__init__.py"]
    assert missing == []
