"""The study's arithmetic: pure functions of numbers and trial results (no MLflow, no files).

Declared before looking (docs/search.md; the rules that choose are :mod:`tl_sweep.study`'s):

* a **cell** is (arm, depth) within one search repeat; its chosen configuration is re-trained with the study's
  final seeds (the same seeds in every arm) and scored once on the test split, each test image's prediction
  logged; an arm's depth is chosen on validation. No test figure chooses anything;
* **chance** is a property of each cell: a one-sided test that its finals' expected test accuracy is above the
  test split's majority-class rate, over seeds and test images (:func:`tl_sweep.report.pooling.above_chance`;
  over seeds alone for a sweep logged without predictions), Holm-corrected across the study's cells;
* **NTG** (negative transfer gap, Wang et al. 2019) = test error of the source at its chosen depth − test error
  of the tuned scratch cell, in the same search repeat, paired by seed and by test image (a crossed design:
  :func:`compare`); per repeat its p-value is Holm-corrected across sources (the detail, and the "N of M"
  stability figure);
* the **headline** per source is its NTG pooled over the search repeats (random effects, modified HKSJ:
  :func:`tl_sweep.report.pooling.pool`), Holm-corrected across sources, with the repeats' heterogeneity and the
  smallest |NTG| the design resolves with 80% power: *negative transfer* (> 0, corrected p < 0.05), *transfer
  gain* (< 0), else *no difference larger than X points* where the interval lies within ±X, or *not resolved*.
  A verdict is given whenever either arm is above chance, and says when one is not;
* the per-depth table is exploratory: Holm-corrected over all of its comparisons.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from tl_sweep import study
from tl_sweep.contract import TrialResult
from tl_sweep.report import pooling
from tl_sweep.study import Cell

ALPHA = 0.05
SAME = 1e-9  # values within this share of their size are equal (float noise of a difference, not a spread)


def _spread(values: list[float], scale: list[float] | None = None) -> float:
    """The standard deviation of ``values``, 0 where it is float noise relative to ``scale`` (the numbers they
    came from: a constant gap between per-seed accuracies leaves ~1e-17 of noise, not a spread)."""
    sd = statistics.stdev(values)
    return 0.0 if sd <= SAME * max((abs(v) for v in (scale or values)), default=0.0) else sd


def _t(df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(1 - ALPHA / 2, df))


def _p(t: float, df: float) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (lo, hi); the interval is NaN with fewer than two values."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = _t(len(values) - 1) * _spread(values) / math.sqrt(len(values))
    return m, m - half, m + half


@dataclass(frozen=True)
class Gap:
    """A difference of means with its 95% interval and two-sided p-value (NaN where it cannot be estimated)."""

    gap: float
    lo: float
    hi: float
    p: float
    df: float
    paired: bool
    p_holm: float = math.nan


def paired(x: list[float], y: list[float]) -> Gap:
    """mean(y − x) over pairs with a paired t-interval (n − 1 df). No spread: no interval, no p."""
    d = [b - a for a, b in zip(x, y)]
    m, n = statistics.fmean(d), len(d)
    if n < 2 or _spread(d, [*x, *y]) == 0:
        return Gap(m, math.nan, math.nan, math.nan, n - 1, True)
    se = statistics.stdev(d) / math.sqrt(n)
    half = _t(n - 1) * se
    return Gap(m, m - half, m + half, _p(m / se, n - 1), n - 1, True)


def welch(x: list[float], y: list[float]) -> Gap:
    """mean(y) − mean(x) with Welch's interval, exact (non-integer) Welch–Satterthwaite df."""
    m = statistics.fmean(y) - statistics.fmean(x)
    n1, n2 = len(x), len(y)
    if n1 < 2 or n2 < 2:
        return Gap(m, math.nan, math.nan, math.nan, math.nan, False)
    v1, v2 = _spread(x) ** 2 / n1, _spread(y) ** 2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Gap(m, math.nan, math.nan, math.nan, math.nan, False)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    half = _t(df) * se
    return Gap(m, m - half, m + half, _p(m / se, df), df, False)


def ntg(source: dict[int, float], scratch: dict[int, float]) -> Gap:
    """NTG = error(source) − error(scratch) = acc(scratch) − acc(source), from test accuracies by seed:
    paired where the seeds match, Welch otherwise."""
    common = sorted(set(source) & set(scratch))
    if len(common) == len(source) == len(scratch):
        return paired([source[s] for s in common], [scratch[s] for s in common])
    return welch(list(source.values()), list(scratch.values()))


