"""Was the search's budget enough? Expected-best curves over the trials that finished (Dodge et al. 2019), the
compute each arm and depth cost, and the chosen configurations that sit at a bound of the space they were searched
in (a baseline that could not train longer is capped by its space, not beaten by a source: He et al., "Rethinking
ImageNet Pre-training"). Pure functions of trial results and the declared spaces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tl_sweep.contract import TrialResult
from tl_sweep.study import Cell


def expected_max(values: list[float], n: int) -> float:
    """Expected best of ``n`` trials drawn (with replacement) from ``values`` (Dodge et al. 2019)."""
    v = sorted(values)
    N = len(v)
    return sum(x * ((i / N) ** n - ((i - 1) / N) ** n) for i, x in enumerate(v, start=1))


@dataclass
class BudgetCurve:
    """One cell's search in one repeat: expected best validation accuracy after n = 1 .. ``finished`` trials
    (Dodge et al. 2019) from the trials that ran their whole schedule, with a 90% bootstrap band. It stops at the
    trials that finished: past them it would extrapolate, not show."""

    arm: str
    depth: int
    search: int
    started: int
    finished: int
    mean: list[float]
    lo: list[float]
    hi: list[float]

    @property
    def last_gain(self) -> float:
        """What the budget's last trial added to the expected best (0 for a budget of one trial)."""
        return self.mean[-1] - self.mean[-2] if len(self.mean) > 1 else 0.0


def budget_curves(results: list[TrialResult], draws: int = 500, seed: int = 0) -> list[BudgetCurve]:
    """Per cell and search repeat with at least two full-schedule trials: its expected best validation accuracy
    after n trials, n up to the trials that finished (a trial ASHA stopped at half its schedule scored a partial
    run, and a curve past the finished trials would extrapolate); the band resamples those scores."""
    import numpy as np

    cells: dict[Cell, list[TrialResult]] = {}
    for r in results:
        if r.config.searched:
            cells.setdefault(Cell.of(r.config), []).append(r)
    rng, out = np.random.default_rng(seed), []
    for cell, rs in sorted(cells.items(), key=lambda kv: (str(kv[0].arm), kv[0].depth, kv[0].search)):
        done = [r.best_val_acc for r in rs if r.status == "FINISHED" and r.best_val_acc is not None]
        if len(done) < 2:
            continue
        n = range(1, len(done) + 1)
        boot = np.array([[expected_max(list(rng.choice(done, len(done))), k) for k in n] for _ in range(draws)])
        out.append(BudgetCurve(cell.arm, cell.depth, cell.search, len(rs), len(done),
                               [expected_max(done, k) for k in n],
                               list(np.percentile(boot, 5, axis=0)), list(np.percentile(boot, 95, axis=0))))
    return out


def cost(results: list[TrialResult]) -> dict[tuple[str, int], float]:
    """Compute seconds per (arm, depth): every search trial and final of the cell, all repeats."""
    out: dict[tuple[str, int], float] = {}
    for r in results:
        if r.seconds is not None:
            cell = Cell.of(r.config).grid
            out[cell] = out.get(cell, 0.0) + r.seconds
    return out


def compute(results: list[TrialResult]) -> dict[str, float]:
    """Compute seconds per arm: every search trial, selection re-training and final of the arm, all repeats."""
    out: dict[str, float] = {}
    for r in results:
        if r.seconds is not None:
            out[r.config.arm] = out.get(r.config.arm, 0.0) + r.seconds
    return out


EDGE = 0.05  # a float within this share of its range (on its searched scale) from an end is at that end


@dataclass(frozen=True)
class Bound:
    """A chosen configuration's value at an end of the range (or numeric list) it was searched in."""

    cell: Cell
    name: str
    value: Any
    side: str  # top | bottom
    bound: Any

    def __str__(self) -> str:
        where = "top" if self.side == "top" else "bottom"
        v = f"{self.value:.3g}" if isinstance(self.value, float) else str(self.value)
        b = f"{self.bound:.3g}" if isinstance(self.bound, float) else str(self.bound)
        return f"{self.name} = {v} at the {where} of its space ({b})"


def at_bound(value, how: dict) -> tuple[str, Any] | None:
    """``(side, bound)`` when ``value`` sits at an end of how its dimension was searched: an int range's end, a
    float range's outer 5% (on a log scale where searched so), a numeric list's largest or smallest (a list of 3 or
    more: every value of a two-value list is an end, so being at one says nothing); else None."""
    if "choices" in how:
        nums = [c for c in how["choices"] if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if len(nums) < 3 or len(nums) != len(how["choices"]):
            return None
        return ("top", max(nums)) if value == max(nums) else ("bottom", min(nums)) if value == min(nums) else None
    lo, hi = how["low"], how["high"]
    if not hi > lo:
        return None
    if how["int"]:
        return ("top", hi) if value >= hi else ("bottom", lo) if value <= lo else None
    if how["log"]:
        f = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
    else:
        f = (value - lo) / (hi - lo)
    return ("top", hi) if f >= 1 - EDGE else ("bottom", lo) if f <= EDGE else None


def bounds(finals: list[TrialResult], spaces: dict[str, dict[str, dict]]) -> list[Bound]:
    """Every cell's chosen configuration (its finals') at a bound of its arm's space (``spaces``: arm -> how each
    dimension was searched); the depth is the study's grid, not a searched value."""
    out, seen = [], set()
    for r in sorted(finals, key=lambda r: Cell.of(r.config)):
        cell = Cell.of(r.config)
        if cell in seen:
            continue
        seen.add(cell)
        for name, how in spaces.get(r.config.arm, {}).items():
            if name == "unfrozen_blocks":
                continue
            hit = at_bound(getattr(r.config, name), how)
            if hit:
                out.append(Bound(cell, name, getattr(r.config, name), *hit))
    return out
