"""A transfer matrix's results (pure): each (target, source)'s pooled NTG with Holm over the whole matrix, the best
source per target with its margins, and how well each transferability estimate ranked the sources per target.

Inputs are the parts' :class:`~tl_sweep.report.stats.Analysis` objects (one single-target study per target and
architecture) with their estimates and compute; nothing here reads MLflow.

* **The matrix**: each source's headline (:attr:`Analysis.verdicts`: NTG pooled over the search repeats, at each
  repeat's chosen depth, against the scratch baseline of its own architecture), its raw p Holm-corrected over every
  (target, source) of the matrix; a verdict "holds" where that p is below 0.05 and both arms are above chance.
* **Best source per target**: the source whose chosen cells have the best mean final test accuracy (every search
  repeat); its margin over scratch is −NTG, its margin over the runner-up the same paired, pooled comparison with
  the runner-up as the baseline (the finals share seeds and test images across arms and architectures).
* **Estimates**: a source's estimate for a target is its best over the depths (the cell the estimate would pick);
  per target, Kendall's τ and weighted τ (scipy) of those against the sources' finals, and whether the estimate's
  top source is the finals' best (top-1 hit); over the matrix, the mean τ and the hit rate, held to the k-NN probe.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from tl_sweep.report import pooling
from tl_sweep.report.stats import ALPHA, NEITHER, NOT_ABOVE, SCRATCH_AT_CHANCE, Analysis, compare, holm


@dataclass
class Part:
    """One single-target study of the matrix, as its report analysed it."""

    name: str
    target: str
    arch: str
    run_id: str
    analysis: Analysis
    estimates: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)  # arm -> seconds


@dataclass
class Entry:
    """One (target, source) of the matrix."""

    target: str
    source: str
    arch: str
    pooled: pooling.Pooled  # NTG against its architecture's scratch, pooled over the search repeats
    verdict: str  # the part's words (Holm over its sources)
    depths: list[int]  # the depth chosen in each search repeat
    accuracy: float  # mean final test accuracy of its chosen cells, every search repeat
    scratch: float  # the same for its scratch baseline
    p_matrix: float = math.nan  # Holm over every (target, source) of the matrix
    holds: bool = False

    @property
    def label(self) -> str:
        return self.source


@dataclass
class Best:
    target: str
    source: str
    accuracy: float
    over_scratch: tuple[float, float, float]  # −NTG with its interval (points of accuracy, a fraction)
    runner_up: str | None = None
    over_runner_up: pooling.Pooled | None = None  # acc(best) − acc(runner-up), pooled over repeats


@dataclass
class Ranking:
    """How one estimate ranked each target's sources against the finals."""

    estimate: str
    tau: dict[str, float] = field(default_factory=dict)  # target -> Kendall tau-b
    weighted: dict[str, float] = field(default_factory=dict)  # target -> weighted tau
    hit: dict[str, bool] = field(default_factory=dict)  # target -> its top source is the finals' best

    @property
    def mean_tau(self) -> float:
        v = [t for t in self.tau.values() if not math.isnan(t)]
        return statistics.fmean(v) if v else math.nan

    @property
    def hit_rate(self) -> tuple[int, int]:
        return sum(self.hit.values()), len(self.hit)


@dataclass
class Matrix:
    parts: list[Part]
    targets: list[str]
    sources: list[str]
    entries: list[Entry] = field(default_factory=list)
    best: dict[str, Best] = field(default_factory=dict)
    rankings: list[Ranking] = field(default_factory=list)

    def entry(self, target: str, source: str) -> Entry | None:
        return next((e for e in self.entries if (e.target, e.source) == (target, source)), None)

    def compute(self, target: str) -> float:
        return sum(sum(p.compute.values()) for p in self.parts if p.target == target)


def _chosen(a: Analysis, arm: str) -> list:
    """The arm's chosen cells with finals, one per search repeat (scratch: its one cell per repeat)."""
    out = []
    for s in a.searches:
        depth = a.chosen.get((arm, s))
        if depth is not None and a.at(arm, depth, s).final_test:
            out.append(a.at(arm, depth, s))
    return out


def _clipped(p: pooling.Pooled) -> pooling.Pooled:
    """A pooled difference of accuracies with its interval within [-1, 1], what it bounds (a t-interval over 2 to
    5 repeats can reach past it)."""
    return dataclasses.replace(p, lo=max(-1.0, p.lo), hi=min(1.0, p.hi))


def _accuracy(cells: list) -> float:
    return statistics.fmean(statistics.fmean(c.final_test.values()) for c in cells) if cells else math.nan


