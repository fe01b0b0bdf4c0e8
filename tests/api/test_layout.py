"""The HTTP shell's shape (issue #15): its modules import one another without cycles, counting
imports under ``TYPE_CHECKING`` too (a cycle hidden there is still two modules that cannot be
read apart)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import broker.api

API = Path(broker.api.__file__).parent


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_api_modules_import_without_cycles() -> None:
    modules = {f"broker.api.{p.stem}": p for p in API.glob("*.py") if p.stem != "__init__"}
    assert {"broker.api.service", "broker.api.pressure_loop", "broker.api.guest_pages"} <= set(
        modules
    )
    graph = {name: _imports(path) & modules.keys() for name, path in modules.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle in broker.api: {exc.args[1]}") from exc
    assert order.index("broker.api.pressure_loop") < order.index("broker.api.service")
