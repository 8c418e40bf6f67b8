"""A study's rules, declared before looking, each defined once: what a cell is, the seeds of each phase, how a
cell's search trials rank, which configurations are re-trained (the candidates), which one is chosen (the
finalists), how an arm's depth and its winner are chosen, and successive halving's budgets.

Pure: configurations and results in, decisions out (no Ray, no MLflow, no files). The searcher
(:mod:`tl_sweep.space`), the runner's phases and the report's statistics (:mod:`tl_sweep.report.stats`) all call
these, so "how finals are chosen" is an edit to this file alone.

The rules, in words (docs/search.md#studies):

* a **cell** is (arm, depth) within one search repeat: :class:`Cell`;
* a cell's search trials rank by their best validation accuracy, trials that ran their whole schedule first (an
  early-stopped trial's score is mid-schedule), ties to the earlier trial: :func:`search_order`;
* its ``n`` best configurations are re-trained with new seeds on validation (:func:`candidates`); the one with the
  best mean (a seed that failed counts 0; ties to the better search rank) is the cell's choice
  (:func:`finalists`), re-trained with the final seeds, the same in every arm, and scored once on test;
* an arm's depth is the one whose choice has the best selection mean, ties to the shallower (cheaper) depth
  (:func:`choose_depth`); no test figure chooses anything;
* the configuration worth publishing per arm is its chosen cell with the best finals' mean validation accuracy
  over the search repeats, ties to the shallower depth, then the earlier repeat (:func:`winner`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from dataclasses import dataclass
from typing import Iterable

from tl_sweep.contract import TrialConfig, TrialResult


@dataclass(frozen=True, order=True)
class Cell:
    """One cell of a study's grid in one search repeat. Ordered by search repeat, arm, depth."""

    search: int
    arm: str
    depth: int

    @classmethod
    def of(cls, c: TrialConfig) -> Cell:
        return cls(c.search, c.arm, c.unfrozen_blocks)

    @property
    def grid(self) -> tuple[str, int]:
        """The cell over every search repeat: (arm, depth)."""
        return self.arm, self.depth

    def __str__(self) -> str:
        return f"{self.arm}@k={self.depth}"


# ------------------------------------------------------------------------------------------------ seeds


def final_seeds(seed: int, search: int, n: int) -> list[int]:
    """The seeds of a search repeat's final re-trainings: the same in every arm (pairing), new per repeat."""
    return [seed + 1000 + 100 * search + i for i in range(n)]


def selection_seeds(seed: int, search: int, n: int) -> list[int]:
    """The seeds of a search repeat's selection re-trainings: new to the search and to the finals."""
    return [seed + 2000 + 100 * search + i for i in range(n)]