def analyze(parts: list[Part]) -> Matrix:
    targets = list(dict.fromkeys(p.target for p in parts))
    sources = list(dict.fromkeys(arm for p in parts for arm in p.analysis.arms if arm != p.analysis.scratch))
    m = Matrix(parts, targets, sources)
    for p in parts:
        a = p.analysis
        scratch = _accuracy(_chosen(a, a.scratch)) if a.scratch else math.nan
        for arm, v in a.verdicts.items():
            cells = _chosen(a, arm)
            m.entries.append(Entry(p.target, arm, p.arch, _clipped(v.pooled), v.verdict, [c.depth for c in cells],
                                   _accuracy(cells), scratch))
    for e, p_adj in zip(m.entries, holm([e.pooled.p for e in m.entries])):
        e.p_matrix = p_adj
        e.holds = p_adj < ALPHA and not any(x in e.verdict for x in (NOT_ABOVE, SCRATCH_AT_CHANCE, NEITHER))
    for t in targets:
        mine = sorted((e for e in m.entries if e.target == t and not math.isnan(e.accuracy)),
                      key=lambda e: -e.accuracy)
        if not mine:
            continue
        b = mine[0]
        best = Best(t, b.source, b.accuracy, (-b.pooled.value, -b.pooled.hi, -b.pooled.lo))
        if len(mine) > 1:
            best.runner_up = mine[1].source
            best.over_runner_up = margin(parts, t, b.source, mine[1].source)
        m.best[t] = best
    m.rankings = rankings(m)
    return m


def _part(parts: list[Part], target: str, arm: str) -> Part:
    return next(p for p in parts if p.target == target and arm in p.analysis.arms)


def margin(parts: list[Part], target: str, best: str, other: str) -> pooling.Pooled | None:
    """acc(best) − acc(other) on one target: per search repeat the paired comparison of their chosen cells (by seed
    and test image), pooled over the repeats as an NTG is."""
    a, b = _part(parts, target, best).analysis, _part(parts, target, other).analysis
    mine, theirs = {c.search: c for c in _chosen(a, best)}, {c.search: c for c in _chosen(b, other)}
    estimates = []
    for s in sorted(set(mine) & set(theirs)):
        _, e = compare(mine[s], theirs[s])  # acc(other) − acc(best)
        estimates.append(dataclasses.replace(e, value=-e.value))
    if not estimates:
        return None
    return _clipped(pooling.pool(estimates))


def source_estimates(m: Matrix, target: str) -> dict[str, dict[str, float]]:
    """Per source of one target: each estimate's best value over the source's depths."""
    out: dict[str, dict[str, float]] = {}
    for p in m.parts:
        if p.target != target:
            continue
        for (arm, _), values in p.estimates.items():
            if arm == p.analysis.scratch:
                continue
            for name, v in values.items():
                if not math.isnan(v):
                    mine = out.setdefault(arm, {})
                    mine[name] = max(v, mine.get(name, -math.inf))
    return out


def rankings(m: Matrix) -> list[Ranking]:
    from scipy import stats

    from tl_sweep.transferability import ESTIMATES

    out = {name: Ranking(name) for name in ESTIMATES}
    for t in m.targets:
        est = source_estimates(m, t)
        truth = {e.source: e.accuracy for e in m.entries if e.target == t and not math.isnan(e.accuracy)}
        if len(truth) < 2:
            continue
        top = max(truth, key=truth.get)
        for name, r in out.items():
            have = [s for s in truth if name in est.get(s, {})]
            if len(have) != len(truth):
                continue
            x, y = [est[s][name] for s in have], [truth[s] for s in have]
            r.tau[t] = float(stats.kendalltau(x, y).statistic)
            r.weighted[t] = float(stats.weightedtau(x, y).statistic)
            r.hit[t] = est[top][name] == max(x)
    return [r for r in out.values() if r.tau]


# ------------------------------------------------------------------------------------------- rendering


def _pts(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}"


def cell_text(e: Entry) -> str:
    """A heatmap cell's text: NTG [95% CI] in points, the chosen depth(s), ★ where it holds after Holm."""
    depths = sorted(set(e.depths))
    k = f"k={depths[0]}" if len(depths) == 1 else "k=" + "/".join(map(str, depths))
    return f"{_pts(e.pooled.value)}{' ★' if e.holds else ''}\n[{_pts(e.pooled.lo)}, {_pts(e.pooled.hi)}]\n{k}"


