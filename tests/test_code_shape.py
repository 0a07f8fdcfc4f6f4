"""The code's shape, checked so it stays: unique module names, one home for statuses and
storage keys, short functions in the service packages (the rest is ruff's, run by make test)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from shared.jobs.job_status import JobStatus

ROOT = Path(__file__).resolve().parent.parent
SERVICE_PACKAGES = ("api", "shared", "worker", "client")
MAX_FUNCTION_LINES = 60


def _modules(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_module_names_are_unique_across_service_packages():
    names = Counter(path.name for path in _modules(*SERVICE_PACKAGES) if path.name != "__init__.py")
    assert [name for name, count in names.items() if count > 1] == []


def test_functions_are_short():
    long = []
    for path in _modules(*SERVICE_PACKAGES):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def _string_constants(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_status_names_are_written_only_in_the_enum():
    statuses = {status.value for status in JobStatus}
    home = ROOT / "shared" / "jobs" / "job_status.py"
    found = [
        f"{path.relative_to(ROOT)}:{line} {value!r}"
        for path in _modules(*SERVICE_PACKAGES, "scripts", "bench")
        if path != home
        for line, value in _string_constants(path)
        if value in statuses
    ]
    assert found == []


def test_storage_keys_are_built_only_in_the_storage_module():
    home = ROOT / "shared" / "storage.py"
    found = [
        f"{path.relative_to(ROOT)}:{line} {value!r}"
        for path in _modules(*SERVICE_PACKAGES, "scripts", "bench")
        if path != home
        for line, value in _string_constants(path)
        if value.startswith(("uploads/", "results/")) or value == "overlay_" or value.endswith(".npz")
    ]
    assert found == []
