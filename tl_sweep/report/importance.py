"""What the search found out: an Optuna study of the finished search trials (for fANOVA importance and the
parallel-coordinates plot). Not pure statistics: it builds Optuna studies."""

from __future__ import annotations

from tl_sweep.contract import TrialResult


def distribution(how: dict):
    """The Optuna distribution of a dimension as the spec declared it (:func:`tl_sweep.report.collect.space`)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if "choices" in how:
        return CategoricalDistribution(tuple(how["choices"]))
    if how["int"]:
        return IntDistribution(int(how["low"]), int(how["high"]), log=how["log"])
    return FloatDistribution(float(how["low"]), float(how["high"]), log=how["log"])


def search_study(results: list[TrialResult], space: dict[str, dict]):
    """An in-memory Optuna study of the finished search trials (importance, parallel coordinates), each dimension
    with the distribution the spec searched it on (``space``: a list is categorical, a range an int or float
    range, log where it was searched on a log scale), its value the best validation accuracy in percent. Only
    dimensions that took two values or more among those trials; ``None`` when fewer than three finished or none
    varied."""
    import optuna

    done = [r for r in results if r.config.searched and r.status == "FINISHED" and r.best_val_acc is not None]
    dists = {d: distribution(how) for d, how in space.items() if len({getattr(r.config, d) for r in done}) > 1}
    # a trial outside what the spec now declares (a value logged by another spec) cannot be placed: left out
    done = [r for r in done if all(_within(getattr(r.config, d), space[d]) for d in dists)]
    if len(done) < 3 or not dists:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for r in done:
        study.add_trial(optuna.trial.create_trial(params={d: getattr(r.config, d) for d in dists},
                                                  distributions=dists, value=100 * r.best_val_acc))
    return study


def _within(value, how: dict) -> bool:
    return value in how["choices"] if "choices" in how else how["low"] <= value <= how["high"]


def importance(study) -> dict[str, float]:
    """fANOVA importance of each searched dimension for the best validation accuracy (seeded); none when every
    trial scored the same (nothing to explain: fANOVA itself refuses zero variance)."""
    import optuna

    if study is None or len({t.value for t in study.trials}) < 2:
        return {}
    return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def union(spaces: list[dict[str, dict]]) -> dict[str, dict]:
    """One space that holds every arm's (the widest range, every choice): arms drawn together in one plot."""
    out: dict[str, dict] = {}
    for space in spaces:
        for name, how in space.items():
            have = out.get(name)
            if have is None:
                out[name] = dict(how)
            elif "choices" in how and "choices" in have:
                have["choices"] = have["choices"] + [c for c in how["choices"] if c not in have["choices"]]
            elif "low" in how and "low" in have:
                have.update(low=min(have["low"], how["low"]), high=max(have["high"], how["high"]),
                            int=have["int"] and how["int"])
    return out


def importance_per_arm(results: list[TrialResult], spaces: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """fANOVA importance within each arm, on its own space (depth is a dimension of a pretrained arm, never of
    scratch)."""
    out = {}
    for arm in sorted({r.config.arm for r in results if r.config.searched}):
        imp = importance(search_study([r for r in results if r.config.arm == arm], spaces.get(arm, {})))
        if imp:
            out[arm] = imp
    return out