def holm(ps: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN and does not count)."""
    idx = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    m, out, running = len(idx), [math.nan] * len(ps), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def above_chance_p(tests: list[float], chance: float) -> float:
    """One-sided p-value that the finals' mean test accuracy is above the majority-class rate from their accuracies
    alone (a sweep logged without per-image predictions): a one-sample t-test over seeds. Seeds that all scored
    the same say nothing about the test images' sampling: NaN (not resolved), as for one seed. With predictions,
    :func:`tl_sweep.report.pooling.above_chance` tests over seeds and images."""
    from scipy import stats

    n, m = len(tests), statistics.fmean(tests)
    if n < 2:
        return math.nan
    sd = _spread(tests)
    if sd == 0:
        return math.nan
    return float(stats.t.sf((m - chance) / (sd / math.sqrt(n)), n - 1))


def best_above_chance(acc: float, n: int, chance: float, tries: int) -> float:
    """A plain sweep's winner against the validation split's majority-class rate: the exact one-sided binomial
    p-value of its correct count (``acc`` of ``n`` images) under ``chance``, times ``tries`` (Bonferroni: the best
    of several trials is the largest of several noisy scores). Above chance when below :data:`ALPHA`."""
    from scipy import stats

    k = round(acc * n)
    return min(1.0, float(stats.binom.sf(k - 1, n, chance)) * max(1, tries))


NOT_ABOVE = " (source not above chance)"
SCRATCH_AT_CHANCE = " (scratch did not learn within its budget)"
NEITHER = "no verdict: neither above chance"


def verdict(g: Gap, *, source_above: bool = True, baseline_above: bool = True, corrected: bool = True) -> str:
    """The comparison's verdict: from the (Holm-corrected) paired test, and saying when a cell is not above
    chance; no verdict only when neither is."""
    if not source_above and not baseline_above:
        return NEITHER
    p = g.p_holm if corrected else g.p
    if math.isnan(p):
        out = "not resolved (one seed, or no spread)"
    elif p >= ALPHA:
        out = "no significant difference"
    else:
        out = "negative transfer" if g.gap > 0 else "transfer gain"
    return out + ("" if source_above else NOT_ABOVE) + ("" if baseline_above else SCRATCH_AT_CHANCE)


# -------------------------------------------------------------------------------------------- analysis


@dataclass
class CellResults:
    """What one cell (:class:`tl_sweep.study.Cell`) gave: its search, selection and finals."""

    arm: str
    depth: int
    search: int
    trials: int = 0  # search trials started
    finished: int = 0  # ... that ran their whole schedule
    best_val: float = math.nan
    selection: dict[tuple, list[float]] = field(default_factory=dict)  # candidate config -> validation per seed
    final_val: dict[int, float] = field(default_factory=dict)  # seed -> best validation accuracy
    final_test: dict[int, float] = field(default_factory=dict)  # seed -> test accuracy
    images: dict[int, dict[int, int]] = field(default_factory=dict)  # seed -> test image (cache row) -> 1 right
    p_chance: float = math.nan  # Holm-corrected one-sided p of "its finals are above chance"
    above_chance: bool = True

    def outcomes(self, seeds: list[int] | None = None, rows: list[int] | None = None) -> np.ndarray:
        """Its finals' per-image outcomes, seeds × test images (1 right, 0 wrong), in sorted order."""
        seeds = sorted(self.images) if seeds is None else seeds
        rows = sorted(set.intersection(*(set(self.images[s]) for s in seeds))) if rows is None else rows
        return np.array([[self.images[s][r] for r in rows] for s in seeds], dtype=np.float64)

    @property
    def accuracy(self) -> pooling.Estimate | None:
        """Its finals' test accuracy over seeds and test images (:func:`pooling.crossed`); over seeds alone for a
        sweep logged without per-image predictions."""
        if self.images:
            return pooling.crossed(self.outcomes())
        if not self.final_test:
            return None
        v = list(self.final_test.values())
        return pooling.Estimate(statistics.fmean(v), _spread(v) ** 2 / len(v) if len(v) > 1 else math.nan,
                                len(v) - 1, len(v), 0)

    @property
    def cell(self) -> Cell:
        return Cell(self.search, self.arm, self.depth)

    @property
    def select_val(self) -> float:
        """The chosen configuration's mean validation over its selection seeds (NaN without a selection)."""
        chosen = study.choice(self.selection)
        return statistics.fmean(self.selection[chosen]) if chosen is not None else math.nan

    @property
    def val(self) -> float:
        return statistics.fmean(self.final_val.values()) if self.final_val else math.nan

    @property
    def test(self) -> tuple[float, float, float] | None:
        """Mean test accuracy and its 95% interval (seeds and images)."""
        e = self.accuracy
        return None if e is None else (e.value, *e.interval(bounds=(0.0, 1.0)))