def sampler_seed(seed: int, arm: str, depth: int, search: int) -> int:
    """The TPE sampler seed of one cell's search repeat: independent across cells and repeats, fixed by the spec."""
    return int(hashlib.sha256(f"{seed}/{arm}/{depth}/{search}".encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------------- ranking


def search_order(finished: bool, best_val: float) -> tuple[bool, float]:
    """A search trial's rank within its cell (sort ascending; stable, so ties keep the earlier trial): those that
    ran their whole schedule first, then by best validation accuracy."""
    return not finished, -best_val


def standing(scores: Iterable[tuple[bool, float]]) -> tuple[float, float, float]:
    """A cell's standing at a halving rung from its ended trials' (whole schedule, best validation) pairs, by the
    same rule: its best and second best among whole schedules, then its best of any trial (-1: none)."""
    scores = list(scores)
    whole = sorted((v for done, v in scores if done), reverse=True) + [-1.0, -1.0]
    return whole[0], whole[1], max((v for _, v in scores), default=-1.0)


def selection_score(r: TrialResult) -> float:
    """A selection re-training's score: its best validation accuracy, 0 for a seed that failed."""
    return 0.0 if r.status == "FAILED" or r.best_val_acc is None else r.best_val_acc


def configuration(c: TrialConfig) -> tuple:
    """What identifies a configuration across its re-trainings (the search dimensions, not the seed or role)."""
    return tuple(sorted(c.dims().items()))


# ------------------------------------------------------------------------------------- the selection


def candidates(results: list[TrialResult], seed: int, n: int, seeds: int, full_budget: int | None = None
               ) -> list[TrialConfig]:
    """Step one: per cell, its ``n`` best search configurations (:func:`search_order`; failed trials are none),
    each re-trained with ``seeds`` new seeds (role ``candidate``: validation only). With ``full_budget``
    (``study.allocate: halving``), only cells that got it: the others were cut."""
    count: dict[Cell, int] = {}
    for r in results:
        count[Cell.of(r.config)] = count.get(Cell.of(r.config), 0) + 1
    ranked: dict[Cell, list[TrialResult]] = {}
    for r in results:
        cell = Cell.of(r.config)
        if r.status == "FAILED" or r.best_val_acc is None or (full_budget and count[cell] < full_budget):
            continue
        ranked.setdefault(cell, []).append(r)
    out = []
    for cell in sorted(ranked):
        best = sorted(ranked[cell], key=lambda r: search_order(r.status == "FINISHED", r.best_val_acc))[:n]
        out += [dataclasses.replace(r.config, seed=s, role="candidate") for r in best
                for s in selection_seeds(seed, cell.search, seeds)]
    return out


def selection_means(selection: list[TrialResult]) -> dict[Cell, dict[tuple, list[float]]]:
    """Per cell, each candidate configuration's selection scores, in the order the candidates were ranked."""
    out: dict[Cell, dict[tuple, list[float]]] = {}
    for r in selection:
        out.setdefault(Cell.of(r.config), {}).setdefault(configuration(r.config), []).append(selection_score(r))
    return out


def choice(scores: dict[tuple, list[float]]) -> tuple | None:
    """The chosen configuration among a cell's candidates: the best mean; ties to the better search rank (the
    first in ``scores``)."""
    means = {k: statistics.fmean(v) for k, v in scores.items() if v}
    return max(means, key=means.get) if means else None


def finalists(selection: list[TrialResult], seed: int, repeats: int) -> list[TrialConfig]:
    """Step two: per cell, its chosen configuration (:func:`choice`), one config per final seed (the same seeds
    in every arm)."""
    configs: dict[tuple, TrialConfig] = {}
    for r in selection:
        configs.setdefault((Cell.of(r.config), configuration(r.config)), r.config)
    out = []
    for cell, scores in sorted(selection_means(selection).items()):
        chosen = configs[(cell, choice(scores))]
        out += [dataclasses.replace(chosen, seed=s, role="final") for s in final_seeds(seed, cell.search, repeats)]
    return out


def choose_depth(scores: dict[int, float]) -> int:
    """An arm's depth in one search repeat from each depth's score (its choice's selection mean): the best, ties
    to the shallower depth; a missing score (NaN) ranks last."""
    return min(scores, key=lambda d: (-(scores[d] if not math.isnan(scores[d]) else -1), d))


def winner(chosen: dict[Cell, float]) -> Cell:
    """Of an arm's chosen cells (one per search repeat) with their finals' mean validation accuracy, the one worth
    publishing: the best, ties to the shallower depth, then the earlier repeat."""
    return max(sorted(chosen), key=lambda c: (chosen[c], -c.depth, -c.search))


# ------------------------------------------------------------------------------------- halving budgets


def halving_budgets(trials_per_cell: int, cells: int, eta: int, first: int | None = None) -> list[int]:
    """Successive halving's cumulative trials per cell at each rung, the last one the full budget.

    The first rung is ``first`` trials (default: the budget / ``eta``, at least 2); each later one ``eta`` times
    more, while more than one cell would be left to cut. On the default study a first rung of 2 of 8 trials
    (TPE's random start-up draws) ended on another depth than the grid design's in 4 of 6 (source, repeat)
    pairs, half the budget in 2 of 6 (BENCHMARKS.md)."""
    r = min(first or max(2, math.ceil(trials_per_cell / eta)), trials_per_cell)
    rungs, alive = [], cells
    while r < trials_per_cell and alive > 1:
        rungs.append(r)
        r, alive = r * eta, math.ceil(alive / eta)
    return rungs + [trials_per_cell]
