"""The study's arithmetic: pure functions of numbers and trial results (no MLflow, no files).

Declared before looking (docs/search.md):

* a **cell** is (arm, depth) within one search repeat. Its best configurations (search validation, trials that
  ran their whole schedule first) are re-trained with new seeds on validation (the *selection*); the one with
  the best mean is the cell's choice. That choice is re-trained with the study's final seeds (the same seeds in
  every arm) and scored once on the test split;
* an arm's **depth** is chosen on its cells' selection means (validation, seeds the finals do not use); ties go
  to the shallower (cheaper) depth. No test figure, and no final, chooses anything: the chosen depth's test
  figure is not the best of several noisy finals;
* **chance** is a property of each cell: a one-sided t-test over its finals' seeds that their mean test accuracy
  is above the test split's majority-class rate, Holm-corrected across the study's cells: *above chance* or
  *not shown above chance*;
* **NTG** (negative transfer gap, Wang et al. 2019) = test error of the source at its chosen depth − test error
  of the tuned scratch cell, in the same search repeat. With the same seeds in both arms the interval is a
  paired t-interval over seeds; otherwise Welch's, with the exact Welch–Satterthwaite degrees of freedom. Its
  p-value is Holm-corrected across sources. NTG > 0 with corrected p < 0.05 is *negative transfer*, < 0 a
  *transfer gain*; otherwise *no significant difference*. The verdict is given whenever either cell is above
  chance, and says when one is not: *(source not above chance)*, or *(scratch did not learn within its budget)*;
  only when neither is above chance is there none;
* per-depth gaps are descriptive (uncorrected) and labelled so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from tl_sweep.contract import NAMES, TrialResult

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
    """One-sided p-value that the finals' mean test accuracy is above the majority-class rate: a one-sample
    t-test over seeds (with no spread: 0 when they are all above it, 1 otherwise; NaN for one seed)."""
    from scipy import stats

    n, m = len(tests), statistics.fmean(tests)
    if n < 2:
        return math.nan
    sd = _spread(tests)
    if sd == 0:
        return 0.0 if m > chance else 1.0
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


def expected_max(values: list[float], n: int) -> float:
    """Expected best of ``n`` trials drawn (with replacement) from ``values`` (Dodge et al. 2019)."""
    v = sorted(values)
    N = len(v)
    return sum(x * ((i / N) ** n - ((i - 1) / N) ** n) for i, x in enumerate(v, start=1))


# -------------------------------------------------------------------------------------------- analysis


@dataclass
class Cell:
    arm: str
    depth: int
    search: int
    trials: int = 0  # search trials started
    finished: int = 0  # ... that ran their whole schedule
    best_val: float = math.nan
    selection: dict[tuple, list[float]] = field(default_factory=dict)  # candidate config -> validation per seed
    final_val: dict[int, float] = field(default_factory=dict)  # seed -> best validation accuracy
    final_test: dict[int, float] = field(default_factory=dict)  # seed -> test accuracy
    p_chance: float = math.nan  # Holm-corrected one-sided p of "its finals are above chance"
    above_chance: bool = True

    @property
    def select_val(self) -> float:
        """The chosen configuration's mean validation over its selection seeds (NaN without a selection)."""
        means = [statistics.fmean(v) for v in self.selection.values() if v]
        return max(means) if means else math.nan

    @property
    def val(self) -> float:
        return statistics.fmean(self.final_val.values()) if self.final_val else math.nan

    @property
    def test(self) -> tuple[float, float, float] | None:
        return mean_ci(list(self.final_test.values())) if self.final_test else None


@dataclass
class Comparison:
    arm: str
    search: int
    depth: int
    gap: Gap
    verdict: str


@dataclass
class Analysis:
    arms: list[str]
    scratch: str | None
    searches: list[int]
    chance: dict[int, float]  # search repeat -> majority-class rate of its test split
    cells: dict[tuple[str, int, int], Cell] = field(default_factory=dict)
    chosen: dict[tuple[str, int], int] = field(default_factory=dict)  # (arm, search) -> depth
    primary: list[Comparison] = field(default_factory=list)  # source at its chosen depth vs scratch, Holm
    per_depth: list[Comparison] = field(default_factory=list)  # descriptive, uncorrected

    def depths(self, arm: str) -> list[int]:
        return sorted({d for (a, d, _) in self.cells if a == arm})

    def pooled_tests(self, arm: str, depth: int) -> list[float]:
        """Every final's test accuracy of (arm, depth), all search repeats (descriptive plots)."""
        return [t for c in self.cells.values() if (c.arm, c.depth) == (arm, depth) for t in c.final_test.values()]

    def stability(self, arm: str) -> dict[str, int]:
        """How often each verdict came out across the search repeats."""
        out: dict[str, int] = {}
        for c in self.primary:
            if c.arm == arm:
                out[c.verdict] = out.get(c.verdict, 0) + 1
        return out


