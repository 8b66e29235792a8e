"""The import graph: no module imports itself back through others, and the science never
imports the web.

Every ``import`` statement counts, at module level or inside a function: a circle of lazy
imports still means two rooms that each need the other. One exception, named here: the CLI's
``serve`` command is the composition root that starts the web app, so it imports ``app`` inside
its function (docs/architecture.md says why).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sae_core", "app")
ALLOWED_SAE_CORE_TO_APP = {"sae_core.commands.serve"}  # the composition root, inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) refers to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in (resolve(n, known) for n in names) if target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    for name in graph:  # a package's __init__ is imported with each of its modules: not an edge back
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_project_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_sae_core_never_imports_app():
    graph = import_graph()
    offenders = {
        name: sorted(t for t in targets if t.split(".")[0] == "app")
        for name, targets in graph.items()
        if name.startswith("sae_core") and name not in ALLOWED_SAE_CORE_TO_APP
    }
    assert {n: t for n, t in offenders.items() if t} == {}


def test_the_composition_root_imports_app_only_inside_its_function():
    path = modules()["sae_core.commands.serve"]
    top_level = [
        node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any((getattr(node, "module", None) or a.name).startswith("app") for a in node.names)
    ]
    assert top_level == []


def test_the_cli_parser_imports_no_heavy_library():
    """Every call of the CLI builds every command's parser, so a command module imports what its
    work needs inside its ``run``: numba (the labels) held ~55 MB in `saescope precompute
    --no-label` when ``saescope label`` imported it at the top."""
    script = (
        "import sys\n"
        "from sae_core.cli import build_parser\n"
        "build_parser().parse_args(['precompute', '--sae', 'x'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numba', 'fastapi', 'umap') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}, ["y", "y2", "y"]),
    ],
)
def test_find_cycle_finds_circles_and_only_circles(graph, expected):
    assert find_cycle(graph) == expected