@dataclass
class Comparison:
    arm: str
    search: int
    depth: int
    gap: Gap
    verdict: str
    estimate: pooling.Estimate | None = None  # the NTG with its variance over seeds and test images

    @property
    def cell(self) -> Cell:
        return Cell(self.search, self.arm, self.depth)


@dataclass
class Verdict:
    """A source's headline: its NTG pooled over the search repeats (each at its chosen depth), with an interval
    that carries the repeats', the seeds' and the test images' variance, the smallest |NTG| the design resolves,
    and what that means in words."""

    arm: str
    pooled: pooling.Pooled
    mde: float  # the smallest |NTG| this design detects with 80% power (a fraction, like NTG)
    verdict: str
    stability: dict[str, int]  # per-repeat verdicts: how often each came out


@dataclass
class Analysis:
    arms: list[str]
    scratch: str | None
    searches: list[int]
    chance: dict[int, float]  # search repeat -> majority-class rate of its test split
    cells: dict[Cell, CellResults] = field(default_factory=dict)
    chosen: dict[tuple[str, int], int] = field(default_factory=dict)  # (arm, search) -> depth
    primary: list[Comparison] = field(default_factory=list)  # per repeat: source at its chosen depth vs scratch
    per_depth: list[Comparison] = field(default_factory=list)  # exploratory, Holm over the whole table
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # per source: the pooled headline, Holm over sources
    # per arm: one-sided p (Holm across the arms) that its finals, pooled over the repeats, are above chance
    pooled_chance: dict[str, float] = field(default_factory=dict)
    images: bool = False  # per-image predictions were logged: intervals carry the test images' sampling

    def at(self, arm: str, depth: int, search: int) -> CellResults:
        return self.cells[Cell(search, arm, depth)]

    def depths(self, arm: str) -> list[int]:
        return sorted({c.depth for c in self.cells if c.arm == arm})

    def pooled_tests(self, arm: str, depth: int) -> list[float]:
        """Every final's test accuracy of (arm, depth), all search repeats (descriptive plots)."""
        return [t for c in self.cells.values() if (c.arm, c.depth) == (arm, depth) for t in c.final_test.values()]

    def stability(self, arm: str) -> dict[str, int]:
        """How often each per-repeat verdict came out across the search repeats."""
        out: dict[str, int] = {}
        for c in self.primary:
            if c.arm == arm:
                out[c.verdict] = out.get(c.verdict, 0) + 1
        return out

    def winners(self) -> dict[str, Cell]:
        """Per arm, its chosen cell worth publishing (:func:`tl_sweep.study.winner`). Validation only."""
        out = {}
        for arm in sorted({arm for arm, _ in self.chosen}):
            chosen = {Cell(s, arm, d): self.at(arm, d, s).val for (a, s), d in self.chosen.items() if a == arm}
            out[arm] = study.winner(chosen)
        return out


def compare(source: CellResults, base: CellResults) -> tuple[Gap, pooling.Estimate]:
    """NTG of ``source`` against ``base`` (test error of the source − test error of the baseline = acc(base) −
    acc(source)) in one search repeat: over the seeds both have and the test images both scored, paired by seed and
    by image (:func:`pooling.crossed` of the per-image differences); from their accuracies by seed where no
    predictions were logged (paired t, or Welch)."""
    seeds = sorted(set(source.images) & set(base.images))
    if seeds:
        rows = sorted(set.intersection(*(set(c.images[s]) for c in (source, base) for s in seeds)))
        e = pooling.crossed(base.outcomes(seeds, rows) - source.outcomes(seeds, rows))
        lo, hi = e.interval(bounds=(-1.0, 1.0))
        return Gap(e.value, lo, hi, e.p(), e.df, True), e
    g = ntg(source.final_test, base.final_test)
    se = (g.hi - g.lo) / (2 * _t(g.df)) if not math.isnan(g.lo) else math.nan
    return g, pooling.Estimate(g.gap, se * se if not math.isnan(se) else 0.0, g.df, len(source.final_test), 0)


