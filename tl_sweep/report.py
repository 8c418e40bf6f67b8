"""Freeze-depth and negative-transfer analysis, read from MLflow alone.

:func:`build` reads a sweep's parent run and its child runs from the tracking store (local or a remote
server), so the same report can be rebuilt at any time: ``tl-sweep report`` produces byte-for-byte the
``report.md`` and ``trials.csv`` that ``tl-sweep run`` wrote at its end. It writes them with PNG plots, logs
all of it as artifacts of the parent run, and returns the key table for the terminal.

Definitions:

* **test accuracy** of an (arm, depth): mean over the study's repeat seeds of the best-validation-epoch
  model's accuracy on the held-out test split, with a 95% t-interval;
* **best depth** of an arm: the depth whose search reached the highest validation accuracy (test figures
  never choose anything);
* **NTG** (negative transfer gap, Wang et al. 2019): test error of the pretrained arm (best tuned) minus test
  error of the scratch arm (best tuned). NTG > 0 with a 95% Welch interval above 0 is flagged as negative
  transfer; an interval below 0 is a transfer gain; otherwise the difference is not resolved.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_sweep import tracking
from tl_sweep.errors import UserError

DIMS = ("batch_size", "optimizer", "lr_mult", "head_lr_mult", "weight_decay", "layer_decay", "unfrozen_blocks",
        "epochs")


# ------------------------------------------------------------------------------------------ statistics


def _t(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (lo, hi); the interval is NaN with fewer than two values."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = _t(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def ntg(pretrained_acc: list[float], scratch_acc: list[float]) -> tuple[float, float, float]:
    """NTG = test error(pretrained) − test error(scratch), with a 95% Welch interval."""
    gap = statistics.fmean(scratch_acc) - statistics.fmean(pretrained_acc)
    n1, n2 = len(pretrained_acc), len(scratch_acc)
    if n1 < 2 or n2 < 2:
        return gap, math.nan, math.nan
    v1, v2 = statistics.variance(pretrained_acc) / n1, statistics.variance(scratch_acc) / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return gap, gap, gap
    dof = (v1 + v2) ** 2 / ((v1 ** 2) / (n1 - 1 if v1 else 1) + (v2 ** 2) / (n2 - 1 if v2 else 1))
    half = _t(max(1, round(dof))) * se
    return gap, gap - half, gap + half


def verdict(gap: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return "not resolved (one seed)"
    if lo > 0:
        return "negative transfer"
    if hi < 0:
        return "transfer gain"
    return "no significant difference"


# -------------------------------------------------------------------------------------------- reading


def collect(uri: str, exp_id: str, parent_id: str) -> list[dict[str, Any]]:
    """One row per child run: role, arm, depth, the search dimensions, final metrics and status."""
    rows = []
    for r in tracking.children(uri, exp_id, parent_id):
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        row = {"run_id": r.info.run_id, "name": r.info.run_name, "role": t.get("tl_sweep.role", "trial"),
               "arm": p.get("arm") or p.get("weights"), "seed": _num(p.get("seed")),
               **{d: _num(p.get(d)) for d in DIMS},
               "best_val_acc": m.get("best_val_acc"), "test_acc": m.get("test_acc"),
               "epochs_run": _num(t.get("tl_sweep.epochs_run")),
               "status": "FAILED" if r.info.status == "FAILED" else (
                   "EARLY_STOPPED" if t.get("tl_sweep.early_stopped") == "true" else r.info.status)}
        rows.append(row)
    rows.sort(key=lambda r: (r["role"], str(r["arm"]), r["unfrozen_blocks"] or 0, -(r["best_val_acc"] or -1),
                             r["seed"] or 0, r["run_id"]))
    return rows


def _num(v: str | None) -> Any:
    if v is None:
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


# ------------------------------------------------------------------------------------------- analysis


@dataclass
class Analysis:
    arms: list[str]
    scratch: str | None
    per_depth: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    per_arm: dict[str, dict[str, Any]] = field(default_factory=dict)


def analyze(rows: list[dict[str, Any]]) -> Analysis:
    search = [r for r in rows if r["role"] == "trial" and r["best_val_acc"] is not None]
    finals = [r for r in rows if r["role"] == "final" and r["test_acc"] is not None]
    arms = sorted({r["arm"] for r in search}, key=lambda a: (a == "scratch", a))
    scratch = "scratch" if "scratch" in arms else None
    a = Analysis(arms, scratch)
    for r in search:
        key = (r["arm"], r["unfrozen_blocks"])
        cell = a.per_depth.setdefault(key, {"trials": 0, "best_val": -1.0, "tests": []})
        cell["trials"] += 1
        cell["best_val"] = max(cell["best_val"], r["best_val_acc"])
    for r in finals:
        key = (r["arm"], r["unfrozen_blocks"])
        a.per_depth.setdefault(key, {"trials": 0, "best_val": math.nan, "tests": []})["tests"].append(r["test_acc"])
    scratch_tests = []
    if scratch:
        sk = max((k for k in a.per_depth if k[0] == scratch), key=lambda k: a.per_depth[k]["best_val"])
        scratch_tests = a.per_depth[sk]["tests"]
    for (arm, _), cell in a.per_depth.items():
        if cell["tests"]:
            cell["test"] = mean_ci(cell["tests"])
            if scratch_tests and arm != scratch:
                cell["ntg"] = ntg(cell["tests"], scratch_tests)
    for arm in arms:
        keys = [k for k in a.per_depth if k[0] == arm]
        best = max(keys, key=lambda k: a.per_depth[k]["best_val"])
        cell = a.per_depth[best]
        a.per_arm[arm] = {"best_depth": best[1], "best_val": cell["best_val"], "test": cell.get("test"),
                          "ntg": cell.get("ntg"), "trials": sum(a.per_depth[k]["trials"] for k in keys)}
    return a


# ---------------------------------------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(t: tuple | None) -> str:
    if not t:
        return "–"
    m, lo, hi = t
    return f"{_pct(m)}" + ("" if math.isnan(lo) else f" [{_pct(lo)}, {_pct(hi)}]")


def _gap(g: tuple | None) -> str:
    if not g:
        return "–"
    gap, lo, hi = g
    txt = f"{100 * gap:+.1f}" + ("" if math.isnan(lo) else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    return f"{txt} ({verdict(*g)})"


def key_table(a: Analysis) -> list[list[str]]:
    head = ["arm", "best val %", "test % [95% CI]", "NTG pts [95% CI]", "best depth", "trials"]
    body = [[arm, _pct(v["best_val"]), _ci(v["test"]), _gap(v["ntg"]) if arm != a.scratch else "(baseline)",
             str(v["best_depth"]), str(v["trials"])] for arm, v in a.per_arm.items()]
    return [head] + body


def _md(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table[1:]])


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def findings(a: Analysis) -> list[str]:
    """Plain sentences on what the numbers show, including when they show nothing."""
    out = []
    for arm, v in a.per_arm.items():
        if arm == a.scratch:
            continue
        if v["ntg"]:
            gap, lo, hi = v["ntg"]
            out.append(f"`{arm}` at its best depth ({v['best_depth']} unfrozen blocks): NTG {100 * gap:+.1f} points "
                       f"→ **{verdict(gap, lo, hi)}** against the tuned scratch baseline.")
        depths = sorted(d for (arm2, d) in a.per_depth if arm2 == arm and "test" in a.per_depth[(arm2, d)])
        if len(depths) >= 2:
            tests = [(d, a.per_depth[(arm, d)]["test"][0]) for d in depths]
            top = max(tests, key=lambda t: t[1])
            low = min(tests, key=lambda t: t[1])
            out.append(f"`{arm}`: test accuracy ranges from {_pct(low[1])}% (k={low[0]}) to {_pct(top[1])}% "
                       f"(k={top[0]}) across depths.")
            neg = [d for d in depths if a.per_depth[(arm, d)].get("ntg") and verdict(*a.per_depth[(arm, d)]["ntg"])
                   == "negative transfer"]
            if neg:
                out.append(f"`{arm}`: negative transfer at depths {neg} (interval above 0).")
            elif a.scratch:
                out.append(f"`{arm}`: no depth shows negative transfer with an interval above 0.")
    if a.scratch:
        per_depth = [c["trials"] for (arm, _), c in a.per_depth.items() if arm != a.scratch]
        if per_depth and min(per_depth) < a.per_arm[a.scratch]["trials"]:
            spread = f"{min(per_depth)}" if min(per_depth) == max(per_depth) else f"{min(per_depth)}–{max(per_depth)}"
            out.append(f"Caveat: each depth of a pretrained arm was searched with {spread} "
                       f"trials, the scratch arm with {a.per_arm[a.scratch]['trials']} at its one depth; a per-depth "
                       f"gap includes that difference in tuning (raise search.num_trials to narrow it).")
    if not out:
        out.append("No final evaluation on the test split (not a study): the table shows validation accuracy only.")
    return out


def trials_csv(rows: list[dict[str, Any]]) -> str:
    cols = ["run_id", "name", "role", "arm", "seed", *DIMS, "best_val_acc", "test_acc", "epochs_run", "status"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- plots


def _plot_freeze_depth(a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    use_test = any("test" in c for c in a.per_depth.values())
    for arm in a.arms:
        if arm == a.scratch:
            continue
        depths = sorted(d for (x, d) in a.per_depth if x == arm)
        if use_test:
            pts = [(d, a.per_depth[(arm, d)]["test"]) for d in depths if "test" in a.per_depth[(arm, d)]]
            ys = [100 * t[0] for _, t in pts]
            err = [[100 * (t[0] - t[1]) if not math.isnan(t[1]) else 0 for _, t in pts],
                   [100 * (t[2] - t[0]) if not math.isnan(t[2]) else 0 for _, t in pts]]
            ax.errorbar([d for d, _ in pts], ys, yerr=err, marker="o", capsize=3, label=arm)
        else:
            ax.plot(depths, [100 * a.per_depth[(arm, d)]["best_val"] for d in depths], marker="o", label=arm)
    if a.scratch and a.per_arm[a.scratch]["test"]:
        m, lo, hi = a.per_arm[a.scratch]["test"]
        ax.axhline(100 * m, color="grey", ls="--", label="scratch (tuned)")
        if not math.isnan(lo):
            ax.axhspan(100 * lo, 100 * hi, color="grey", alpha=0.2)
    ax.set_xlabel("unfrozen blocks (0 = linear probe)")
    ax.set_ylabel(("test" if use_test else "best validation") + " accuracy (%)")
    ax.set_title("Freeze depth" + (" (mean ± 95% CI over seeds)" if use_test else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_learning_curves(uri: str, rows: list[dict[str, Any]], a: Analysis, path: Path) -> bool:
    """Validation accuracy per epoch: best linear probe (k=0) vs best full fine-tuning (k=max) per arm."""
    import matplotlib.pyplot as plt

    c = tracking.client(uri)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for arm in a.arms:
        mine = [r for r in rows if r["role"] == "trial" and r["arm"] == arm and r["best_val_acc"] is not None]
        if not mine:
            continue
        depths = sorted({r["unfrozen_blocks"] for r in mine})
        for depth in sorted({depths[0], depths[-1]}):
            style = ":" if depth < depths[-1] else "-"
            best = max((r for r in mine if r["unfrozen_blocks"] == depth), key=lambda r: r["best_val_acc"])
            hist = sorted(tracking._retry(c.get_metric_history, best["run_id"], "val_acc"), key=lambda m: m.step)
            label = f"{arm} k={depth}" + (" (linear probe)" if depth == 0 else "")
            ax.plot([m.step for m in hist], [100 * m.value for m in hist], style, marker=".", label=label)
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Learning curves: shallowest vs deepest fine-tuning (best trial each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _study(rows: list[dict[str, Any]]):
    """An in-memory Optuna study of the finished search trials, for importance and parallel coordinates."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [r for r in rows if r["role"] == "trial" and r["status"] == "FINISHED" and r["best_val_acc"] is not None]
    dists = {}
    for d in DIMS:
        vals = sorted({r[d] for r in done if r[d] is not None}, key=str)
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
        params = {d: (str(r[d]) if isinstance(dist, CategoricalDistribution) else r[d]) for d, dist in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r["best_val_acc"]))
    return study