def choose_depth(cells: list[Cell]) -> int:
    """The declared rule: the best selection mean (validation on seeds the finals do not use; a sweep recorded
    before the selection existed: its finals' mean validation); ties to the shallower depth."""
    score = lambda c: c.select_val if c.selection else c.val  # noqa: E731
    return min(cells, key=lambda c: (-(score(c) if not math.isnan(score(c)) else -1), c.depth)).depth


def analyze(results: list[TrialResult], chance: dict[int, float] | None = None) -> Analysis:
    search = [r for r in results if r.config.searched]
    selection = [r for r in results if r.config.candidate]
    finals = [r for r in results if r.config.final and r.test_acc is not None]
    arms = sorted({r.config.arm for r in search}, key=lambda a: (a == "scratch", a))
    a = Analysis(arms, "scratch" if "scratch" in arms else None, sorted({r.config.search for r in search}),
                 dict(chance or {}))
    for r in search:
        c = a.cells.setdefault((r.config.arm, r.config.unfrozen_blocks, r.config.search), Cell(*r.config.cell,
                                                                                                 r.config.search))
        c.trials += 1
        c.finished += r.status == "FINISHED"
        if r.best_val_acc is not None and not (c.best_val >= r.best_val_acc):
            c.best_val = r.best_val_acc
    for r in selection:  # a seed that failed counts 0, as the runner's choice counted it
        c = a.cells.setdefault((r.config.arm, r.config.unfrozen_blocks, r.config.search), Cell(*r.config.cell,
                                                                                                 r.config.search))
        c.selection.setdefault(tuple(sorted(r.config.dims().items())), []).append(
            0.0 if r.status == "FAILED" or r.best_val_acc is None else r.best_val_acc)
    for r in finals:
        c = a.cells.setdefault((r.config.arm, r.config.unfrozen_blocks, r.config.search), Cell(*r.config.cell,
                                                                                                 r.config.search))
        c.final_test[r.config.seed] = r.test_acc
        if r.best_val_acc is not None:
            c.final_val[r.config.seed] = r.best_val_acc
    tested = [c for c in a.cells.values() if len(c.final_test) >= 2 and a.chance.get(c.search) is not None]
    for c, p in zip(tested, holm([above_chance_p(list(c.final_test.values()), a.chance[c.search]) for c in tested])):
        c.p_chance, c.above_chance = p, p < ALPHA
    for arm in arms:
        for s in a.searches:
            mine = [c for c in a.cells.values() if c.arm == arm and c.search == s and c.final_val]
            if mine:
                a.chosen[(arm, s)] = choose_depth(mine)
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
                g = ntg(c.final_test, base.final_test)
                a.per_depth.append(Comparison(arm, s, c.depth, g, verdict(g, source_above=c.above_chance,
                                                                          baseline_above=base.above_chance,
                                                                          corrected=False)))
                if a.chosen.get((arm, s)) == c.depth:
                    primary.append((arm, c, g))
        adjusted = holm([g.p for _, _, g in primary])
        for (arm, c, g), p in zip(primary, adjusted):
            g = Gap(g.gap, g.lo, g.hi, g.p, g.df, g.paired, p)
            a.primary.append(Comparison(arm, s, c.depth, g, verdict(g, source_above=c.above_chance,
                                                                    baseline_above=base.above_chance)))
    return a


def cut_cells(a: Analysis) -> list[Cell]:
    """Cells a successive halving cut: fewer search trials than the fullest cell of their repeat, no finals."""
    full = {s: max((c.trials for c in a.cells.values() if c.search == s), default=0) for s in a.searches}
    return sorted((c for c in a.cells.values() if c.arm != a.scratch and not c.final_test
                   and c.trials < full[c.search]), key=lambda c: (c.search, c.arm, c.depth))


