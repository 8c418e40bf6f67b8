"""The report's plots (PNG, matplotlib): freeze depth, budget curves, cost, learning curves, each searched dimension
and parallel coordinates. Pure functions of an :class:`~tl_sweep.report.stats.Analysis`, typed results and the
declared search spaces; nothing here reads MLflow."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from tl_sweep.contract import NAMES, TrialResult
from tl_sweep.report import budget
from tl_sweep.report.stats import Analysis
from tl_sweep.report.stats import mean_ci as _mean_ci


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: int = 8, ncol: int = 1,
          integer_x: bool = False) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if integer_x:  # epochs, trials, blocks: whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chance_line(ax, chance: float | None, label: str = "majority-class rate") -> None:
    if chance is not None:
        ax.axhline(100 * chance, color="red", ls=":", label=label)


def plot_freeze_depth(a: Analysis, path: Path) -> None:
    """Test accuracy per depth (finals of every search repeat pooled), scratch as a band, chance as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in a.arms:
        if arm == a.scratch:
            continue
        pts = []
        for d in a.depths(arm):
            tests = [t for c in a.cells.values() if (c.arm, c.depth) == (arm, d) for t in c.final_test.values()]
            if tests:
                pts.append((d, _mean_ci(tests)))
        if pts:  # an accuracy's interval within [0, 100]
            err = [[0 if math.isnan(t[1]) else 100 * (t[0] - max(0.0, t[1])) for _, t in pts],
                   [0 if math.isnan(t[2]) else 100 * (min(1.0, t[2]) - t[0]) for _, t in pts]]
            ax.errorbar([d for d, _ in pts], [100 * t[0] for _, t in pts], yerr=err, marker="o", capsize=3, label=arm)
    base = [t for d in a.depths(a.scratch) for t in a.pooled_tests(a.scratch, d)] if a.scratch else []
    if base:
        m, lo, hi = _mean_ci(base)
        ax.axhline(100 * m, color="grey", ls="--", label="scratch (tuned)")
        if not math.isnan(lo):
            ax.axhspan(100 * max(0.0, lo), 100 * min(1.0, hi), color="grey", alpha=0.2)
    if a.chance:
        ax.axhline(100 * max(a.chance.values()), color="red", ls=":", label="chance (majority class)")
    _save(fig, ax, path, "unfrozen blocks (0 = linear probe)", "test accuracy (%)",
          "Freeze depth (finals of all search repeats, mean ± 95% CI)", integer_x=True)


