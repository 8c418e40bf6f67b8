"""Render a study: markdown and text tables, plain-sentence findings, the CSV of every run (the plots are
:mod:`~tl_sweep.report.plots`'s).

Pure functions of an :class:`~tl_sweep.report.stats.Analysis` and typed results; nothing here reads MLflow.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

from tl_sweep.contract import NAMES, TrialResult
from tl_sweep.report import budget, stats
from tl_sweep.report.stats import Analysis, Gap

def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(t: tuple | None) -> str:
    if not t:
        return "–"
    m, lo, hi = t
    return f"{_pct(m)}" + ("" if math.isnan(lo) else f" [{_pct(lo)}, {_pct(hi)}]")


def _gap(g: Gap | None, label: str = "") -> str:
    if g is None:
        return "–"
    txt = f"{100 * g.gap:+.1f}" + ("" if math.isnan(g.lo) else f" [{100 * g.lo:+.1f}, {100 * g.hi:+.1f}]")
    return txt + (f" ({label})" if label else "")


def _test(c) -> str:
    """A cell's finals' test accuracy with its interval, and whether it is above chance."""
    return _ci(c.test) + ("" if c.above_chance else " (not above chance)")


def headline_table(a: Analysis, compute: dict[str, float] | None = None) -> list[list[str]]:
    """Per source, the study's answer: its NTG pooled over the search repeats (each at its chosen depth) with an
    interval over repeats, seeds and test images, the one-sided confidence that it beats scratch, the Holm p
    across sources, how far the repeats disagree, the smallest |NTG| the design resolves, the verdict, and the
    per-repeat verdicts as a stability figure; then the compute each arm spent."""
    head = ["source", "NTG pts [95% CI]", "P(source better)", "Holm p", "between repeats: Q (p), I²",
            "resolves |NTG| ≥", "verdict", "per repeat", "compute (s)"]
    body = []
    n = len(a.searches)
    for arm, v in a.verdicts.items():
        p = v.pooled
        het = "–" if p.k < 2 else f"{p.q:.1f} ({p.p_q:.2g}), {100 * p.i2:.0f}%"
        holm_p = "–" if math.isnan(p.p_holm) else f"{p.p_holm:.3g}"
        stab = ", ".join(f"{k} {c}/{n}" for k, c in sorted(v.stability.items(), key=lambda kv: (-kv[1], kv[0])))
        body.append([arm, _gap(stats.Gap(p.value, p.lo, p.hi, p.p, p.df, True)),
                     "–" if math.isnan(p.below_zero) else f"{100 * p.below_zero:.0f}%", holm_p, het,
                     "–" if not math.isfinite(v.mde) else f"{100 * v.mde:.1f} pts", v.verdict, stab,
                     f"{(compute or {}).get(arm, math.nan):.0f}"])
    if a.scratch and compute:
        body.append([f"{a.scratch} (the baseline)", "", "", "", "", "", "", "", f"{compute.get(a.scratch, 0):.0f}"])
    return [head] + body


def key_table(a: Analysis) -> list[list[str]]:
    """Per source and search repeat (the headline's detail): chosen depth, test accuracy, NTG with its interval
    (seeds and test images) and Holm p across sources."""
    head = ["arm", "search", "chosen depth", "selection val %", "test % [95% CI]", "NTG pts [95% CI]", "Holm p",
            "verdict"]
    body = []
    for arm in a.arms:
        for s in a.searches:
            depth = a.chosen.get((arm, s))
            if depth is None:
                continue
            cell = a.at(arm, depth, s)
            comp = next((c for c in a.primary if c.arm == arm and c.search == s), None)
            chose = _pct(cell.select_val if cell.selection else cell.val)
            if arm == a.scratch:
                body.append([arm, str(s), str(depth), chose, _test(cell), "(baseline)", "", ""])
            elif comp:
                p = "–" if math.isnan(comp.gap.p_holm) else f"{comp.gap.p_holm:.3g}"
                body.append([arm, str(s), str(depth), chose, _test(cell), _gap(comp.gap), p, comp.verdict])
    return [head] + body


def _md(table: list[list[str]]) -> str:
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731 - a pipe inside a cell (|NTG|) would end it
    lines = ["| " + " | ".join(map(cell, table[0])) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in table[1:]])


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def _repeats(searches: list[int]) -> str:
    return f"search repeat{'s' if len(searches) > 1 else ''} {', '.join(map(str, searches))}"


def findings(a: Analysis, capped: list | None = None) -> list[str]:
    """Plain sentences on what the numbers show, including when they show nothing: each source's pooled verdict
    (with what the design could resolve and whether the repeats disagree), its verdicts over the search repeats,
    the chosen configurations at a bound of their space (the baseline first: it may be capped), and which cells
    are not above chance."""
    out = []
    n = len(a.searches)
    for arm, v in a.verdicts.items():
        p = v.pooled
        out.append(f"`{arm}` against the tuned scratch baseline, over {p.k} search repeat{'s' if p.k > 1 else ''} "
                   f"(each at its chosen depth), seeds and test images: NTG "
                   f"{_gap(stats.Gap(p.value, p.lo, p.hi, 0, 0, 1))} points, **{v.verdict}**.")
    if not a.images and a.verdicts:
        out.append("These finals logged no per-image predictions (tl-sweep before 2026-12-07): their intervals "
                   "carry the seeds' spread only, not the test images' sampling.")
    chosen = [b for b in capped or [] if a.chosen.get((b.cell.arm, b.cell.search)) == b.cell.depth]
    for arm in sorted({b.cell.arm for b in chosen}, key=lambda x: (x != a.scratch, x)):
        hits: dict[tuple[str, str, str], list[int]] = {}
        for b in chosen:
            if b.cell.arm == arm:
                bound = f"{b.bound:.3g}" if isinstance(b.bound, float) else str(b.bound)
                hits.setdefault((b.name, b.side, bound), []).append(b.cell.search)
        what = "; ".join(f"{name} at the {side} of its space ({bound}) in {_repeats(sorted(rs))}"
                         for (name, side, bound), rs in sorted(hits.items()))
        who = ("**the baseline may be capped by its space**" if arm == a.scratch else
               "its result may be held back by its space")
        out.append(f"`{arm}`'s chosen configurations sit at a bound: {what}: {who}.")
    at_chance = sorted(c.search for c in a.cells.values() if c.arm == a.scratch and c.final_test and
                       not c.above_chance)
    if a.scratch and at_chance:
        out.append(f"The scratch baseline's finals are **not shown above chance** (the test split's majority-class "
                   f"rate) in {_repeats(at_chance)}: "
                   f"scratch did not learn within its budget there; a source above chance is compared with it all "
                   f"the same, and its verdict says so.")
    if a.pooled_chance and any(not c.above_chance for c in a.cells.values() if c.final_test):
        said = [f"`{arm}` {'above it' if p < stats.ALPHA else '**not shown above it**'} (p {p:.2g})"
                for arm, p in sorted(a.pooled_chance.items(), key=lambda kv: (kv[0] == a.scratch, kv[0]))]
        out.append(f"Against the majority-class rate, pooled over the search repeats as the headline pools NTG "
                   f"(one-sided, Holm across the arms; the headline's chance qualifier reads this): "
                   f"{'; '.join(said)}.")
    for arm in a.arms:
        if arm == a.scratch:
            continue
        counts = a.stability(arm)
        if counts:
            spread = ", ".join(f"{k} in {v} of {n}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            depths = sorted({d for (x, _), d in a.chosen.items() if x == arm})
            out.append(f"`{arm}` per search repeat, at its chosen depth (k = {', '.join(map(str, depths))}): "
                       f"{spread} (a stability figure: each repeat's own interval leaves out the others).")
        below = sorted((c.depth, c.search) for c in a.cells.values() if c.arm == arm and c.final_test
                       and not c.above_chance)
        if below:
            by_depth: dict[int, list[int]] = {}
            for d, s in below:
                by_depth.setdefault(d, []).append(s)
            cells = "; ".join(f"k={d} in {'every search repeat' if len(ss) == n and n > 1 else _repeats(ss)}"
                              for d, ss in by_depth.items())
            out.append(f"`{arm}`: the finals of {cells} are not shown above the majority-class rate.")
    if not out:
        out.append("No final evaluation on the test split (not a study): the table shows validation accuracy only.")
    return out


def description(experiment: str, a: Analysis, findings: list[str]) -> str:
    """The sweep's parent run's description (the top of its MLflow page): the headline findings first, then the
    majority-class rate to read them by."""
    rates = "/".join(_pct(c) for c in sorted(set(a.chance.values()))) or "–"
    lead = [f for f in findings if "against the tuned scratch baseline" in f] or findings[:2]
    return (f"**{experiment}**: " + " ".join(lead) + f" Majority-class rate of the test split: {rates}%.")


def depth_table(a: Analysis) -> list[list[str]]:
    head = ["arm", "depth", "search", "trials finished / started", "best search val %", "selection val %",
            "test % [95% CI]", "above chance (Holm p)", "NTG pts [95% CI] (exploratory)", "Holm p (table)"]
    body = []
    for c in sorted(a.cells.values(), key=lambda c: (c.arm == a.scratch, c.arm, c.depth, c.search)):
        comp = next((x for x in a.per_depth if x.cell == c.cell), None)
        mark = " ◀ chosen" if a.chosen.get((c.arm, c.search)) == c.depth else ""
        chance = "–" if math.isnan(c.p_chance) else f"{'yes' if c.above_chance else 'no'} ({c.p_chance:.2g})"
        body.append([c.arm, f"{c.depth}{mark}", str(c.search), f"{c.finished} / {c.trials}", _pct(c.best_val),
                     _pct(c.select_val), _ci(c.test), chance, _gap(comp.gap, comp.verdict) if comp else "–",
                     "–" if comp is None or math.isnan(comp.gap.p_holm) else f"{comp.gap.p_holm:.2g}"])
    return [head] + body


def trials_csv(results: list[TrialResult]) -> str:
    cols = ["run_id", "name", "role", "arm", "search", "seed", *NAMES, "lr", "best_val_acc", "test_acc", "epochs_run",
            "status"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r.row())
    return buf.getvalue()


def budget_summary(curves: list[budget.BudgetCurve]) -> str:
    """What a search's last trial added to its expected best, over every cell and repeat: the basis of any
    advice to give cells more (or fewer) trials."""
    if not curves:
        return ""
    gains = sorted(100 * c.last_gain for c in curves)
    median = statistics.median(gains)
    top = max(curves, key=lambda c: c.last_gain)
    whole = sum(c.finished == c.started for c in curves)
    return (f"The last finished trial of a search added {median:.1f} points to the expected best validation "
            f"accuracy (median over {len(curves)} searches; range {gains[0]:.1f} to {gains[-1]:.1f}, the most for "
            f"{top.arm} k={top.depth} in search repeat {top.search}); {whole} of the {len(curves)} searches "
            f"finished every trial they started. Cells with fewer than two full-schedule trials have no curve.")


def estimates_section(estimates: dict[tuple[str, int], dict[str, float]], truth: dict[tuple[str, int], float],
                      agree: list) -> list[str]:
    """The transferability estimates beside the finals, and how well each one ranked the cells."""
    from tl_sweep.transferability import ESTIMATES

    names = [n for n in ESTIMATES if any(n in v for v in estimates.values())]
    md = ["## Transferability estimates (before training) against the finals", "",
          "Computed before any trial from the frozen prefix's pooled features on the train split (LogME, H-score"
          + (", and a k-NN probe: leave-one-out accuracy of 5 nearest neighbours, the baseline an estimator must "
             "beat" if "knn" in names else "")
          + ") and the source's own classifier (LEEP, NCE); higher predicts better transfer. Finals' test accuracy: "
          "mean over every search repeat's finals.", "",
          "| cell | " + " | ".join(ESTIMATES[n] for n in names) + " | finals' test % |",
          "|---|" + "---|" * len(names) + "---|"]
    for cell in sorted(estimates):
        vals = [f"{estimates[cell][n]:.4f}" if n in estimates[cell] else "–" for n in names]
        t = f"{100 * truth[cell]:.1f}" if cell in truth else "–"
        md.append(f"| {cell[0]}@k={cell[1]} | " + " | ".join(vals) + f" | {t} |")
    md.append("")
    if not agree:
        md += ["Fewer than 3 cells have both an estimate and finals: no rank correlation.", ""]
    for g in agree:
        top = " and ".join(f"{a}@k={d}" for a, d in g.top_estimated)
        true_top = f"{g.top_true[0]}@k={g.top_true[1]}"
        tied = len(g.top_estimated) > 1
        if g.right_top:
            verdict = (f"it ties {top} at the top (it cannot tell them apart), the finals' best among them" if tied
                       else f"ranked the finals' best cell ({true_top}) first")
        else:
            verdict = (f"**got the ranking wrong at the top**: it put {top} first"
                       f"{' (tied)' if tied else ''}, the finals put {true_top} first")
        md.append(f"- {ESTIMATES[g.estimate]}: Kendall τ = {g.tau:+.2f} (p = {g.p:.2g}), weighted τ = "
                  f"{g.weighted_tau:+.2f} over {g.cells} cells; {verdict}.")
    md += against_the_probe(agree)
    return md + [""]


def against_the_probe(agree: list) -> list[str]:
    """Whether any estimate ranked the cells better than the k-NN probe did (higher Kendall τ), said plainly."""
    from tl_sweep.transferability import BASELINE, ESTIMATES

    base = next((g for g in agree if g.estimate == BASELINE), None)
    others = [g for g in agree if g.estimate != BASELINE]
    if base is None or not others:
        return []
    beat = [ESTIMATES[g.estimate] for g in others if g.tau > base.tau]
    pairs = base.cells * (base.cells - 1) // 2
    said = (f"{', '.join(beat)} beat{'s' if len(beat) == 1 else ''} it" if beat
            else "**no estimator beats the k-NN probe**")
    return ["", f"Against the k-NN probe (τ = {base.tau:+.2f}), the baseline every estimate must beat: {said}. "
                f"Over {base.cells} cells one swapped pair moves τ by {2 / pairs:.2f}: a difference that small is "
                f"one cell's order, not a finding."]


def _redrawn(fixed: str | None) -> str:
    """What each search repeat redraws, in words (``fixed``: the splits the dataset itself fixes)."""
    kept = [s for s in (fixed or "").split(",") if s]
    drawn = [s for s in ("train", "val", "test") if s not in kept]
    if not kept:
        return "Each search repeat draws every split (train, val, test) with its own seed."
    if not drawn:
        return ("Every split is the dataset's own (train, val and test folders or sets): search repeats redraw "
                "seeds, not images, so their spread is the training's, not the data's.")
    return (f"Each search repeat draws {' and '.join(drawn)} with its own seed; {' and '.join(kept)} "
            f"{'is' if len(kept) == 1 else 'are'} the dataset's own in every repeat.")


def _arm(arm: str) -> str:
    return "from scratch" if arm in ("none", "scratch") else arm


def sweep_table(results: list[TrialResult], limit: int = 10) -> list[list[str]]:
    """A plain sweep's best trials by validation accuracy (those that ran their schedule first)."""
    head = ["trial", "run", "k", "optimizer", "bs", "lr_mult", "lr", "epochs", "best val %", "status"]
    ranked = sorted((r for r in results if r.config.searched and r.best_val_acc is not None),
                    key=lambda r: (r.status != "FINISHED", -r.best_val_acc))
    return [head] + [[r.trial, r.name, str(r.config.unfrozen_blocks), r.config.optimizer, str(r.config.batch_size),
                      f"{r.config.lr_mult:.3g}", f"{r.config.lr:.2g}", str(r.config.epochs), _pct(r.best_val_acc),
                      r.status]
                     for r in ranked[:limit]]


def sweep_markdown(header: dict[str, Any], parent_id: str, results: list[TrialResult], imp: dict[str, dict[str, float]],
                   plots: set[str], best_chance: tuple[float, float, float, int] | None) -> str:
    """A plain sweep's report: its best trials, whether the best is above chance, learning curves, validation
    accuracy against each searched dimension, importance and parallel coordinates. No study sections."""
    h, search = header, [r for r in results if r.config.searched]
    status = {s: sum(1 for r in search if r.status == s) for s in ("FINISHED", "EARLY_STOPPED", "FAILED")}
    arms = sorted({_arm(r.config.arm) for r in search})
    rates = f"majority-class rate of val {_pct(number(h.get('val_chance')))}%" + (
        f", of test {_pct(number(h.get('chance')))}%" if number(h.get("chance")) is not None else "")
    md = [f"# tl-sweep report: {h['experiment']}", "",
          f"Parent run `{parent_id}` · arch `{h['arch']}` · weights {', '.join(f'`{a}`' for a in arms)} · data "
          f"`{h['dataset']}` (classes {h['classes']}; train {h['n_train']}, val {h['n_val']}, test {h['n_test']}; "
          f"{rates}) · input {h['crop']} px · seed {h['seed']}", "",
          f"Search: {len(search)} trials ({status['FINISHED']} ran their whole schedule, {status['EARLY_STOPPED']} "
          f"early-stopped, {status['FAILED']} failed). The search saw the validation split only." + _faults(results)]
    if best_chance:
        acc, chance, p, tries = best_chance
        above = p < stats.ALPHA
        md += ["", f"**The best trial's validation accuracy, {_pct(acc)}%, is {'above' if above else 'not above'} "
               f"the majority-class rate ({_pct(chance)}%)**: exact one-sided binomial p = {p:.2g}, Bonferroni over "
               f"the {tries} trials it is the best of." + ("" if above else " A model that always answered the "
               "commonest class would score as well: it learned nothing this validation split can show, and it is "
               "not registered (`tracking.register_below_chance: true` registers it anyway).")]
    md += ["", "## Best trials", "", _md(sweep_table(results)), ""]
    if "curves" in plots:
        md += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    if "dimensions" in plots:
        md += ["## Validation accuracy against each searched dimension", "", "![dimensions](dimensions.png)", ""]
    if imp or "parallel" in plots:
        md += ["## Search", ""]
    if imp:
        n = sum(r.config.searched and r.status == "FINISHED" for r in results)
        at_chance = best_chance is not None and best_chance[2] >= stats.ALPHA
        md += [f"fANOVA importance of each searched dimension for the best validation accuracy, over the {n} trials "
               f"that ran their schedule" + (": **the best of them is not above chance, so this explains noise**"
                                             if at_chance else _few(n)) + ":", ""]
        md += [f"- {', '.join(f'{k} {v:.2f}' for k, v in i.items())}" for i in imp.values()]
        md += [""]
    if "parallel" in plots:
        md += ["![parallel coordinates](parallel_coordinates.png)", ""]
    md += ["All trials: [trials.csv](trials.csv).", ""]
    return "\n".join(md)


def _few(n: int) -> str:
    return " (under ~20 trials it is a hint, not a finding)" if n < 20 else ""


def _faults(results: list[TrialResult]) -> str:
    """What node losses and tracking outages cost the sweep, as sentences (empty when nothing happened)."""
    out = ""
    retried = [r for r in results if r.retries]
    if retried:
        out += (f" {len(retried)} trial{'s' if len(retried) > 1 else ''} lost a worker or node and continued "
                f"from its last checkpoint ({sum(r.retries for r in retried)} retries; each kept its one MLflow run).")
    delayed = [r for r in results if r.delayed]
    if delayed:
        out += (f" A tracking outage held back {sum(r.delayed for r in delayed)} writes of {len(delayed)} "
                f"run{'s' if len(delayed) > 1 else ''} on local disk; all were delivered later.")
    return out


def number(v) -> float | None:
    try:
        return None if v in (None, "", "?", "None") else float(v)
    except (TypeError, ValueError):
        return None


def markdown(header: dict[str, Any], parent_id: str, results: list[TrialResult], a: Analysis,
             imp: dict[str, dict[str, float]], plots: set[str], estimates: list[str] | None = None,
             budget: str = "", capped: list | None = None, compute: dict[str, float] | None = None) -> str:
    search = [r for r in results if r.config.searched]
    selection = [r for r in results if r.config.candidate]
    finals = [r for r in results if r.config.final]
    status = {s: sum(1 for r in search if r.status == s) for s in ("FINISHED", "EARLY_STOPPED", "FAILED")}
    h = header
    md = [f"# tl-sweep report: {h['experiment']}", "",
          f"Parent run `{parent_id}` · arch `{h['arch']}` · data `{h['dataset']}` "
          f"(classes {h['classes']}; train {h['n_train']}, val {h['n_val']}, test {h['n_test']}; majority-class "
          f"rate of test {'/'.join(_pct(c) for c in sorted(set(a.chance.values()))) or '–'}%) · input {h['crop']} px · "
          f"seed {h['seed']}", "",
          f"Search: {len(search)} trials ({status['FINISHED']} finished, {status['EARLY_STOPPED']} early-stopped, "
          f"{status['FAILED']} failed); "
          + (f"selection: {len(selection)} re-trainings on validation; " if selection else "")
          + f"final evaluation: {len(finals)} re-trainings scored once on the test split."]
    md[-1] += _faults(results)
    if a.scratch or len(a.cells) > len(a.arms):
        trials = sorted({c.trials for c in a.cells.values()})
        seeds = sorted({len(v) for c in a.cells.values() for v in c.selection.values()})
        top = sorted({len(c.selection) for c in a.cells.values() if c.selection})
        picked = (f"each cell's {'–'.join(map(str, top))} best configurations by search validation (full-schedule "
                  f"trials first) are re-trained with {'–'.join(map(str, seeds))} new seeds each on validation, and "
                  f"the best mean is the "
                  f"cell's choice; each arm's depth is chosen on those selection means" if seeds else
                  "each cell's configuration with the best validation accuracy among trials that ran their whole "
                  "schedule; each arm's depth by its finals' mean validation accuracy")
        md += ["", f"Design: {len({(c.arm, c.depth) for c in a.cells.values()})} cells (arm × depth) × "
               f"{len(a.searches)} search repeats, {'–'.join(map(str, trials))} search trials per cell and repeat "
               f"(one seeded TPE and one ASHA per cell). Selection, declared before looking: {picked}, ties to the "
               f"shallower depth. Finals use the same seeds in every arm; NTG is the test error of the source − "
               f"the test error of scratch, in points. " + (
                   "Each final logged its prediction for every test image, so each search repeat's NTG is paired by "
                   "seed and by image, its 95% interval over seeds and test images (a crossed design: both are "
                   "samples); " if a.images else
                   "These finals logged no per-image predictions: each repeat's NTG interval is a paired t over "
                   "seeds (the test images' sampling is left out); ")
               + "the headline pools the repeats (each with its own search, selection and depth choice) by random "
               "effects (DerSimonian–Laird, modified Hartung–Knapp interval with k − 1 df), Holm-corrected across "
               "sources, and says the smallest |NTG| the design resolves with 80% power (simulated from the "
               "observed variances). Each cell's finals are tested against the test split's majority-class rate "
               "(one-sided, " + ("over seeds and images" if a.images else "over seeds") + ", Holm across the "
               f"study's cells); a verdict says when a cell is not above it. Test figures never choose anything. "
               f"{_redrawn(h.get('fixed_splits'))}"]
    cut = stats.cut_cells(a)
    if cut:
        full = {r: max(c.trials for c in a.cells.values() if c.search == r) for r in a.searches}
        grid_search = sum(full[c.search] for c in a.cells.values())
        grid_finals = len(a.cells) * max((len(c.final_test) for c in a.cells.values()), default=0)
        per = "; ".join(f"search repeat {c.search}: {c.arm}@k={c.depth} after {c.trials} trials (best search val "
                        f"{_pct(c.best_val)}%)" for c in cut)
        md += ["", f"Successive halving (`study.allocate: halving`) cut {len(cut)} cells before their full budget, "
               f"on validation accuracy alone: each cell's best search trial that ran its whole schedule (ties: the "
               f"second best, then the best of any trial, then the higher LogME; the selection re-trainings come "
               f"after, for the cells that reach the full budget): {per}. Cut cells have no finals; each "
               f"source kept at least one cell, the scratch cell always ran its full budget. A cell cut after "
               f"{min(c.trials for c in cut)} trials was judged on that few configurations: one that needs "
               f"tuning can be cut by chance, so a depth chosen here need not be the grid design's choice. "
               f"This run trained {len(search)} search trials and {len(finals)} finals where the grid design "
               f"would train {grid_search} and {grid_finals}. What any allocation can save is bounded: the scratch "
               f"cell and the cells finally chosen are trained in full either way (`benchmarks/allocate.py` "
               f"compares a halving run with a grid run of the same spec: choices, verdicts, compute and that "
               f"floor)."]
    md += ["", "## Key results", ""]
    if a.verdicts:
        md += [_md(headline_table(a, compute)), "", "P(source better): the one-sided confidence that the pooled NTG "
               "is below 0. \"Resolves\": the smallest |NTG| this design detects with 80% power; a result that is "
               "not significant reads \"no difference larger than\" it only where the interval lies within it.", "",
               "Per search repeat (detail; each interval leaves out the other repeats):", ""]
    md += [_md(key_table(a)), "", "## What the numbers show", "",
           *[f"- {f}" for f in findings(a, capped)], "", "## Freeze depth", "",
           "Every cell of every search repeat. Its NTG column is exploratory: each interval is that comparison's "
           "own 95% interval, its verdict reads the p-value Holm-corrected over the whole table (the last column), "
           "and no claim rests on a cell of it alone.", "",
           _md(depth_table(a)), "", "![freeze depth](freeze_depth.png)", ""]
    md += estimates or []
    if "budget" in plots:
        md += ["## Budget", "", "Expected best validation accuracy after n trials of one search (Dodge et al. 2019), "
               "per cell and search repeat, from the trials that ran their whole schedule (a trial ASHA stopped "
               "scored half a run), up to the number that did: past it a curve would extrapolate. The band is a "
               "90% bootstrap over those trials. A curve still rising at its end means more trials would likely "
               "have found better configurations. A curve is computed from the trials that ran, so a flat one at a "
               "low value does not say the budget sufficed: the search never reached a good region, and more "
               "trials may or may not. " + budget, "", "![budget](budget_curves.png)", ""]
    if "cost" in plots:
        md += ["## Cost", "", "![cost](cost.png)", ""]
    if "curves" in plots:
        md += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    if imp or "parallel" in plots:
        md += ["## Search", ""]
    if imp:
        md += ["fANOVA importance of each searched dimension for the best validation accuracy, within each arm "
               "(over the trials that ran their schedule; under ~20 trials it is a hint, not a finding):", ""]
        n = {arm: sum(r.config.searched and r.status == "FINISHED" and r.config.arm == arm for r in results)
             for arm in imp}
        md += [f"- `{arm}` ({n[arm]} trials): " + ", ".join(f"{k} {v:.2f}" for k, v in i.items())
               for arm, i in imp.items()]
        md += [""]
    if "parallel" in plots:
        md += ["![parallel coordinates](parallel_coordinates.png)", ""]
    md += ["All trials: [trials.csv](trials.csv).", ""]
    return "\n".join(md)