def against_the_probe(rs: list[Ranking]) -> str:
    from tl_sweep.transferability import BASELINE, ESTIMATES

    base = next((r for r in rs if r.estimate == BASELINE), None)
    others = [r for r in rs if r.estimate != BASELINE]
    if base is None or not others:
        return ""
    beat = [ESTIMATES[r.estimate] for r in others
            if r.mean_tau > base.mean_tau and r.hit_rate[0] >= base.hit_rate[0]]
    said = (f"{', '.join(beat)} beat{'s' if len(beat) == 1 else ''} it (a higher mean τ and at least its hits)"
            if beat else "**no estimator beats the k-NN probe** (a higher mean τ and at least its top-1 hits)")
    return (f"Against the k-NN probe (mean τ {base.mean_tau:+.2f}, top-1 {base.hit_rate[0]} of {base.hit_rate[1]}), "
            f"the baseline every estimate must beat: {said}.")


def markdown(m: Matrix, header: dict[str, str], plots: set[str]) -> str:
    from tl_sweep.transferability import ESTIMATES

    several = len({p.arch for p in m.parts}) > 1
    md = [f"# Transfer matrix: {header.get('experiment', '')}", "",
          f"Matrix run `{header.get('run', '')}`: {len(m.sources)} sources × {len(m.targets)} targets, each target a "
          f"study of its own (search repeats, selection, paired finals) nested under this run"
          + (", each architecture with its own scratch baseline" if several else "") + ". "
          "NTG = test error of the source − test error of its tuned scratch baseline (negative: the source "
          "helps), pooled over the search repeats at each repeat's chosen depth, 95% interval over repeats, seeds "
          "and test images. ★: the verdict holds after Holm over every cell of the matrix "
          f"({len(m.entries)} tests) and both arms are above chance.", ""]
    if "heatmap" in plots:
        md += ["![transfer matrix](matrix.png)", ""]
    md += ["## The matrix", "",
           "| target | source | " + ("arch | " if several else "") + "depth chosen | source test % | scratch test % "
           "| NTG (points) [95% CI] | p (Holm, matrix) | verdict |",
           "|---|---|" + ("---|" if several else "") + "---|---|---|---|---|---|"]
    for e in m.entries:
        md.append(f"| {e.target} | {e.source} | " + (f"{e.arch} | " if several else "")
                  + f"{', '.join(map(str, e.depths))} | {_pct(e.accuracy)} | {_pct(e.scratch)} | "
                  f"{_pts(e.pooled.value)} [{_pts(e.pooled.lo)}, {_pts(e.pooled.hi)}] | {e.p_matrix:.2g} | "
                  f"{e.verdict}{' ★' if e.holds else ''} |")
    md += ["", "## Best source per target", "",
           "The source with the best mean final test accuracy; its margin over scratch (−NTG) and over the "
           "runner-up (paired by seed and test image, pooled over the search repeats), in points.", "",
           "| target | best source | test % | over scratch [95% CI] | runner-up | over runner-up [95% CI] |",
           "|---|---|---|---|---|---|"]
    for t in m.targets:
        b = m.best.get(t)
        if b is None:
            continue
        r = b.over_runner_up
        md.append(f"| {t} | {b.source} | {_pct(b.accuracy)} | {_pts(b.over_scratch[0])} [{_pts(b.over_scratch[1])}, "
                  f"{_pts(b.over_scratch[2])}] | {b.runner_up or '–'} | "
                  + (f"{_pts(r.value)} [{_pts(r.lo)}, {_pts(r.hi)}]" if r else "–") + " |")
    if "curves" in plots:
        md += ["", "## Freeze depth per target", "", "![freeze depth per target](matrix_depths.png)"]
    md += ["", "## Transferability estimates against the finals", ""]
    if m.rankings:
        md += ["Each estimate scores a source on a target before any training (its best over the depths); per "
               "target, Kendall's τ (and weighted τ) of those scores against the sources' mean final test accuracy, "
               "and whether its top source is the finals' best (top-1).", "",
               "| estimate | " + " | ".join(f"τ {t}" for t in m.targets) + " | mean τ | mean weighted τ | top-1 |",
               "|---|" + "---|" * len(m.targets) + "---|---|---|"]
        for r in m.rankings:
            w = [v for v in r.weighted.values() if not math.isnan(v)]
            md.append(f"| {ESTIMATES[r.estimate]} | "
                      + " | ".join(f"{r.tau[t]:+.2f}" if t in r.tau and not math.isnan(r.tau[t]) else "–"
                                   for t in m.targets)
                      + f" | {r.mean_tau:+.2f} | {statistics.fmean(w) if w else math.nan:+.2f} | "
                        f"{r.hit_rate[0]} of {r.hit_rate[1]} |")
        n = max(len(source_estimates(m, t)) for t in m.targets)
        md += ["", against_the_probe(m.rankings),
               f"With {n} sources per target, τ takes only {n * (n - 1) // 2 + 1} values per target: one swapped "
               f"pair moves it by {4 / (n * (n - 1)) if n > 1 else math.nan:.2f}."]
    else:
        md.append("No target has estimates and finals for two or more sources: no ranking to check.")
    md += ["", "## Compute per target", "", "| target | compute (s, every training) | study run |", "|---|---|---|"]
    for t in m.targets:
        runs = ", ".join(f"`{p.run_id}`" for p in m.parts if p.target == t)
        md.append(f"| {t} | {m.compute(t):.0f} | {runs} |")
    md += ["", "Each target's own report (depth tables, budget curves, estimates per cell, per-repeat verdicts) is in "
               "its study run's artifacts, under report/.", ""]
    return "\n".join(md)


