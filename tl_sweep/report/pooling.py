"""Estimates that carry every source of variance a study has: seeds, test images and search repeats.

Pure functions of numbers (numpy and scipy only):

* :func:`crossed`: the mean of a seeds × images table of per-image outcomes (1 = right, or a paired difference
  of two arms' outcomes, in {-1, 0, 1}) with the variance of a **crossed random-effects design**: a final's seed
  and a test image are both sampled, each image is scored by every seed. The variance is
  ``σ²_seed / S + σ²_image / N + σ²_residual / (S·N)`` with the components from the two-way ANOVA's mean squares
  (negative components set to 0, so it never under-states), and Satterthwaite's degrees of freedom. With every
  seed scoring every image alike it is the binomial variance over images (no seed spread is not no spread).
* :func:`pool`: a **random-effects pool** over search repeats (each repeat its own search, selection, depth choice
  and finals): DerSimonian–Laird's between-repeat variance τ², then the Hartung–Knapp–Sidik–Jonkman interval
  with ``k − 1`` degrees of freedom, its scale kept at 1 or more (the "modified" HKSJ: with 2 to 5 repeats the
  plain one can be narrower than the repeats' spread). Cochran's Q, its p-value and I² say how far the repeats
  disagree beyond their own uncertainty. One repeat: its own interval.
* :func:`mde`: the smallest |effect| the same design detects with 80% power (two-sided, α = 0.05), by simulating
  the pooled test with the observed within-repeat variances and τ².

Checked against statsmodels' meta-analysis (itself checked against R's metafor) and scipy in
``tests/test_pooling.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Estimate:
    """A mean (or a paired difference of means) with its variance and degrees of freedom."""

    value: float
    var: float
    df: float
    seeds: int = 0
    images: int = 0

    @property
    def se(self) -> float:
        return math.sqrt(self.var)

    def interval(self, alpha: float = ALPHA, bounds: tuple[float, float] = (-math.inf, math.inf)
                 ) -> tuple[float, float]:
        """The t-interval, within ``bounds`` (an accuracy is in [0, 1], a difference of two in [-1, 1]: a
        t-interval over few seeds can reach past them)."""
        if self.var <= 0 or not math.isfinite(self.df) or self.df <= 0:
            return math.nan, math.nan
        from scipy import stats

        half = float(stats.t.ppf(1 - alpha / 2, self.df)) * self.se
        return max(bounds[0], self.value - half), min(bounds[1], self.value + half)

    def p(self, null: float = 0.0) -> float:
        """Two-sided p-value of ``value == null``."""
        if self.var <= 0 or self.df <= 0:
            return math.nan
        from scipy import stats

        return float(2 * stats.t.sf(abs(self.value - null) / self.se, self.df))

    def p_above(self, null: float) -> float:
        """One-sided p-value of ``value > null``."""
        if self.var <= 0 or self.df <= 0:
            return math.nan
        from scipy import stats

        return float(stats.t.sf((self.value - null) / self.se, self.df))


def crossed(y: np.ndarray) -> Estimate:
    """The grand mean of ``y`` (seeds × images) and its variance under a crossed random-effects design."""
    y = np.asarray(y, dtype=np.float64)
    s, n = y.shape
    m = float(y.mean())
    if n < 2:
        return Estimate(m, math.nan, math.nan, s, n)
    if s == 1:  # one seed: image sampling only (the seed's own spread cannot be estimated)
        v = float(y[0].var(ddof=1)) / n
        return Estimate(m, v, n - 1, s, n)
    rows, cols = y.mean(axis=1), y.mean(axis=0)
    ms_s = n * float(((rows - m) ** 2).sum()) / (s - 1)
    ms_i = s * float(((cols - m) ** 2).sum()) / (n - 1)
    resid = y - rows[:, None] - cols[None, :] + m
    ms_e = float((resid ** 2).sum()) / ((s - 1) * (n - 1))
    # var = σ²_s/S + σ²_i/N + σ²_e/(S·N); σ²_s = (MS_s − MS_e)/N, σ²_i = (MS_i − MS_e)/S, each ≥ 0;
    # as a combination of mean squares, Σ c_j·MS_j
    c = {"s": 0.0, "i": 0.0, "e": 1.0}
    if ms_s > ms_e:
        c["s"], c["e"] = c["s"] + 1, c["e"] - 1
    if ms_i > ms_e:
        c["i"], c["e"] = c["i"] + 1, c["e"] - 1
    ms, dfs = {"s": ms_s, "i": ms_i, "e": ms_e}, {"s": s - 1, "i": n - 1, "e": (s - 1) * (n - 1)}
    v = sum(c[j] * ms[j] for j in c) / (s * n)
    den = sum((c[j] * ms[j] / (s * n)) ** 2 / dfs[j] for j in c if c[j] * ms[j])
    return Estimate(m, max(v, 0.0), v * v / den if den > 0 else math.inf, s, n)


def above_chance(y: np.ndarray, chance: float) -> float:
    """One-sided p-value that a cell's expected test accuracy (seeds × images outcomes ``y``) is above the
    majority-class rate, over seeds and images (:func:`crossed`); where the outcomes have no spread at all (every
    seed right on the same images), the exact binomial test over the images."""
    e = crossed(y)
    if e.var > 0 and math.isfinite(e.df):
        return e.p_above(chance)
    from scipy import stats

    n = e.images
    k = round(float(np.asarray(y).mean(axis=0).sum()))
    return float(stats.binom.sf(k - 1, n, chance))


@dataclass(frozen=True)
class Pooled:
    """An effect pooled over search repeats (random effects, modified HKSJ), with the repeats' heterogeneity."""

    value: float
    lo: float
    hi: float
    p: float  # two-sided, effect == 0
    se: float
    df: float
    k: int  # search repeats pooled
    q: float = math.nan  # Cochran's Q
    p_q: float = math.nan
    i2: float = math.nan  # share of the spread between repeats beyond their own uncertainty
    tau2: float = math.nan  # between-repeat variance (DerSimonian–Laird)
    within: tuple[float, ...] = ()  # each repeat's variance (seeds and images)
    p_holm: float = math.nan

    @property
    def below_zero(self) -> float:
        """One-sided confidence that the effect is below 0 (for an NTG: that the source is better than scratch):
        the t distribution's mass below 0 around the estimate."""
        if not self.se > 0 or not math.isfinite(self.df):
            return math.nan
        from scipy import stats

        return float(stats.t.cdf(-self.value / self.se, self.df))

    @property
    def heterogeneous(self) -> bool:
        """The repeats disagree beyond their own uncertainty (Cochran's Q, p < 0.10: the test has little power
        with few repeats, hence the usual 0.10)."""
        return self.k > 1 and self.p_q < 0.10


