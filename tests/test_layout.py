"""The layout a newcomer relies on: the kernel imports no feature package, feature packages import
no composition root, and packages import each other without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL = "autoglm"
FEATURES = ("search", "streams", "feedback", "consumers", "registry")
ROOTS = "roles"


def imported_packages(package: str) -> dict[str, set[str]]:
    """module path -> the first-party packages it imports (at any depth: lazy imports count)."""
    first_party = {KERNEL, ROOTS, *FEATURES}
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = (names & first_party) - {package}
    return found


def test_the_kernel_imports_no_feature_package_or_role():
    offenders = {module: names for module, names in imported_packages(KERNEL).items() if names}
    assert offenders == {}


def test_feature_packages_never_import_a_composition_root():
    offenders = {module: names for package in FEATURES
                 for module, names in imported_packages(package).items() if ROOTS in names}
    assert offenders == {}


def test_packages_import_each_other_without_cycles():
    graph = {package: set().union(*imported_packages(package).values()) for package in (KERNEL, *FEATURES)}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(step == goal or (step not in seen and reaches(step, goal, seen | {step}))
                   for step in graph.get(start, ()))

    cycles = sorted(package for package in graph if reaches(package, package, {package}))
    assert cycles == [], {package: sorted(graph[package]) for package in cycles}


def test_each_role_has_its_composition_root():
    assert {path.stem for path in (REPO / ROOTS).glob("*.py")} >= {"ingest", "serve", "learn", "worker", "cli"}