def csv(m: Matrix) -> str:
    import csv as csv_
    import io

    buf = io.StringIO()
    w = csv_.writer(buf, lineterminator="\n")
    w.writerow(["target", "source", "arch", "depths", "source_test_acc", "scratch_test_acc", "ntg", "ntg_lo",
                "ntg_hi", "p", "p_holm_matrix", "holds", "i2", "verdict"])
    for e in m.entries:
        w.writerow([e.target, e.source, e.arch, " ".join(map(str, e.depths)), f"{e.accuracy:.6f}",
                    f"{e.scratch:.6f}", f"{e.pooled.value:.6f}", f"{e.pooled.lo:.6f}", f"{e.pooled.hi:.6f}",
                    f"{e.pooled.p:.6g}", f"{e.p_matrix:.6g}", e.holds, f"{e.pooled.i2:.4f}", e.verdict])
    return buf.getvalue()


def metrics(m: Matrix) -> dict[str, float]:
    """The matrix as MLflow metrics of its run: ``matrix/<target>/<source>/ntg`` (``_lo``, ``_hi``, ``_p_holm``,
    ``accuracy``, ``scratch_accuracy``), each estimate's ``matrix/estimates/<name>/mean_tau`` and ``hit_rate``."""
    def key(s: str) -> str:
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)

    out = {}
    for e in m.entries:
        k = f"matrix/{key(e.target)}/{key(e.source)}"
        out.update({f"{k}/ntg": e.pooled.value, f"{k}/ntg_lo": e.pooled.lo, f"{k}/ntg_hi": e.pooled.hi,
                    f"{k}/ntg_p_holm": e.p_matrix, f"{k}/accuracy": e.accuracy,
                    f"{k}/scratch_accuracy": e.scratch})
    for r in m.rankings:
        hits, n = r.hit_rate
        out.update({f"matrix/estimates/{r.estimate}/mean_tau": r.mean_tau,
                    f"matrix/estimates/{r.estimate}/hit_rate": hits / n if n else math.nan})
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def key_text(m: Matrix) -> str:
    """What the CLI prints: the matrix as an aligned table, then the best source per target."""
    from tl_sweep.report.render import text_table

    rows = [["target", "source", "depth", "source %", "scratch %", "NTG [95% CI]", "p Holm", "holds"]]
    for e in m.entries:
        rows.append([e.target, e.source, ",".join(map(str, e.depths)), _pct(e.accuracy), _pct(e.scratch),
                     f"{_pts(e.pooled.value)} [{_pts(e.pooled.lo)}, {_pts(e.pooled.hi)}]", f"{e.p_matrix:.2g}",
                     "yes" if e.holds else "no"])
    best = [f"{t}: {b.source} ({_pct(b.accuracy)}%)" for t, b in m.best.items()]
    return text_table(rows) + ("\n\nbest source per target: " + "; ".join(best) if best else "")


def description(m: Matrix) -> str:
    """The matrix run's description in the MLflow UI: what holds, and the best source per target."""
    holds = [f"{e.source} on {e.target} ({_pts(e.pooled.value)} points)" for e in m.entries if e.holds]
    best = [f"{t}: {b.source}" for t, b in m.best.items()]
    return (f"**Transfer matrix**: {len(m.sources)} sources × {len(m.targets)} targets. NTG verdicts holding after "
            f"Holm over the matrix: {'; '.join(holds) if holds else 'none'}. Best source per target (mean final "
            f"test accuracy): {'; '.join(best)}. NTG < 0: the source helps.")