def pooled_verdict(p: pooling.Pooled, mde: float, *, source_above: bool = True, baseline_above: bool = True) -> str:
    """A source's headline in words, from its pooled NTG (Holm-corrected across sources): a gain or negative
    transfer where resolved; otherwise what the design could see: "no difference larger than X points" when the
    interval lies within ±X (X: the smallest |NTG| it resolves with 80% power), else "not resolved"; and whether
    the verdict depends on the search repeat (the repeats disagree beyond their uncertainty)."""
    if not source_above and not baseline_above:
        return NEITHER
    if math.isnan(p.p_holm):
        out = "not resolved (no spread to test against)"
    elif p.p_holm < ALPHA:
        out = "negative transfer" if p.value > 0 else "transfer gain"
    elif math.isfinite(mde) and -mde < p.lo and p.hi < mde:
        out = f"no difference larger than {100 * mde:.1f} points"
    else:
        out = (f"not resolved: the design resolves only |NTG| ≥ {100 * mde:.1f} points" if math.isfinite(mde)
               else "not resolved")
    out += ("" if source_above else NOT_ABOVE) + ("" if baseline_above else SCRATCH_AT_CHANCE)
    if p.heterogeneous:
        out += f"; the verdict depends on the search repeat (Q = {p.q:.1f}, p = {p.p_q:.2g})"
    return out


