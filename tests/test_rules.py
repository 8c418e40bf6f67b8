"""docs/architecture.md's "Rules the code keeps", each one a test can hold (the layer table is test_layers')."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "tl_sweep"


def sources(*folders: str):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def module(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_mlflow_is_imported_only_behind_its_door():
    """MLflow only in tracking, in mlflow_model (the file MLflow itself loads to serve a model) and in internals
    (its private parts tl-sweep still needs)."""
    users = {module(p) for p, tree in sources("tl_sweep") if any(m.split(".")[0] == "mlflow" for m in imported(tree))}
    assert users == {"tracking", "mlflow_model", "internals"}


def test_no_module_imports_anothers_private_name():
    wrong, ours = [], {module(p) for p, _ in sources("tl_sweep")}
    for path, tree in sources("tl_sweep"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_sweep"):
                wrong += [f"{path.name}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.value.id in ours:
                wrong.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not wrong, f"private names of another tl-sweep module: {wrong}"


def test_a_trial_config_is_built_with_of_never_field_by_field():
    calls = [f"{p.relative_to(ROOT)}:{n.lineno}" for p, tree in sources("tl_sweep", "tests", "benchmarks")
             for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "TrialConfig"]
    assert not calls, f"TrialConfig(...) built field by field (use TrialConfig.of): {calls}"


def test_tag_names_are_written_only_in_the_contract():
    """An MLflow tag name is a constant of contract.Tag: written there once, read back through it."""
    modules = {f"tl_sweep.{module(p)}" for p, _ in sources("tl_sweep")}
    literal = []
    for path, tree in sources("tl_sweep"):
        if path.name == "contract.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"tl_sweep\.[a-z_.]+", node.value) and node.value not in modules:
                literal.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not literal, f"tag names written outside contract.Tag: {literal}"


def test_the_statistics_and_the_studys_rules_are_pure():
    """report/stats.py and study.py compute on numbers and results: no MLflow, Ray, Optuna or torch."""
    for name in ("report/stats.py", "study.py"):
        heavy = {m for m in imported(ast.parse((PACKAGE / name).read_text()))
                 if m.split(".")[0] in ("mlflow", "ray", "optuna", "torch", "torchvision")}
        assert not heavy, f"{name} imports {heavy}"


def test_tune_configs_are_read_as_trial_configs_not_by_string_keys():
    """The driver, searcher and scheduler read a trial's Tune config through TrialConfig.from_tune."""
    reads = []
    for path, tree in sources("tl_sweep"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "config":
                reads.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "config":
                reads.append(f"{path.name}:{node.lineno}")
    assert not reads, f"a trial's config read by key: {reads}"


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p, _ in sources("tl_sweep") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concern: {long}"
