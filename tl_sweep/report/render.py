"""Render a study: markdown and text tables, plain-sentence findings, the CSV of every run, and the plots.

Pure functions of an :class:`~tl_sweep.report.stats.Analysis` and typed results; nothing here reads MLflow.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any

from tl_sweep.contract import DIMENSIONS, TrialResult
from tl_sweep.report.stats import Analysis, verdict

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


def trials_csv(results: list[TrialResult]) -> str:
    cols = ["run_id", "name", "role", "arm", "seed", *DIMENSIONS, "best_val_acc", "test_acc", "epochs_run", "status"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r.row())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- plots


def plot_freeze_depth(a: Analysis, path: Path) -> None:
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


def plot_learning_curves(curves: list[tuple[str, str, list[tuple[int, float]]]], path: Path) -> bool:
    """Validation accuracy per epoch, one line per (label, style, [(epoch, value)])."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, style, points in curves:
        ax.plot([e for e, _ in points], [100 * v for _, v in points], style, marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Learning curves: shallowest vs deepest fine-tuning (best trial each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bool(curves)


def plot_search(study, imp: dict[str, float], imp_path: Path, pc_path: Path) -> None:
    """fANOVA importance bars and Optuna's parallel coordinates."""
    import matplotlib.pyplot as plt
    import optuna

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


def markdown(header: dict[str, Any], parent_id: str, results: list[TrialResult], a: Analysis,
             imp: dict[str, float], curves: bool) -> str:
    key = key_table(a)
    search = [r for r in results if not r.config.final]
    finals = [r for r in results if r.config.final]
    depth_table = [["arm", "unfrozen blocks", "search trials", "best val %", "test % [95% CI]", "NTG pts [95% CI]"]]
    for (arm, depth) in sorted(a.per_depth, key=lambda k: (k[0] == "scratch", k[0], k[1])):
        cell = a.per_depth[(arm, depth)]
        depth_table.append([arm, str(depth), str(cell["trials"]), _pct(cell["best_val"]), _ci(cell.get("test")),
                            _gap(cell.get("ntg"))])
    status = {s: sum(1 for r in search if r.status == s) for s in ("FINISHED", "EARLY_STOPPED", "FAILED")}
    h = header
    md = [f"# tl-sweep report: {h['experiment']}", "",
          f"Parent run `{parent_id}` · arch `{h['arch']}` · data `{h['dataset']}` "
          f"(classes {h['classes']}; train {h['n_train']}, val {h['n_val']}, test {h['n_test']}) · "
          f"input {h['crop']} px · seed {h['seed']}", "",
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
    return "\n".join(md)
