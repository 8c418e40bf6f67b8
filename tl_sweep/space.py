"""The search: spec search space → Optuna define-by-run function, the seeded searcher, the scheduler.

A define-by-run function (rather than a fixed Ray Tune ``param_space``) lets ranges depend on the resolved
model, e.g. ``unfrozen_blocks: {low: 0, high: max}`` becomes ``0..5`` for resnet18 and ``0..13`` for
vit_b_16. Each dimension keeps one name and one fixed set of choices, since Optuna refuses a categorical whose
values change between trials (optuna#2564). Constants are returned as a dict so they reach the trial config
too: every trial config carries every dimension, under the same names as the MLflow params.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tl_sweep import contract
from tl_sweep.contract import DIMENSIONS
from tl_sweep.spec import Range, Space, Spec, values_of


class DefineByRun:
    """The function OptunaSearch calls once per trial to sample ``space`` (a class: Tune pickles it).

    With ``depths``, ``unfrozen_blocks`` is not sampled but assigned round-robin by trial number, so a
    study's budget covers every depth evenly while TPE searches the other dimensions; ``extra`` constants
    (the study arm) are added to every trial.
    """

    def __init__(self, space: Space, depths: list[int] | None = None, extra: dict[str, Any] | None = None):
        self.dims = {name: getattr(space, name) for name in DIMENSIONS}
        self.depths, self.extra = depths, dict(extra or {})

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        constants = dict(self.extra)
        for name, dim in self.dims.items():
            if name == "unfrozen_blocks" and self.depths:
                constants[name] = self.depths[trial.number % len(self.depths)]
                continue
            if isinstance(dim, Range):
                if dim.is_int:
                    trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
                else:
                    trial.suggest_float(name, float(dim.low), float(dim.high), log=dim.log)
            elif isinstance(dim, list):
                trial.suggest_categorical(name, dim)
            else:
                constants[name] = dim
        return constants


def depths(space: Space) -> list[int]:
    """Every ``unfrozen_blocks`` value the (resolved) space allows."""
    dim = space.unfrozen_blocks
    if isinstance(dim, Range):
        return list(range(int(dim.low), int(dim.high) + 1))
    return sorted(int(v) for v in (dim if isinstance(dim, list) else [dim]))


def searched(space: Space) -> list[str]:
    """The dimensions that are searched (not constants)."""
    return [n for n in DIMENSIONS if isinstance(getattr(space, n), (Range, list))]


# ------------------------------------------------------------------------------------ searcher, scheduler


class Searcher(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended.

    A trial that ran all its epochs is COMPLETE with its best-epoch ``val_acc`` (the checkpoint it keeps).
    A trial ASHA stopped is PRUNED, not COMPLETE with a mid-schedule value: TPE then ranks it below complete
    trials by how far it got, instead of mistaking a half-annealed score for a final one. A trial that
    failed deterministically (NaN loss, out of memory) is FAIL.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or error or not result:
            return super().on_trial_complete(trial_id, result, error)
        if result.get("trial_error"):
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return None
        # Tune hands searchers the flattened result ("config/epochs"); a constant epochs is only there
        epochs = int(result.get("config/epochs", ot_trial.params.get("epochs", 0)))
        if contract.stopped_early(int(result.get("epoch", 0)), epochs):
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, {**result, self.metric: result["best_val_acc"]}, error)


def make_searcher(s: Spec, arm: str, depths: list[int] | None = None) -> ConcurrencyLimiter:
    """Seeded TPE (``constant_liar`` so concurrent trials do not collide) behind a concurrency limit."""
    n_startup = min(10, max(2, s.search.num_trials // 3))
    sampler = optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, n_startup_trials=n_startup)
    sampler_fn = DefineByRun(s.search.space, depths=depths, extra={"arm": arm, "seed": s.seed, "role": "trial"})
    searcher = Searcher(space=sampler_fn, metric=contract.METRIC, mode=contract.MODE, sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=s.search.max_concurrent)


def min_epochs(space: Space) -> int:
    return int(min(values_of(space.epochs)))


def make_scheduler(s: Spec):
    """ASHA on ``progress`` (epochs rescaled to the shortest schedule) or FIFO; see docs/search.md."""
    sch = s.scheduler
    if sch.kind == "fifo":
        return FIFOScheduler()
    max_t = min_epochs(s.search.space)  # progress runs 0..min_epochs over every trial's own schedule
    if sch.grace_period >= max_t:
        return FIFOScheduler()  # no rung fits before the shortest schedule ends
    return ASHAScheduler(time_attr="progress", metric=contract.METRIC, mode=contract.MODE, max_t=max_t,
                         grace_period=sch.grace_period, reduction_factor=sch.reduction_factor)
