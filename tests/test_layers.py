"""The layers, read from the imports (AST, so lazy imports inside functions count too):
``shared`` is the floor, ``api`` and ``worker`` stand on it and never on each other, the
client talks HTTP (it loads the worker for ``heatmap infer`` only), and no project module
imports itself back through a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "shared", "worker", "client", "scripts", "shapes")
#: package -> the project packages it must never import
FORBIDDEN = {
    "shared": {"api", "worker", "client", "scripts", "shapes"},
    "api": {"worker", "client", "scripts", "shapes"},
    "worker": {"api", "client", "scripts"},
}
#: Keras-free rooms: the API image has no TensorFlow, and outputs consume a score grid only.
NO_KERAS = ("shared", "api", "client", "worker/outputs")
HEAVY = ("tensorflow", "keras", "jax", "torch")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, modules: dict[str, Path] | None = None) -> set[str]:
    """Every absolute module an import statement in `path` names: ``from a import b`` is the
    module ``a.b`` where that is a module of the project, else ``a``."""
    modules = project_modules() if modules is None else modules
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in modules else node.module)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {dep for dep in imported_names(path) if dep in modules and dep != name} for name, path in modules.items()
    }


def test_layers_point_down_only():
    broken = [
        f"{name} imports {dep}"
        for name, deps in import_graph().items()
        for dep in deps
        if dep.split(".")[0] in FORBIDDEN.get(name.split(".")[0], ())
    ]
    assert broken == []


@pytest.mark.parametrize("room", NO_KERAS)
def test_keras_free_rooms_import_no_deep_learning_framework(room):
    found = [
        f"{path.relative_to(ROOT)}: {dep}"
        for path in sorted((ROOT / room).rglob("*.py"))
        for dep in imported_names(path)
        if dep.split(".")[0] in HEAVY
    ]
    assert found == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_rooms_stay_small():
    """At most ~10 modules directly in worker/ and ~14 in shared/: the rest is in rooms."""
    assert len(list((ROOT / "worker").glob("*.py"))) <= 10
    assert len(list((ROOT / "shared").glob("*.py"))) <= 14
