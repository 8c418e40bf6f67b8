"""Freeze-depth and negative-transfer report, built from MLflow alone.

:func:`build` reads a sweep's parent run and child runs from the tracking store (local or a remote server)
(:mod:`~tl_sweep.report.collect`), computes the study's statistics (:mod:`~tl_sweep.report.stats`, pure
functions) and writes ``report.md``, ``trials.csv`` (:mod:`~tl_sweep.report.render`), PNG plots
(:mod:`~tl_sweep.report.plots`) and ``report.html``, the same report as one self-contained page
(:mod:`~tl_sweep.report.page`), then logs them on the parent run. ``tl-sweep report`` rebuilds byte-for-byte
the ``report.md`` and ``trials.csv`` that ``tl-sweep run`` wrote at its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tl_sweep import contract, tracking, transferability
from tl_sweep.contract import Tag
from tl_sweep.errors import UserError
from tl_sweep.report import budget, collect, importance, page, render, stats
from tl_sweep.report import plots as plot

__all__ = ["Report", "build", "build_matrix"]
NOTE_END = " The full report: this run's artifacts, report/report.md."


@dataclass
class Report:
    out_dir: Path
    markdown: str
    key: str  # what the CLI prints: a study's key table, a plain sweep's line on chance
    analysis: stats.Analysis | None = None  # a study's
    best_chance: tuple[float, float, float, int] | None = None  # a plain sweep's (val_acc, rate, p, trials)
    estimates: dict | None = None  # a study's transferability estimates per cell, as logged
    compute: dict[str, float] | None = None  # a study's compute seconds per arm


def build(uri: str, exp_id: str, parent_id: str, out_dir: str | Path | None = None, log=print,
          log_artifacts: bool = True) -> Report:
    """Write report.md, report.html, trials.csv and plots for one sweep; log them on its parent run; print the key
    table."""
    import matplotlib

    matplotlib.use("Agg")
    sweep = collect.sweep(uri, exp_id, parent_id)
    results = sweep.results
    if not any(r.config.searched for r in results):
        raise UserError(f"run {parent_id} has no trial runs to report on")
    out = Path(out_dir or Path("reports") / f"{sweep.experiment}-{parent_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    # a transfer matrix's target: its study is named by the experiment and the target
    title = sweep.experiment + (f" / {t}" if (t := sweep.tags.get(Tag.TARGET)) else "")
    header = {"experiment": title, **collect.describe(sweep)}
    if "study.baseline" not in sweep.params and not any(r.config.final for r in results):
        return _sweep(uri, parent_id, sweep, header, out, log, log_artifacts)
    a = stats.analyze(results, collect.chance(header.pop("chance"), header.pop("chance_by_search")),
                      collect.predictions(uri, results))
    plots = set()
    plot.plot_freeze_depth(a, out / "freeze_depth.png")
    curves = budget.budget_curves(results)
    if plot.plot_budget(curves, out / "budget_curves.png"):
        plots.add("budget")
    if plot.plot_cost(a, budget.cost(results), out / "cost.png"):
        plots.add("cost")
    chosen = stats.curve_runs(results, a)
    history = collect.histories(uri, [rid for _, _, rid in chosen], contract.METRIC)
    if plot.plot_learning_curves([(label, style, history[rid]) for label, style, rid in chosen],
                                   out / "learning_curves.png"):
        plots.add("curves")
    imp = importance.importance_per_arm(results, {arm: collect.space(sweep.params, arm) for arm in a.arms})
    if plot.plot_parallel(results, importance.union([collect.space(sweep.params, arm) for arm in a.arms]),
                            out / "parallel_coordinates.png"):
        plots.add("parallel")
    est = transferability.read_metrics(sweep.metrics, a.arms)
    est_md = render.estimates_section(est, truth := stats.truth_per_cell(a), stats.agreement(est, truth)) \
        if est else None
    spaces = {arm: collect.space(sweep.params, arm) for arm in a.arms}
    capped = budget.bounds([r for r in results if r.config.final], spaces)
    markdown = render.markdown(header, parent_id, results, a, imp, plots, est_md, render.budget_summary(curves),
                               capped, budget.compute(results))
    (out / "report.md").write_text(markdown)
    page.write(markdown, out, f"tl-sweep report: {title}")  # one page, plots inline: MLflow shows it
    (out / "trials.csv").write_text(render.trials_csv(results))
    # the resolved spec beside the report, so the folder reproduces the study on its own
    tracking.download_artifact(uri, parent_id, "resolved.yaml", out)
    if log_artifacts:
        # not resolved.yaml again
        files = sorted(f for f in out.iterdir() if f.suffix in (".md", ".html", ".csv", ".png"))
        tracking.log_files(uri, parent_id, files, artifact_path="report")
        for search, metrics in stats.parent_metrics(a).items():  # MLflow's chart and compare views show the study
            tracking.log_batch(uri, parent_id, metrics, step=search)
        tracking.log_batch(uri, parent_id, stats.pooled_metrics(a), {Tag.NOTE: render.description(
            title, a, render.findings(a, capped)) + NOTE_END})
    key_text = (render.text_table(render.headline_table(a, budget.compute(results))) + "\n\nper search repeat:\n"
                if a.verdicts else "") + render.text_table(render.key_table(a))
    log(f"report: {out / 'report.md'} (also in the parent run's artifacts under report/)")
    return Report(out, markdown, key_text, a, estimates=est, compute=budget.compute(results))


def best_chance(results, header) -> tuple[float, float, float, int] | None:
    """A plain sweep's best trial (of those that ran their schedule) against the validation split's majority-class
    rate: (its val_acc, the rate, the Bonferroni-corrected binomial p, the trials it is the best of)."""
    scored = [r for r in results if r.config.searched and r.best_val_acc is not None]
    done = [r for r in scored if r.status == "FINISHED"]
    chance, n = render.number(header.get("val_chance")), render.number(header.get("n_val"))
    if not done or chance is None or not n:
        return None
    acc = max(r.best_val_acc for r in done)
    return acc, chance, stats.best_above_chance(acc, int(n), chance, len(scored)), len(scored)


def _sweep(uri, parent_id, sweep, header, out: Path, log, log_artifacts: bool) -> Report:
    """A plain sweep's report (no study sections)."""
    results, plots = sweep.results, set()
    top = sorted((r for r in results if r.config.searched and r.status == "FINISHED" and r.best_val_acc is not None),
                 key=lambda r: -r.best_val_acc)[:5]
    history = collect.histories(uri, [r.run_id for r in top], contract.METRIC)
    curves = [(f"{r.trial} k={r.config.unfrozen_blocks} {r.config.optimizer} lr×{r.config.lr_mult:.3g}", "-",
               history[r.run_id]) for r in top]
    chance = best_chance(results, header)
    if plot.plot_learning_curves(curves, out / "learning_curves.png", "Learning curves of the best trials",
                                   chance[1] if chance else None):
        plots.add("curves")
    space = collect.space(sweep.params)
    if plot.plot_dimensions(results, out / "dimensions.png", chance[1] if chance else None, space):
        plots.add("dimensions")
    imp = {"all": i} if (i := importance.importance(importance.search_study(results, space))) else {}
    if plot.plot_parallel(results, space, out / "parallel_coordinates.png"):
        plots.add("parallel")
    markdown = render.sweep_markdown(header, parent_id, results, imp, plots, chance)
    (out / "report.md").write_text(markdown)
    page.write(markdown, out, f"tl-sweep report: {sweep.experiment}")
    (out / "trials.csv").write_text(render.trials_csv(results))
    tracking.download_artifact(uri, parent_id, "resolved.yaml", out)
    if log_artifacts:
        files = sorted(f for f in out.iterdir() if f.suffix in (".md", ".html", ".csv", ".png"))
        tracking.log_files(uri, parent_id, files, artifact_path="report")
    key = ""
    if chance:
        acc, rate, p, tries = chance
        key = (f"best val {100 * acc:.1f}% against the validation split's majority-class rate {100 * rate:.1f}%: "
               f"{'above' if p < stats.ALPHA else 'NOT above'} chance (exact binomial p {p:.2g}, over {tries} trials)")
    if log_artifacts and key:
        tracking.log_batch(uri, parent_id, {}, {Tag.NOTE: f"**{sweep.experiment}**: {key}." + NOTE_END})
    log(f"report: {out / 'report.md'} (also in the parent run's artifacts under report/)")
    return Report(out, markdown, key, None, chance)