@dataclass
class BudgetCurve:
    """One cell's search in one repeat: expected best validation accuracy after n = 1 .. ``started`` trials
    (Dodge et al. 2019) from the trials that ran their whole schedule, with a 90% bootstrap band."""

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
    after n trials, n up to the trials it was given. Only full-schedule scores count (a trial ASHA stopped at
    half its schedule scored a partial run); the band resamples those scores."""
    import numpy as np

    cells: dict[tuple, list[TrialResult]] = {}
    for r in results:
        if r.config.searched:
            cells.setdefault((r.config.arm, r.config.unfrozen_blocks, r.config.search), []).append(r)
    rng, out = np.random.default_rng(seed), []
    for (arm, depth, search), rs in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        done = [r.best_val_acc for r in rs if r.status == "FINISHED" and r.best_val_acc is not None]
        if len(done) < 2:
            continue
        n = range(1, len(rs) + 1)
        boot = np.array([[expected_max(list(rng.choice(done, len(done))), k) for k in n] for _ in range(draws)])
        out.append(BudgetCurve(arm, depth, search, len(rs), len(done), [expected_max(done, k) for k in n],
                               list(np.percentile(boot, 5, axis=0)), list(np.percentile(boot, 95, axis=0))))
    return out


def cost(results: list[TrialResult]) -> dict[tuple[str, int], float]:
    """Compute seconds per (arm, depth): every search trial and final of the cell, all repeats."""
    out: dict[tuple[str, int], float] = {}
    for r in results:
        if r.seconds is not None:
            out[r.config.cell] = out.get(r.config.cell, 0.0) + r.seconds
    return out


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


def search_study(results: list[TrialResult]):
    """An in-memory Optuna study of finished search trials (importance, parallel coordinates); ``None`` when
    fewer than three finished or nothing varied."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [r for r in results if r.config.searched and r.status == "FINISHED" and r.best_val_acc is not None]
    dists = {}
    for d in NAMES:
        vals = sorted({getattr(r.config, d) for r in done}, key=str)
        if len(vals) < 2:
            continue
        if all(isinstance(v, int) for v in vals):
            dists[d] = IntDistribution(min(vals), max(vals))
        elif all(isinstance(v, (int, float)) for v in vals):
            dists[d] = FloatDistribution(min(vals), max(vals), log=min(vals) > 0 and max(vals) / min(vals) > 20)
        else:
            dists[d] = CategoricalDistribution([str(v) for v in vals])
    if len(done) < 3 or not dists:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for r in done:
        params = {d: (str(getattr(r.config, d)) if isinstance(dist, CategoricalDistribution) else getattr(r.config, d))
                  for d, dist in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r.best_val_acc))
    return study


def importance(study) -> dict[str, float]:
    """fANOVA importance of each searched dimension for the best validation accuracy (seeded); none when every
    trial scored the same (nothing to explain: fANOVA itself refuses zero variance)."""
    import optuna

    if study is None or len({t.value for t in study.trials}) < 2:
        return {}
    return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def importance_per_arm(results: list[TrialResult]) -> dict[str, dict[str, float]]:
    """fANOVA importance within each arm (depth is a dimension of a pretrained arm, never of scratch)."""
    out = {}
    for arm in sorted({r.config.arm for r in results if r.config.searched}):
        imp = importance(search_study([r for r in results if r.config.arm == arm]))
        if imp:
            out[arm] = imp
    return out


def parent_metrics(a: Analysis) -> dict[int, dict[str, float]]:
    """The study's results as MLflow metrics of the parent run, per search repeat (the metric's step): per arm
    the chosen depth, its finals' validation and test accuracy with the interval, NTG with its interval and
    Holm p. Names are ``study/<arm>/<quantity>`` with the arm slugged (``source:x`` → ``source_x``)."""
    out: dict[int, dict[str, float]] = {}
    for (arm, s), depth in a.chosen.items():
        cell, key = a.cells[(arm, depth, s)], "study/" + "".join(ch if ch.isalnum() or ch in "-_." else "_"
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


def winners(a: Analysis) -> dict[str, Cell]:
    """Per arm, the chosen cell with the best finals' mean validation accuracy over the search repeats (ties:
    shallower depth, earlier repeat): the configuration worth publishing. Validation only, like every choice."""
    out: dict[str, Cell] = {}
    for (arm, s), depth in sorted(a.chosen.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        c = a.cells[(arm, depth, s)]
        if arm not in out or (c.val, -c.depth, -c.search) > (out[arm].val, -out[arm].depth, -out[arm].search):
            out[arm] = c
    return out


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
