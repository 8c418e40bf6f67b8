"""The study's rules (tl_sweep.study), each defined once: cells, seeds, the search ranking, candidates,
finalists, the depth choice, the winner, successive halving's budgets."""

from __future__ import annotations

import ast
from pathlib import Path

from tl_sweep import study
from tl_sweep.contract import TrialConfig, TrialResult
from tl_sweep.study import Cell


def result(arm, depth, acc, status, bs, search=0, role="trial", seed=0):
    c = TrialConfig.of(batch_size=bs, unfrozen_blocks=depth, epochs=3, arm=arm, seed=seed, role=role, search=search)
    return TrialResult(c, status, 3, best_val_acc=acc)


def test_candidates_are_each_cells_best_configurations_full_schedules_first_with_new_seeds():
    results = [result("s", 0, 0.95, "EARLY_STOPPED", 1), result("s", 0, 0.8, "FINISHED", 2),
               result("s", 0, 0.7, "FINISHED", 3), result("s", 0, 0.9, "FINISHED", 4),
               result("s", 1, 0.7, "FINISHED", 5), result("s", 1, None, "FAILED", 6),
               result("scratch", 5, 0.6, "FINISHED", 7), result("scratch", 5, 0.7, "FINISHED", 8, search=1)]
    out = study.candidates(results, seed=0, n=2, seeds=2)
    assert [(c.search, c.arm, c.unfrozen_blocks, c.batch_size, c.seed) for c in out] == [
        (0, "s", 0, 4, 2000), (0, "s", 0, 4, 2001), (0, "s", 0, 2, 2000), (0, "s", 0, 2, 2001),  # finished first
        (0, "s", 1, 5, 2000), (0, "s", 1, 5, 2001),  # a failed trial is no candidate
        (0, "scratch", 5, 7, 2000), (0, "scratch", 5, 7, 2001), (1, "scratch", 5, 8, 2100), (1, "scratch", 5, 8, 2101)]
    assert all(c.candidate and not c.searched for c in out)
    three = study.candidates(results, seed=0, n=3, seeds=1)  # fewer full schedules than n: a stopped one fills in
    assert [c.batch_size for c in three if (c.arm, c.unfrozen_blocks) == ("s", 0)] == [4, 2, 3]
    assert [c.batch_size for c in study.candidates(results, 0, 4, 1) if (c.arm, c.unfrozen_blocks) == ("s", 0)] \
        == [4, 2, 3, 1]


def test_finalists_are_each_cells_best_selection_mean_with_the_same_seeds_in_every_arm():
    selection = [result("s", 0, acc, "FINISHED", bs, role="candidate", seed=sd)
                 for bs, accs in ((4, (0.95, 0.70)), (2, (0.85, 0.84))) for sd, acc in zip((2000, 2001), accs)]
    # a lucky single run (0.95) is not the pick: bs 2's mean 0.845 beats bs 4's 0.825
    selection += [result("s", 1, 0.8, "FINISHED", 5, role="candidate", seed=sd) for sd in (2000, 2001)]
    selection += [result("scratch", 5, 0.9, "FAILED", 6, role="candidate", seed=2000),  # failed: counts 0
                  result("scratch", 5, 0.9, "FINISHED", 6, role="candidate", seed=2001),
                  result("scratch", 5, 0.5, "FINISHED", 7, role="candidate", seed=2000),
                  result("scratch", 5, 0.5, "FINISHED", 7, role="candidate", seed=2001)]
    out = study.finalists(selection, seed=0, repeats=2)
    assert [(c.search, c.arm, c.unfrozen_blocks, c.batch_size, c.seed) for c in out] == [
        (0, "s", 0, 2, 1000), (0, "s", 0, 2, 1001), (0, "s", 1, 5, 1000), (0, "s", 1, 5, 1001),
        (0, "scratch", 5, 7, 1000), (0, "scratch", 5, 7, 1001)]
    assert all(c.final for c in out)


def test_halving_budgets():
    assert study.halving_budgets(8, 6, 2) == [4, 8]  # first rung: the budget / eta
    assert study.halving_budgets(8, 6, 3) == [3, 8]
    assert study.halving_budgets(8, 6, 2, first=2) == [2, 4, 8]
    assert study.halving_budgets(16, 6, 2, first=2) == [2, 4, 8, 16]  # 6 -> 3 -> 2 -> 1 cells
    assert study.halving_budgets(16, 3, 2, first=2) == [2, 4, 16]  # no rung once one cell is left
    assert study.halving_budgets(8, 1, 2) == [8]  # one cell: nothing to halve
    assert study.halving_budgets(4, 6, 2) == [2, 4]
    assert study.halving_budgets(4, 6, 2, first=9) == [4]  # a first rung past the budget: no halving


def test_the_depth_choice_takes_the_best_selection_mean_ties_to_the_shallower_and_nan_last():
    assert study.choose_depth({0: 0.9, 2: 0.95, 5: 0.95}) == 2
    assert study.choose_depth({5: 0.9, 0: 0.9}) == 0
    assert study.choose_depth({0: float("nan"), 2: 0.1}) == 2


def test_the_winner_is_the_best_finals_validation_ties_shallower_then_the_earlier_repeat():
    assert study.winner({Cell(0, "a", 5): 0.9, Cell(1, "a", 2): 0.95}) == Cell(1, "a", 2)
    assert study.winner({Cell(0, "a", 5): 0.9, Cell(1, "a", 2): 0.9}) == Cell(1, "a", 2)
    assert study.winner({Cell(1, "a", 2): 0.9, Cell(0, "a", 2): 0.9}) == Cell(0, "a", 2)


def test_a_cell_is_ordered_by_repeat_arm_depth_and_read_from_any_config():
    c = TrialConfig.of(arm="source:x", seed=3, unfrozen_blocks=2, search=1, role="final")
    assert Cell.of(c) == Cell(1, "source:x", 2) and Cell.of(c).grid == ("source:x", 2) and str(Cell.of(c)) == \
        "source:x@k=2"
    assert sorted([Cell(1, "a", 0), Cell(0, "b", 2), Cell(0, "a", 5)]) == [Cell(0, "a", 5), Cell(0, "b", 2),
                                                                         Cell(1, "a", 0)]


def test_the_cell_and_the_selection_rule_are_each_defined_once():
    """No module of the package keys a cell by hand or ranks search trials itself: the definitions live in
    tl_sweep/study.py, and a search finds them nowhere else."""
    root = Path(study.__file__).parent
    hand_keyed = []
    for path in root.rglob("*.py"):
        if path.name == "study.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and len(node.elts) == 3:
                names = {e.attr for e in node.elts if isinstance(e, ast.Attribute)}
                if {"arm", "unfrozen_blocks", "search"} <= names or {"arm", "depth", "search"} <= names:
                    hand_keyed.append(f"{path.relative_to(root)}:{node.lineno}")
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in (
                    "candidates", "finalists", "choose_depth", "winner", "final_seeds", "selection_seeds",
                    "halving_budgets", "search_order", "standing", "Cell"):
                hand_keyed.append(f"{path.relative_to(root)}:{node.lineno} defines {node.name}")
    assert not hand_keyed, f"a cell keyed or a study rule defined outside tl_sweep/study.py: {hand_keyed}"