def analyze(results: list[TrialResult], chance: dict[int, float] | None = None,
            predictions: dict[str, dict[int, int]] | None = None) -> Analysis:
    """The study's analysis from its trials (and each final's per-image test outcomes, run id -> row -> 1 right)."""
    search = [r for r in results if r.config.searched]
    selection = [r for r in results if r.config.candidate]
    finals = [r for r in results if r.config.final and r.test_acc is not None]
    arms = sorted({r.config.arm for r in search}, key=lambda a: (a == "scratch", a))
    predictions = predictions or {}
    a = Analysis(arms, "scratch" if "scratch" in arms else None, sorted({r.config.search for r in search}),
                 dict(chance or {}), images=bool(finals) and all(r.run_id in predictions for r in finals))

    def of(r: TrialResult) -> CellResults:
        cell = Cell.of(r.config)
        return a.cells.setdefault(cell, CellResults(cell.arm, cell.depth, cell.search))

    for r in search:
        c = of(r)
        c.trials += 1
        c.finished += r.status == "FINISHED"
        if r.best_val_acc is not None and not (c.best_val >= r.best_val_acc):
            c.best_val = r.best_val_acc
    for r in selection:
        of(r)
    for cell, scores in study.selection_means(selection).items():  # a seed that failed counts 0, as chosen
        a.cells[cell].selection = scores
    for r in finals:
        c = of(r)
        c.final_test[r.config.seed] = r.test_acc
        if r.best_val_acc is not None:
            c.final_val[r.config.seed] = r.best_val_acc
        if a.images:
            c.images[r.config.seed] = predictions[r.run_id]
    tested = [c for c in a.cells.values() if (len(c.final_test) >= 2 or c.images) and c.search in a.chance]
    ps = [pooling.above_chance(c.outcomes(), a.chance[c.search]) if c.images
          else above_chance_p(list(c.final_test.values()), a.chance[c.search]) for c in tested]
    for c, p in zip(tested, holm(ps)):
        c.p_chance, c.above_chance = p, p < ALPHA
    for arm in arms:
        for s in a.searches:
            mine = [c for c in a.cells.values() if c.arm == arm and c.search == s and c.final_val]
            if mine:  # on each depth's selection mean (a sweep recorded before the selection: its finals' validation)
                a.chosen[(arm, s)] = study.choose_depth({c.depth: c.select_val if c.selection else c.val
                                                         for c in mine})
    if a.scratch is None:
        return a
    for s in a.searches:
        base = next((c for c in a.cells.values() if c.arm == a.scratch and c.search == s and c.final_test), None)
        if base is None:
            continue
        primary = []
        for arm in arms:
            if arm == a.scratch:
                continue
            for c in sorted((c for c in a.cells.values() if c.arm == arm and c.search == s and c.final_test),
                            key=lambda c: c.depth):
                g, e = compare(c, base)
                a.per_depth.append(Comparison(arm, s, c.depth, g, "", e))
                if a.chosen.get((arm, s)) == c.depth:
                    primary.append((arm, c, g, e))
        adjusted = holm([g.p for _, _, g, _ in primary])
        for (arm, c, g, e), p in zip(primary, adjusted):
            g = Gap(g.gap, g.lo, g.hi, g.p, g.df, g.paired, p)
            a.primary.append(Comparison(arm, s, c.depth, g, verdict(g, source_above=c.above_chance,
                                                                    baseline_above=base.above_chance), e))
    # the per-depth table: exploratory, Holm-corrected over all of its comparisons
    for comp, p in zip(a.per_depth, holm([x.gap.p for x in a.per_depth])):
        base = next(c for c in a.cells.values() if c.arm == a.scratch and c.search == comp.search and c.final_test)
        comp.gap = Gap(comp.gap.gap, comp.gap.lo, comp.gap.hi, comp.gap.p, comp.gap.df, comp.gap.paired, p)
        comp.verdict = verdict(comp.gap, source_above=a.cells[comp.cell].above_chance,
                               baseline_above=base.above_chance)
    # the headline: per source, its NTG pooled over the search repeats (random effects), Holm across sources
    pooled = {arm: pooling.pool([c.estimate for c in sorted(a.primary, key=lambda c: c.search) if c.arm == arm])
              for arm in arms if arm != a.scratch and any(c.arm == arm for c in a.primary)}
    # each arm's finals against chance, pooled over the repeats as its NTG is (Holm across the arms): one repeat
    # whose search missed does not take the whole arm to "at chance", nor does one lucky repeat lift it
    pooled_cells = {arm: [a.cells[c.cell] for c in a.primary if c.arm == arm] for arm in pooled}
    pooled_cells[a.scratch] = sorted((c for c in a.cells.values() if c.arm == a.scratch and c.final_test),
                                     key=lambda c: c.search)
    tested = {arm: cs for arm, cs in pooled_cells.items()
              if cs and all(c.search in a.chance and c.accuracy is not None for c in cs)}
    ps = {arm: pooling.pooled_above_chance([c.accuracy for c in cs], [a.chance[c.search] for c in cs])
          for arm, cs in tested.items()}
    ps = {arm: p for arm, p in ps.items() if not math.isnan(p)}  # one repeat without spread: its cell's own test
    a.pooled_chance = dict(zip(ps, holm(list(ps.values()))))

    def above(arm: str) -> bool:
        if arm in a.pooled_chance:
            return a.pooled_chance[arm] < ALPHA
        return all(c.above_chance for c in pooled_cells[arm])

    for (arm, p), p_holm in zip(pooled.items(), holm([p.p for p in pooled.values()])):
        p = dataclasses.replace(p, p_holm=p_holm)
        mde = pooling.mde(p, [c.estimate.df for c in a.primary if c.arm == arm])
        a.verdicts[arm] = Verdict(arm, p, mde, pooled_verdict(p, mde, source_above=above(arm),
                                                              baseline_above=above(a.scratch)), a.stability(arm))
    return a


def cut_cells(a: Analysis) -> list[CellResults]:
    """Cells a successive halving cut: fewer search trials than the fullest cell of their repeat, no finals."""
    full = {s: max((c.trials for c in a.cells.values() if c.search == s), default=0) for s in a.searches}
    return sorted((c for c in a.cells.values() if c.arm != a.scratch and not c.final_test
                   and c.trials < full[c.search]), key=lambda c: c.cell)


def curve_runs(results: list[TrialResult], a: Analysis) -> list[tuple[str, str, str]]:
    """The learning curves worth drawing: per arm, the best search trial at its shallowest and deepest depth
    (first search repeat). Returns (label, line style, MLflow run id)."""
    out = []
    for arm in a.arms:
        mine = [r for r in results if r.config.searched and r.config.arm == arm and r.best_val_acc is not None
                and r.config.search == 0]
        if not mine:
            continue
        depths = sorted({r.config.unfrozen_blocks for r in mine})
        for depth in sorted({depths[0], depths[-1]}):
            best = max((r for r in mine if r.config.unfrozen_blocks == depth), key=lambda r: r.best_val_acc)
            label = f"{arm} k={depth}" + (" (linear probe)" if depth == 0 else "")
            out.append((label, ":" if depth < depths[-1] else "-", best.run_id))
    return out


