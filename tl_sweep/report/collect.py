"""MLflow → typed rows: a sweep's child runs as :class:`~tl_sweep.contract.TrialResult`, its parent's context,
and the metric histories the plots draw. The only part of the report that reads the tracking store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tl_sweep import tracking
from tl_sweep.contract import NAMES, PREDICTIONS, Tag, TrialConfig, TrialResult, mlflow_key


@dataclass
class Sweep:
    """What a report is built from."""

    experiment: str
    parent_id: str
    params: dict[str, str]
    tags: dict[str, str]
    results: list[TrialResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the parent run's (transferability estimates among them)


def result(run) -> TrialResult:
    """A child run as a typed result (status: FAILED, EARLY_STOPPED, or MLflow's own)."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    params = dict(p, role=t.get(Tag.ROLE, "trial"), arm=p.get("arm") or p.get("weights"))
    status = "FAILED" if run.info.status == "FAILED" else (
        "EARLY_STOPPED" if t.get(Tag.EARLY_STOPPED) == "true" else run.info.status)
    epochs = t.get(Tag.EPOCHS_RUN)
    return TrialResult(TrialConfig.from_params(params), status, int(epochs) if epochs is not None else 0,
                       best_val_acc=m.get("best_val_acc"), test_acc=m.get("test_acc"),
                       trial=t.get(Tag.TRIAL_ID, ""), run_id=run.info.run_id, name=run.info.run_name,
                       error=t.get(Tag.ERROR),
                       seconds=m.get(mlflow_key("compute_seconds"), m.get("compute_seconds")),  # (before 2026-12-07)
                       retries=int(t.get(Tag.RETRIES, 0)), delayed=int(t.get(Tag.DELAYED, 0)))


def sweep(uri: str, exp_id: str, parent_id: str) -> Sweep:
    """The parent run's params and tags and one result per child run, in a stable order."""
    parent = tracking.get_run(uri, parent_id)
    results = [result(r) for r in tracking.children(uri, exp_id, parent_id)]
    # the same sweep gives the same order (and report) whatever ids its runs got: ties go by configuration
    results.sort(key=lambda r: (r.config.role, r.config.arm, r.config.unfrozen_blocks, -(r.best_val_acc or -1),
                                r.config.seed, r.config.search, repr(sorted(r.config.dims().items())), r.run_id))
    return Sweep(tracking.experiment(uri, exp_id).name, parent_id, parent.data.params, parent.data.tags, results,
                 dict(parent.data.metrics))


def predictions(uri: str, results: list[TrialResult]) -> dict[str, dict[int, int]]:
    """Each final's per-image test outcomes (run id -> test image's cache row -> 1 right, 0 wrong) from its
    ``predictions.csv`` artifact; finals logged without one (by tl-sweep before 2026-12-07) are left out."""
    import csv
    import tempfile
    from pathlib import Path

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            if not (r.config.final and r.run_id):
                continue
            (Path(tmp) / r.run_id).mkdir()
            path = tracking.download_artifact(uri, r.run_id, PREDICTIONS, Path(tmp) / r.run_id)
            if path is None:
                continue
            with open(path) as f:
                out[r.run_id] = {int(row["row"]): int(row["label"] == row["predicted"]) for row in csv.DictReader(f)
                                 if row["split"] == "test"}
    return out


def histories(uri: str, run_ids: list[str], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``metric`` per epoch for each run."""
    return {rid: [(m.step, m.value) for m in tracking.metric_history(uri, rid, metric)] for rid in run_ids}


def chance(single: str | None, by_search: str | None) -> dict[int, float]:
    """The test split's majority-class rate per search repeat (older sweeps logged one figure)."""
    import json

    if by_search:
        return {i: c for i, c in enumerate(json.loads(by_search)) if c is not None}
    return {} if single in (None, "?", "None") else {0: float(single)}


def space(params: dict[str, str], arm: str | None = None) -> dict[str, dict]:
    """How each dimension was searched (for ``arm``: with its ``study.spaces`` keys), as the sweep's resolved spec
    declared it (its parent run's params): ``{"low", "high", "log", "int"}`` for a range, ``{"choices": [...]}`` for
    a list; a constant is left out. A study's depths are its grid (``study.depths``), a categorical. A sweep
    logged before a dimension existed has no param for it: it was a constant."""
    import json

    out = {}
    for name in NAMES:
        for key in ([f"study.spaces.{arm}.{name}"] if arm else []) + [f"search.space.{name}"]:
            if f"{key}.low" in params:
                low, high = json.loads(params[f"{key}.low"]), json.loads(params[f"{key}.high"])
                out[name] = {"low": low, "high": high, "log": params.get(f"{key}.log") == "True",
                             "int": isinstance(low, int) and isinstance(high, int)}
            elif params.get(key, "").startswith("["):
                out[name] = {"choices": json.loads(params[key])}
            elif key not in params:
                continue
            break
    depths = params.get("study.depths", "")
    if depths.startswith("["):
        out["unfrozen_blocks"] = {"choices": json.loads(depths)}
    return out


def describe(s: Sweep) -> dict[str, Any]:
    """The parent's context for the report's header."""
    p, t = s.params, s.tags
    return {"arch": p.get("model.arch"), "dataset": p.get("data.dataset"), "crop": p.get("resolved.input.crop", "?"),
            "seed": p.get("seed"), **{k: t.get(f"{Tag.DATA}{k}", "?") for k in ("classes", "n_train", "n_val",
                                                                                  "n_test", "chance")},
            "fixed_splits": t.get(f"{Tag.DATA}fixed_splits"), "val_chance": t.get(f"{Tag.DATA}val_chance"),
            "chance_by_search": t.get(Tag.CHANCE_BY_SEARCH)}