def _plot_search(rows: list[dict[str, Any]], imp_path: Path, pc_path: Path) -> dict[str, float]:
    import warnings

    import matplotlib.pyplot as plt
    import optuna

    study = _study(rows)
    if study is None:
        return {}
    imp = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("fANOVA importance for best validation accuracy")
    ax.set_title("Which search dimensions mattered")
    fig.tight_layout()
    fig.savefig(imp_path, dpi=110)
    plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
    fig = ax.figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    fig.savefig(pc_path, dpi=110)
    plt.close(fig)
    return imp


# ----------------------------------------------------------------------------------------------- build


@dataclass
class Report:
    out_dir: Path
    markdown: str
    key: str


def latest_parent(uri: str, experiment: str) -> tuple[str, str]:
    """(experiment id, newest parent run id) of an experiment, by name."""
    c = tracking.client(uri)
    exp = tracking._retry(c.get_experiment_by_name, experiment)
    if exp is None:
        names = [e.name for e in tracking._retry(c.search_experiments)]
        raise UserError(f"--experiment: no experiment {experiment!r} in {uri}; experiments there: "
                        f"{', '.join(names) or 'none'}")
    runs = tracking._retry(c.search_runs, [exp.experiment_id], filter_string="tags.`tl_sweep.role` = 'sweep'",
                           order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UserError(f"--experiment: experiment {experiment!r} has no tl-sweep run yet; run a spec first")
    return exp.experiment_id, runs[0].info.run_id


def build(uri: str, exp_id: str, parent_id: str, out_dir: str | Path | None = None, log=print,
          log_artifacts: bool = True) -> Report:
    """Write report.md, trials.csv and plots for one sweep; log them on its parent run; print the key table."""
    import matplotlib

    matplotlib.use("Agg")
    c = tracking.client(uri)
    parent = tracking._retry(c.get_run, parent_id)
    exp = tracking._retry(c.get_experiment, exp_id)
    rows = collect(uri, exp_id, parent_id)
    if not any(r["role"] == "trial" for r in rows):
        raise UserError(f"run {parent_id} has no trial runs to report on")
    out = Path(out_dir or Path("reports") / f"{exp.name}-{parent_id[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    a = analyze(rows)
    _plot_freeze_depth(a, out / "freeze_depth.png")
    curves = _plot_learning_curves(uri, rows, a, out / "learning_curves.png")
    imp = _plot_search(rows, out / "param_importance.png", out / "parallel_coordinates.png")
    key = key_table(a)
    p, t = parent.data.params, parent.data.tags
    search = [r for r in rows if r["role"] == "trial"]
    finals = [r for r in rows if r["role"] == "final"]
    depth_table = [["arm", "unfrozen blocks", "search trials", "best val %", "test % [95% CI]", "NTG pts [95% CI]"]]
    for (arm, depth) in sorted(a.per_depth, key=lambda k: (k[0] == "scratch", k[0], k[1])):
        cell = a.per_depth[(arm, depth)]
        depth_table.append([arm, str(depth), str(cell["trials"]), _pct(cell["best_val"]), _ci(cell.get("test")),
                            _gap(cell.get("ntg"))])
    status = {s: sum(1 for r in search if r["status"] == s) for s in ("FINISHED", "EARLY_STOPPED", "FAILED")}
    md = [f"# tl-sweep report: {exp.name}", "",
          f"Parent run `{parent_id}` · arch `{p.get('model.arch')}` · data `{p.get('data.dataset')}` "
          f"(classes {t.get('tl_sweep.data.classes', '?')}; train {t.get('tl_sweep.data.n_train', '?')}, "
          f"val {t.get('tl_sweep.data.n_val', '?')}, test {t.get('tl_sweep.data.n_test', '?')}) · "
          f"input {p.get('resolved.input.crop', '?')} px · seed {p.get('seed')}", "",
          f"Search: {len(search)} trials ({status['FINISHED']} finished, {status['EARLY_STOPPED']} early-stopped, "
          f"{status['FAILED']} failed); final evaluation: {len(finals)} re-trainings scored once on the test split. "
          f"Test figures are means over seeds with 95% t-intervals; NTG = test error(pretrained) − test "
          f"error(scratch) in points, with a 95% Welch interval. The best depth is chosen on validation accuracy.",
          "", "## Key results", "", _md(key), "", "## What the numbers show", "",
          *[f"- {f}" for f in findings(a)], "", "## Freeze depth", "", _md(depth_table), "",
          "![freeze depth](freeze_depth.png)", ""]
    if curves:
        md += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    if imp:
        md += ["## Search", "", "fANOVA importance of each searched dimension for the best validation accuracy: "
               + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()) + ".", "",
               "![parameter importance](param_importance.png)", "",
               "![parallel coordinates](parallel_coordinates.png)", ""]
    md += ["All trials: [trials.csv](trials.csv).", ""]
    markdown = "\n".join(md)
    (out / "report.md").write_text(markdown)
    (out / "trials.csv").write_text(trials_csv(rows))
    try:  # the resolved spec beside the report, so the folder reproduces the study on its own
        tracking._retry(c.download_artifacts, parent_id, "resolved.yaml", str(out))
    except Exception:  # noqa: BLE001 - a sweep logged by an older tl-sweep may lack it
        pass
    if log_artifacts:
        files = sorted(f for f in out.iterdir() if f.suffix in (".md", ".csv", ".png"))  # not resolved.yaml again
        tracking.log_files(uri, parent_id, files, artifact_path="report")
    key_text = text_table(key)
    log(f"\nreport: {out / 'report.md'} (also in the parent run's artifacts under report/)\n{key_text}")
    return Report(out, markdown, key_text)
