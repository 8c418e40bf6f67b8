"""docs/architecture.md's layer table is the import rule: every module imports only what its row names (imports
inside functions included), nothing imports in a circle, and the table names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "tl_sweep"


def module_of(path: Path) -> str:
    """The layer-table name of a source file: ``report`` for the report package, else the file's name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imports() -> dict[str, set[str]]:
    """Module -> the tl-sweep modules it imports anywhere in its code (TYPE_CHECKING and function level too)."""
    modules = {module_of(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in PACKAGE.rglob("*.py"):
        me = module_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside the report package
                names = [f"tl_sweep.{me}"]
            elif isinstance(node, ast.ImportFrom) and node.module == "tl_sweep":
                names = [f"tl_sweep.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.startswith("tl_sweep.") and (target := name.split(".")[1]) in modules and target != me:
                    graph[me].add(target)
    return graph


def table() -> dict[str, set[str]]:
    """The layer table of docs/architecture.md: module -> the modules it may import."""
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))
    return rows


def test_every_import_is_one_the_layer_table_allows():
    allowed, graph = table(), imports()
    assert set(allowed) == set(graph), f"modules missing from the table: {sorted(set(graph) - set(allowed))}; " \
                                       f"rows for no module: {sorted(set(allowed) - set(graph))}"
    wrong = {f"{m} imports {t}" for m, targets in graph.items() for t in targets if t not in allowed[m]}
    assert not wrong, f"imports docs/architecture.md's layer table does not allow: {sorted(wrong)}"
    unused = {f"{m} may import {t} but does not" for m, ts in allowed.items() for t in ts if t not in graph[m]}
    assert not unused, f"the layer table allows more than the code does (keep it exact): {sorted(unused)}"


def test_no_module_imports_in_a_circle():
    graph, state, cycles = imports(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [m, t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, f"import cycles: {cycles}"


def test_the_contract_is_a_leaf():
    assert imports()["contract"] == set()