def build_matrix(uri: str, exp_id: str, matrix_id: str, out_dir: str | Path | None = None, log=print,
                 log_artifacts: bool = True, known: dict[str, Report] | None = None) -> Report:
    """A transfer matrix's report (:mod:`tl_sweep.report.matrix`): each target's study report (``known``: those
    built already, by run id; the others are built here, into ``<out>/<part>``), then the matrix's heatmap,
    per-target freeze-depth curves, best source per target, the estimates against the k-NN probe, matrix.csv and
    the matrix as metrics, logged on the matrix's run."""
    import json

    import matplotlib

    from tl_sweep.report import matrix

    matplotlib.use("Agg")
    run = tracking.get_run(uri, matrix_id)
    layout = json.loads(run.data.tags.get(Tag.MATRIX, "[]"))
    experiment = tracking.experiment(uri, exp_id).name
    out = Path(out_dir or Path("reports") / f"{experiment}-{matrix_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    runs = {r.data.tags.get(Tag.PART): r for r in tracking.children(uri, exp_id, matrix_id)
            if r.data.tags.get(Tag.ROLE) == "target"}
    parts = []
    for item in layout:
        r = runs.get(item["part"])
        if r is None or r.info.status != "FINISHED":
            log(f"report: the matrix's {item['part']} has not finished; left out")
            continue
        rep = (known or {}).get(r.info.run_id) or build(uri, exp_id, r.info.run_id, out / item["part"],
                                                         log=lambda m: None, log_artifacts=log_artifacts)
        if rep.analysis is None:
            continue
        parts.append(matrix.Part(item["part"], item["target"], item["arch"], r.info.run_id, rep.analysis,
                                 rep.estimates or {}, rep.compute or {}))
    if not parts:
        raise UserError(f"run {matrix_id}: no target of the matrix has finished; nothing to report yet")
    m = matrix.analyze(parts)
    plots = {name for name, drawn in (("heatmap", plot.plot_matrix(m, out / "matrix.png")),
                                      ("curves", plot.plot_matrix_depths(m, out / "matrix_depths.png"))) if drawn}
    markdown = matrix.markdown(m, {"experiment": experiment, "run": matrix_id}, plots)
    (out / "report.md").write_text(markdown)
    page.write(markdown, out, f"tl-sweep transfer matrix: {experiment}")
    (out / "matrix.csv").write_text(matrix.csv(m))
    tracking.download_artifact(uri, matrix_id, "resolved.yaml", out)  # the spec that reproduces the matrix
    if log_artifacts:
        files = [out / f for f in ("report.md", "report.html", "matrix.csv", "matrix.png", "matrix_depths.png")
                 if (out / f).exists()]
        tracking.log_files(uri, matrix_id, files, artifact_path="report")
        tracking.log_batch(uri, matrix_id, matrix.metrics(m), {Tag.NOTE: matrix.description(m) + NOTE_END})
    log(f"report: {out / 'report.md'} (also in the matrix run's artifacts under report/)")
    return Report(out, markdown, matrix.key_text(m))
