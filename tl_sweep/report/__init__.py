"""Freeze-depth and negative-transfer report, built from MLflow alone.

:func:`build` reads a sweep's parent run and child runs from the tracking store (local or a remote server)
(:mod:`~tl_sweep.report.collect`), computes the study's statistics (:mod:`~tl_sweep.report.stats`, pure
functions) and writes ``report.md``, ``trials.csv`` and PNG plots (:mod:`~tl_sweep.report.render`), then logs
them on the parent run. ``tl-sweep report`` rebuilds byte-for-byte the ``report.md`` and ``trials.csv`` that
``tl-sweep run`` wrote at its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tl_sweep import contract, tracking, transferability
from tl_sweep.errors import UserError
from tl_sweep.report import collect, render, stats

__all__ = ["Report", "build"]


@dataclass
class Report:
    out_dir: Path
    markdown: str
    key: str
    analysis: stats.Analysis | None = None


def build(uri: str, exp_id: str, parent_id: str, out_dir: str | Path | None = None, log=print,
          log_artifacts: bool = True) -> Report:
    """Write report.md, trials.csv and plots for one sweep; log them on its parent run; print the key table."""
    import matplotlib

    matplotlib.use("Agg")
    sweep = collect.sweep(uri, exp_id, parent_id)
    results = sweep.results
    if not any(r.config.searched for r in results):
        raise UserError(f"run {parent_id} has no trial runs to report on")
    out = Path(out_dir or Path("reports") / f"{sweep.experiment}-{parent_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    header = {"experiment": sweep.experiment, **collect.describe(sweep)}
    a = stats.analyze(results, collect.chance(header.pop("chance"), header.pop("chance_by_search")))
    plots = set()
    render.plot_freeze_depth(a, out / "freeze_depth.png")
    budget = stats.budget_curves(results)
    if render.plot_budget(budget, out / "budget_curves.png"):
        plots.add("budget")
    if render.plot_cost(a, stats.cost(results), out / "cost.png"):
        plots.add("cost")
    chosen = stats.curve_runs(results, a)
    history = collect.histories(uri, [rid for _, _, rid in chosen], contract.METRIC)
    if render.plot_learning_curves([(label, style, history[rid]) for label, style, rid in chosen],
                                   out / "learning_curves.png"):
        plots.add("curves")
    imp = stats.importance_per_arm(results)
    study = stats.search_study(results)
    if imp and study is not None:
        render.plot_parallel(study, out / "parallel_coordinates.png")
    est = transferability.read_metrics(sweep.metrics, a.arms)
    est_md = render.estimates_section(est, truth := stats.truth_per_cell(a), stats.agreement(est, truth)) \
        if est else None
    markdown = render.markdown(header, parent_id, results, a, imp, plots, est_md, render.budget_summary(budget))
    (out / "report.md").write_text(markdown)
    (out / "trials.csv").write_text(render.trials_csv(results))
    # the resolved spec beside the report, so the folder reproduces the study on its own
    tracking.download_artifact(uri, parent_id, "resolved.yaml", out)
    if log_artifacts:
        files = sorted(f for f in out.iterdir() if f.suffix in (".md", ".csv", ".png"))  # not resolved.yaml again
        tracking.log_files(uri, parent_id, files, artifact_path="report")
        for search, metrics in stats.parent_metrics(a).items():  # MLflow's chart and compare views show the study
            tracking.log_batch(uri, parent_id, metrics, step=search)
    key_text = render.text_table(render.key_table(a))
    log(f"report: {out / 'report.md'} (also in the parent run's artifacts under report/)")
    return Report(out, markdown, key_text, a)