def parent_metrics(a: Analysis) -> dict[int, dict[str, float]]:
    """The study's results as MLflow metrics of the parent run, per search repeat (the metric's step): per arm
    the chosen depth, its finals' validation and test accuracy with the interval, NTG with its interval and
    Holm p. Names are ``study/<arm>/<quantity>`` with the arm slugged (``source:x`` → ``source_x``)."""
    out: dict[int, dict[str, float]] = {}
    for (arm, s), depth in a.chosen.items():
        cell, key = a.at(arm, depth, s), "study/" + "".join(ch if ch.isalnum() or ch in "-_." else "_"
                                                                   for ch in arm)
        m = out.setdefault(s, {})
        m[f"{key}/depth"] = depth
        m[f"{key}/selection_val_acc"] = cell.select_val
        m[f"{key}/val_acc"] = cell.val
        if cell.test:
            m[f"{key}/test_acc"], m[f"{key}/test_acc_lo"], m[f"{key}/test_acc_hi"] = cell.test
        comp = next((c for c in a.primary if c.arm == arm and c.search == s), None)
        if comp:
            g = comp.gap
            m.update({f"{key}/ntg": g.gap, f"{key}/ntg_lo": g.lo, f"{key}/ntg_hi": g.hi, f"{key}/ntg_p_holm": g.p_holm})
    return {s: {k: v for k, v in m.items() if not math.isnan(v)} for s, m in out.items()}


def pooled_metrics(a: Analysis) -> dict[str, float]:
    """Each source's headline as MLflow metrics of the parent run: ``study/<arm>/pooled_ntg`` with ``_lo``, ``_hi``,
    ``_p_holm``, ``_p_better``, ``_q``, ``_i2`` and ``_mde`` (the smallest |NTG| the design resolves)."""
    out = {}
    for arm, v in a.verdicts.items():
        key, p = "study/" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in arm) + "/pooled_ntg", v.pooled
        out.update({key: p.value, f"{key}_lo": p.lo, f"{key}_hi": p.hi, f"{key}_p_holm": p.p_holm,
                    f"{key}_p_better": p.below_zero, f"{key}_q": p.q, f"{key}_i2": p.i2, f"{key}_mde": v.mde})
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ------------------------------------------------------------------- transferability estimates vs truth


@dataclass
class Agreement:
    """How one transferability estimate's ranking of the cells agrees with the finals' test accuracies."""

    estimate: str
    cells: int
    tau: float  # Kendall's tau-b
    p: float  # its exact two-sided p-value (no ties) or the asymptotic one
    weighted_tau: float  # scipy's weighted tau (hyperbolic weights on the top ranks), as the LogME paper reports
    top_estimated: list[tuple[str, int]]  # the cells the estimate ranks first (several where it ties them)
    top_true: tuple[str, int]

    @property
    def right_top(self) -> bool:
        return self.top_true in self.top_estimated


def truth_per_cell(a: Analysis) -> dict[tuple[str, int], float]:
    """Each trained cell's mean final test accuracy, every search repeat's finals pooled."""
    out = {}
    for arm, depth in {(c.arm, c.depth) for c in a.cells.values()}:
        tests = a.pooled_tests(arm, depth)
        if tests:
            out[(arm, depth)] = statistics.fmean(tests)
    return out


def agreement(estimates: dict[tuple[str, int], dict[str, float]], truth: dict[tuple[str, int], float]
              ) -> list[Agreement]:
    """Per estimate, over the cells that have both an estimate and finals (at least 3)."""
    from scipy import stats

    from tl_sweep.transferability import ESTIMATES

    out = []
    names = [n for n in ESTIMATES if any(n in v for v in estimates.values())]
    for name in names:
        cells = sorted(c for c in estimates if name in estimates[c] and c in truth)
        if len(cells) < 3:
            continue
        x = [estimates[c][name] for c in cells]
        y = [truth[c] for c in cells]
        tau = stats.kendalltau(x, y)
        weighted = stats.weightedtau(x, y)
        top = max(x)
        out.append(Agreement(name, len(cells), float(tau.statistic), float(tau.pvalue), float(weighted.statistic),
                             [c for c in cells if estimates[c][name] == top], max(cells, key=lambda c: truth[c])))
    return out
