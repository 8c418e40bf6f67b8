"""Was the search's budget enough: expected-best curves over finished trials only, compute per arm, chosen
configurations at a bound of their space (report/budget.py)."""

from __future__ import annotations

import pytest

from tl_sweep.contract import TrialConfig, TrialResult
from tl_sweep.report import budget
from tl_sweep.study import Cell


def _r(arm, depth, search, seed, val, status="FINISHED", role="trial", **dims):
    c = TrialConfig.of(unfrozen_blocks=depth, epochs=dims.pop("epochs", 2), arm=arm, seed=seed, role=role,
                       search=search, **dims)
    return TrialResult(c, status, 2, best_val_acc=val, seconds=2.0)


def test_expected_best_of_n_trials():
    vals = [0.1, 0.2, 0.3, 0.4]
    assert budget.expected_max(vals, 1) == pytest.approx(0.25)  # the mean
    # n = 2: P(max = v_i) = (i² − (i−1)²) / 16
    assert budget.expected_max(vals, 2) == pytest.approx((0.1 * 1 + 0.2 * 3 + 0.3 * 5 + 0.4 * 7) / 16)
    assert budget.expected_max(vals, 50) == pytest.approx(0.4, abs=1e-3)


def test_budget_curves_stop_at_the_trials_that_finished():
    """Repeat 0 started 4 trials and 3 ran their schedule: its curve has 3 points, not 4 (a 4th would be
    extrapolated from those 3); repeat 1 has one full-schedule trial: no curve."""
    results = [_r("src", 0, r, 0, v, status=st) for r, rows in enumerate([
        [(0.5, "FINISHED"), (0.9, "EARLY_STOPPED"), (0.7, "FINISHED"), (0.6, "FINISHED")],
        [(0.8, "FINISHED"), (0.4, "EARLY_STOPPED"), (0.2, "EARLY_STOPPED"), (0.3, "EARLY_STOPPED")]])
        for v, st in rows]
    (c,) = budget.budget_curves(results)
    assert (c.search, c.started, c.finished) == (0, 4, 3) and len(c.mean) == 3
    assert c.mean[0] == pytest.approx(0.6) and c.mean[-1] == pytest.approx(budget.expected_max([0.5, 0.7, 0.6], 3))
    assert max(c.mean) < 0.9  # the stopped trial's partial 0.9 is no full run
    assert all(lo <= m <= hi for lo, m, hi in zip(c.lo, c.mean, c.hi)) and c.lo[-1] < c.hi[-1]
    assert c.last_gain == pytest.approx(c.mean[2] - c.mean[1])


def test_a_chosen_configuration_at_a_bound_of_its_space_is_flagged():
    """scratch searched epochs 2..6 and chose 6: capped by its space; lr_mult 9.5 of a log range 0.1..10 is in
    its top 5%; batch 16 is the smallest of [16, 32, 64]; a source's 4 epochs and lr 1.0 are inside."""
    spaces = {"scratch": {"epochs": {"low": 2, "high": 6, "log": False, "int": True},
                          "lr_mult": {"low": 0.1, "high": 10, "log": True, "int": False},
                          "batch_size": {"choices": [16, 32, 64]}, "optimizer": {"choices": ["sgd", "adam"]},
                          "unfrozen_blocks": {"choices": [0, 2, 5]}},
              "src": {"epochs": {"low": 2, "high": 12, "log": False, "int": True},
                      "lr_mult": {"low": 0.1, "high": 10, "log": True, "int": False}}}
    finals = [_r("scratch", 5, 0, s, 0.8, role="final", epochs=6, lr_mult=9.5, batch_size=16) for s in (1000, 1001)]
    finals += [_r("src", 0, 0, s, 0.8, role="final", epochs=4, lr_mult=1.0) for s in (1000, 1001)]
    got = budget.bounds(finals, spaces)
    assert {b.cell for b in got} == {Cell(0, "scratch", 5)}  # one entry per cell, not per final
    assert sorted((b.name, b.side) for b in got) == [("batch_size", "bottom"), ("epochs", "top"), ("lr_mult", "top")]
    assert "epochs = 6 at the top of its space (6)" in [str(b) for b in got]
    lr = spaces["src"]["lr_mult"]  # on its log scale: 0.12 is 4% from the bottom, 0.2 is 15%
    assert budget.at_bound(0.12, lr) == ("bottom", 0.1) and budget.at_bound(0.2, lr) is None
    # a two-value list has no inside: either value is an end, and says nothing about a cap
    assert budget.at_bound(16, {"choices": [16, 32]}) is None and budget.at_bound(16, {"choices": [16, 32, 64]})
    assert budget.compute(finals) == {"scratch": 4.0, "src": 4.0}