def dersimonian_laird(effects, variances) -> tuple[float, float, float]:
    """(τ², Q, the fixed-effect estimate) of effects with known within variances."""
    y, v = np.asarray(effects, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    w = 1 / v
    fe = float((w * y).sum() / w.sum())
    q = float((w * (y - fe) ** 2).sum())
    c = float(w.sum() - (w ** 2).sum() / w.sum())
    return max(0.0, (q - (len(y) - 1)) / c) if c > 0 else 0.0, q, fe


def hksj(effects, variances, tau2: float, modified: bool = True) -> tuple[float, float]:
    """The random-effects estimate and its Hartung–Knapp–Sidik–Jonkman standard error (scale at least 1 when
    ``modified``)."""
    y, v = np.asarray(effects, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    w = 1 / (v + tau2)
    mu = float((w * y).sum() / w.sum())
    scale = float((w * (y - mu) ** 2).sum()) / (len(y) - 1)
    return mu, math.sqrt((max(scale, 1.0) if modified else scale) / float(w.sum()))


def floor(variances, cells: list[int]) -> list[float]:
    """A repeat whose outcomes had no spread at all has variance 0; it is given that of one outcome in its
    seeds × images changing (``1/(S·N)²``), so the pool's weights stay finite."""
    return [v if v > 0 else 1.0 / max(1, n) ** 2 for v, n in zip(variances, cells)]


def pool(estimates: list[Estimate]) -> Pooled:
    """Random-effects pool of per-repeat estimates (module docstring)."""
    from scipy import stats

    k = len(estimates)
    y = [e.value for e in estimates]
    v = floor([e.var for e in estimates], [e.seeds * e.images for e in estimates])
    if k == 1:
        e = estimates[0]
        lo, hi = e.interval()
        return Pooled(e.value, lo, hi, e.p(), e.se, e.df, 1, within=tuple(v))
    tau2, q, _ = dersimonian_laird(y, v)
    mu, se = hksj(y, v, tau2)
    half = float(stats.t.ppf(1 - ALPHA / 2, k - 1)) * se
    p = float(2 * stats.t.sf(abs(mu) / se, k - 1)) if se > 0 else math.nan
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    return Pooled(mu, mu - half, mu + half, p, se, k - 1, k, q, float(stats.chi2.sf(q, k - 1)), i2, tau2, tuple(v))


def pooled_above_chance(estimates: list[Estimate], chances: list[float]) -> float:
    """One-sided p-value that an arm's expected test accuracy, pooled over the search repeats as the headline pools
    its NTG (:func:`pool`), is above the majority-class rate (each repeat's own: each draws its own test split)."""
    from scipy import stats

    if len(estimates) == 1:
        return estimates[0].p_above(chances[0])
    p = pool([dataclasses.replace(e, value=e.value - c) for e, c in zip(estimates, chances)])
    if not p.se > 0:
        return 0.0 if p.value > 0 else 1.0
    return float(stats.t.sf(p.value / p.se, p.df))


def power(effect: float, within: list[float], tau2: float, df: list[float] | None = None, sims: int = 4000,
          seed: int = 0) -> float:
    """The share of simulated studies (each repeat's effect ~ N(effect, within + τ²)) whose pooled test rejects 0
    at ``ALPHA`` (two-sided), τ² re-estimated in each as :func:`pool` does."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    v = np.asarray(within, dtype=np.float64)
    k = len(v)
    z = rng.standard_normal((sims, k))
    y = effect + z * np.sqrt(v + tau2)
    if k == 1:
        crit = float(stats.t.ppf(1 - ALPHA / 2, (df or [math.inf])[0]))
        return float((np.abs(y[:, 0]) / math.sqrt(v[0]) > crit).mean())
    w = 1 / v
    fe = (y * w).sum(1) / w.sum()
    q = (w * (y - fe[:, None]) ** 2).sum(1)
    c = w.sum() - (w ** 2).sum() / w.sum()
    t2 = np.maximum(0.0, (q - (k - 1)) / c)
    ws = 1 / (v[None, :] + t2[:, None])
    mu = (ws * y).sum(1) / ws.sum(1)
    scale = np.maximum((ws * (y - mu[:, None]) ** 2).sum(1) / (k - 1), 1.0)
    se = np.sqrt(scale / ws.sum(1))
    return float((np.abs(mu) / se > float(stats.t.ppf(1 - ALPHA / 2, k - 1))).mean())


def mde(pooled: Pooled, df: list[float] | None = None, target: float = POWER) -> float:
    """The smallest |effect| (in the effect's own units) detected with ``target`` power by this design: the
    pooled test simulated with ``pooled``'s within-repeat variances and τ² (common random numbers across effects,
    so power rises with the effect); NaN when the design has no variance to simulate."""
    within = list(pooled.within)
    if not within or not all(math.isfinite(v) and v > 0 for v in within):
        return math.nan
    tau2 = pooled.tau2 if math.isfinite(pooled.tau2) else 0.0
    lo, hi = 0.0, 4 * math.sqrt(max(within) + tau2) + 1e-9
    while power(hi, within, tau2, df) < target:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(mid, within, tau2, df) < target else (lo, mid)
    return hi