def plot_budget(curves: list[budget.BudgetCurve], path: Path) -> bool:
    """Expected best validation accuracy vs trials, one panel per cell, one line (and 90% bootstrap band) per
    search repeat, from full-schedule trials only (Dodge et al. 2019)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not curves:
        return False
    cells = sorted({(c.arm, c.depth) for c in curves}, key=lambda k: (k[0] == "scratch", str(k[0]), k[1]))
    cols = min(4, len(cells))
    rows = math.ceil(len(cells) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax, (arm, depth) in zip(axes.flat, cells):
        for c in (c for c in curves if (c.arm, c.depth) == (arm, depth)):
            n = range(1, len(c.mean) + 1)
            line, = ax.plot(n, [100 * y for y in c.mean], marker=".", label=f"repeat {c.search} "
                                                                            f"({c.finished}/{c.started} full)")
            ax.fill_between(n, [100 * y for y in c.lo], [100 * y for y in c.hi], color=line.get_color(), alpha=0.15)
        ax.set_title(f"{arm} k={depth}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("trials in one search", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("expected best val acc (%)", fontsize=8)
    fig.suptitle("Budget curves (full-schedule trials; band: 90% bootstrap): still rising = more trials would help; "
                 "flat and low = the search never found a good region", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_cost(a: Analysis, cost: dict[tuple[str, int], float], path: Path) -> bool:
    """Test accuracy vs compute seconds per (arm, depth): the price of each freeze depth."""
    import matplotlib.pyplot as plt

    pts = []
    for (arm, depth), secs in cost.items():
        tests = a.pooled_tests(arm, depth)
        if tests:
            pts.append((arm, depth, secs, statistics.fmean(tests)))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in a.arms:
        mine = sorted((p for p in pts if p[0] == arm), key=lambda p: p[1])
        ax.plot([p[2] for p in mine], [100 * p[3] for p in mine], marker="o", label=arm)
        for p in mine:
            ax.annotate(f"k={p[1]}", (p[2], 100 * p[3]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _save(fig, ax, path, "compute seconds (search, selection and finals, all repeats)",
          "mean test accuracy of the finals (%)",
          "Cost of each freeze depth")
    return True


def plot_learning_curves(curves: list[tuple[str, str, list[tuple[int, float]]]], path: Path,
                         title: str = "Learning curves: shallowest vs deepest fine-tuning (best trial each)",
                         chance: float | None = None) -> bool:
    """Validation accuracy per epoch, one line per (label, style, [(epoch, value)])."""
    import matplotlib.pyplot as plt

    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, style, points in curves:
        ax.plot([e for e, _ in points], [100 * v for _, v in points], style, marker=".", label=label)
    _chance_line(ax, chance, "majority-class rate of val")
    _save(fig, ax, path, "epoch", "validation accuracy (%)", title, legend=7, integer_x=True)
    return True


def _axes(results: list[TrialResult], space: dict[str, dict]) -> list[tuple[str, dict]]:
    """The dimensions worth an axis: those the spec searched that took two values or more, then the learning rate
    those choices made (lr = reference × lr_mult × batch / 256: what lr_mult alone does not say), on a log scale."""
    axes = []
    for d in NAMES:
        seen = {getattr(r.config, d) for r in results}
        if d not in space or len(seen) < 2:
            continue
        how = space[d]
        if "choices" in how and not seen <= set(how["choices"]):  # scratch's depth (every block) is not in the grid
            how = {"choices": how["choices"] + sorted(seen - set(how["choices"]), key=lambda v: (str(type(v)), v))}
        axes.append((d, how))
    lrs = [r.config.lr for r in results]
    if len(set(lrs)) > 1:
        axes.append(("lr", {"low": min(lrs), "high": max(lrs), "log": True, "int": False}))
    return axes


def _value(r: TrialResult, name: str):
    return r.config.lr if name == "lr" else getattr(r.config, name)


def plot_dimensions(results: list[TrialResult], path: Path | None, chance: float | None = None,
                    space: dict[str, dict] | None = None):
    """Each trial's best validation accuracy against each searched dimension, on the axis the spec searched it
    on (a list is categorical, a log range on a log scale, an int range in whole numbers) and the learning rate;
    trials that ran their schedule and early-stopped ones apart (a legend entry only for what is there); the
    majority-class rate as a line."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [r for r in results if r.config.searched and r.best_val_acc is not None]
    axes_ = _axes(done, space or {})
    if not axes_:
        return False
    fig, axes = plt.subplots(1, len(axes_), figsize=(3.0 * len(axes_), 3.0), squeeze=False, sharey=True)
    for ax, (d, how) in zip(axes[0], axes_):
        for status, marker, label in (("FINISHED", "o", "ran its schedule"), ("EARLY_STOPPED", "x", "stopped early")):
            mine = [r for r in done if r.status == status]
            if not mine:
                continue
            x = [how["choices"].index(_value(r, d)) if "choices" in how else _value(r, d) for r in mine]
            ax.scatter(x, [100 * r.best_val_acc for r in mine], marker=marker, s=18, label=label)
        if "choices" in how:
            ax.set_xticks(range(len(how["choices"])), [str(v) for v in how["choices"]], fontsize=7)
        elif how["log"]:
            ax.set_xscale("log")
        elif how["int"]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _chance_line(ax, chance)
        ax.set_xlabel("learning rate (log)" if d == "lr" else d + (" (log)" if how.get("log") else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best validation accuracy (%)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Validation accuracy against each searched dimension", fontsize=9)
    fig.tight_layout()
    if path is None:  # the figure itself (a test reads its axes)
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_parallel(results: list[TrialResult], space: dict[str, dict], path: Path) -> bool:
    """Parallel coordinates of the trials that ran their schedule: one axis per searched dimension on the scale
    it was searched on (categories at their values, log ranges in log, whole numbers for int ranges) and the
    learning rate, one line per trial coloured by its best validation accuracy in percent (viridis: no line
    fades into the background), the best drawn last."""
    import matplotlib.pyplot as plt
    import numpy as np

    done = sorted((r for r in results if r.config.searched and r.status == "FINISHED" and r.best_val_acc is not None),
                  key=lambda r: r.best_val_acc)
    axes_ = _axes(done, space)
    if len(done) < 3 or not axes_:
        return False

    def scale(v, how) -> float:
        if "choices" in how:
            return how["choices"].index(v) / max(1, len(how["choices"]) - 1)
        lo, hi = how["low"], how["high"]
        if how["log"]:
            v, lo, hi = math.log(v), math.log(lo), math.log(hi)
        return 0.5 if hi == lo else (v - lo) / (hi - lo)

    fig, ax = plt.subplots(figsize=(1.6 * len(axes_) + 2.5, 4.2))
    accs = np.array([100 * r.best_val_acc for r in done])
    norm = plt.Normalize(accs.min(), accs.max() if accs.max() > accs.min() else accs.min() + 1)
    cmap = plt.get_cmap("viridis")
    for r, acc in zip(done, accs):
        ax.plot(range(len(axes_)), [scale(_value(r, d), how) for d, how in axes_], color=cmap(norm(acc)), alpha=0.7,
                lw=1.2)
    for i, (d, how) in enumerate(axes_):
        ax.axvline(i, color="black", lw=0.8)
        if "choices" in how:
            ticks = [(scale(v, how), str(v)) for v in how["choices"]]
        elif how["log"]:
            ticks = [(scale(v, how), f"{v:.2g}") for v in np.geomspace(how["low"], how["high"], 4)]
        elif how["int"]:
            ticks = [(scale(v, how), str(v)) for v in sorted({int(round(x)) for x in
                                                              np.linspace(how["low"], how["high"], 5)})]
        else:
            ticks = [(scale(v, how), f"{v:.3g}") for v in np.linspace(how["low"], how["high"], 4)]
        for y, label in ticks:
            ax.annotate(label, (i, y), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(range(len(axes_)), ["learning rate" if d == "lr" else d for d, _ in axes_], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes_) - 0.5)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="best validation accuracy (%)")
    ax.set_title(f"Parallel coordinates of the {len(done)} search trials that ran their schedule", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_matrix(m, path: Path) -> bool:
    """The transfer matrix as a heatmap: sources × targets, colour = pooled NTG in points (blue: the source helps,
    red: negative transfer), each cell annotated with NTG [95% CI], the chosen depth and ★ where it holds after
    Holm over the matrix (:mod:`tl_sweep.report.matrix`)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from tl_sweep.report.matrix import cell_text

    if not m.entries:
        return False
    grid = np.full((len(m.sources), len(m.targets)), np.nan)
    for e in m.entries:
        grid[m.sources.index(e.source), m.targets.index(e.target)] = 100 * e.pooled.value
    span = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(2.2 + 2.1 * len(m.targets), 1.2 + 1.0 * len(m.sources)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
    for e in m.entries:
        i, j = m.sources.index(e.source), m.targets.index(e.target)
        ax.text(j, i, cell_text(e), ha="center", va="center", fontsize=8,
                color="white" if abs(grid[i, j]) > 0.6 * span else "black")
    ax.set_xticks(range(len(m.targets)), m.targets, rotation=20, ha="right")
    ax.set_yticks(range(len(m.sources)), m.sources)
    fig.colorbar(im, ax=ax, label="NTG (points; < 0: the source helps)")
    ax.set_title("Transfer matrix: pooled NTG [95% CI], chosen depth (★: holds after Holm)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_matrix_depths(m, path: Path) -> bool:
    """Per target, test accuracy per depth for each source (finals of every search repeat, mean ± 95% CI) with its
    architecture's scratch baseline as a dashed line and chance as a dotted one."""
    import matplotlib.pyplot as plt

    if not m.parts:
        return False
    fig, axes = plt.subplots(1, len(m.targets), figsize=(4.2 * len(m.targets), 3.8), squeeze=False)
    for ax, t in zip(axes[0], m.targets):
        for p in (p for p in m.parts if p.target == t):
            a = p.analysis
            for arm in a.arms:
                if arm == a.scratch:
                    continue
                pts = [(d, _mean_ci(a.pooled_tests(arm, d))) for d in a.depths(arm) if a.pooled_tests(arm, d)]
                if pts:  # an accuracy's interval within [0, 100]
                    err = [[0 if math.isnan(c[1]) else 100 * (c[0] - max(0.0, c[1])) for _, c in pts],
                           [0 if math.isnan(c[2]) else 100 * (min(1.0, c[2]) - c[0]) for _, c in pts]]
                    ax.errorbar([d for d, _ in pts], [100 * c[0] for _, c in pts], yerr=err, marker="o", capsize=3,
                                label=arm)
            base = [x for d in a.depths(a.scratch) for x in a.pooled_tests(a.scratch, d)] if a.scratch else []
            if base:
                archs = list(dict.fromkeys(q.arch for q in m.parts))
                ax.axhline(100 * statistics.fmean(base), ls=("--", "-.", ":")[archs.index(p.arch) % 3], color="grey",
                           label=f"scratch ({p.arch})" if len(archs) > 1 else "scratch (tuned)")
            if a.chance:
                ax.axhline(100 * max(a.chance.values()), color="red", lw=0.8)
        ax.set_title(t)
        ax.set_xlabel("unfrozen blocks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("Freeze depth per target (finals, mean ± 95% CI; red: chance, the majority-class rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
