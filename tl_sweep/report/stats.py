"""The study's arithmetic: pure functions of numbers and trial results (no MLflow, no files).

* **test accuracy** of an (arm, depth): mean over the study's repeat seeds of the best-validation-epoch
  model's accuracy on the held-out test split, with a 95% t-interval;
* **best depth** of an arm: the depth whose search reached the highest validation accuracy (test figures
  never choose anything);
* **NTG** (negative transfer gap, Wang et al. 2019): test error of the pretrained arm (best tuned) minus test
  error of the scratch arm (best tuned). NTG > 0 with a 95% Welch interval above 0 is flagged as negative
  transfer; an interval below 0 is a transfer gain; otherwise the difference is not resolved.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from tl_sweep.contract import DIMENSIONS, TrialResult


def _t(df: float) -> float:
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


@dataclass
class Analysis:
    arms: list[str]
    scratch: str | None
    per_depth: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    per_arm: dict[str, dict[str, Any]] = field(default_factory=dict)


def analyze(results: list[TrialResult]) -> Analysis:
    """Per (arm, depth) and per arm: search trials, best validation accuracy, test interval and NTG."""
    search = [r for r in results if not r.config.final and r.best_val_acc is not None]
    finals = [r for r in results if r.config.final and r.test_acc is not None]
    arms = sorted({r.config.arm for r in search}, key=lambda a: (a == "scratch", a))
    scratch = "scratch" if "scratch" in arms else None
    a = Analysis(arms, scratch)
    for r in search:
        key = (r.config.arm, r.config.unfrozen_blocks)
        cell = a.per_depth.setdefault(key, {"trials": 0, "best_val": -1.0, "tests": []})
        cell["trials"] += 1
        cell["best_val"] = max(cell["best_val"], r.best_val_acc)
    for r in finals:
        key = (r.config.arm, r.config.unfrozen_blocks)
        a.per_depth.setdefault(key, {"trials": 0, "best_val": math.nan, "tests": []})["tests"].append(r.test_acc)
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


def curve_runs(results: list[TrialResult], a: Analysis) -> list[tuple[str, str, str]]:
    """The learning curves worth drawing: per arm, the best trial at its shallowest and deepest depth.

    Returns (label, line style, MLflow run id).
    """
    out = []
    for arm in a.arms:
        mine = [r for r in results if not r.config.final and r.config.arm == arm and r.best_val_acc is not None]
        if not mine:
            continue
        depths = sorted({r.config.unfrozen_blocks for r in mine})
        for depth in sorted({depths[0], depths[-1]}):
            best = max((r for r in mine if r.config.unfrozen_blocks == depth), key=lambda r: r.best_val_acc)
            label = f"{arm} k={depth}" + (" (linear probe)" if depth == 0 else "")
            out.append((label, ":" if depth < depths[-1] else "-", best.run_id))
    return out


def search_study(results: list[TrialResult]):
    """An in-memory Optuna study of the finished search trials (importance, parallel coordinates); ``None``
    when fewer than three finished or nothing varied."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [r for r in results if not r.config.final and r.status == "FINISHED" and r.best_val_acc is not None]
    dists = {}
    for d in DIMENSIONS:
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
    """fANOVA importance of each searched dimension for the best validation accuracy (seeded)."""
    import optuna

    if study is None:
        return {}
    return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
