"""The trials' schedule: ASHA on ``progress`` across a plain sweep or inside each cell of a study, or FIFO; and the
rungs it stops trials at (docs/search.md)."""

from __future__ import annotations

import functools
import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from tl_sweep import contract, internals, study
from tl_sweep.contract import TrialConfig, TrialReport
from tl_sweep.spec import Spec


def rungs(s: Spec) -> tuple[float, ...]:
    """The ASHA milestones of a spec (``progress`` values), as Ray's ASHA computes them; () without ASHA."""
    sch, max_t = s.scheduler, s.min_epochs
    if sch.kind != "asha" or sch.grace_period >= max_t:
        return ()
    n = int(math.log(max_t / sch.grace_period) / math.log(sch.reduction_factor) + 1)
    return tuple(r for k in range(n) if (r := float(sch.grace_period * sch.reduction_factor ** k)) < max_t)


def make_scheduler(s: Spec, log=None, finals: bool = False) -> Scheduler:
    """ASHA on ``progress`` (the fraction of each trial's own schedule, in epochs of the shortest one), or FIFO
    (``scheduler.kind: fifo``, no rung before the shortest schedule ends, a study's finals); in a study, one ASHA
    per cell and search repeat. See docs/search.md."""
    if finals or not rungs(s):
        return Scheduler(None, log=log)
    sch = s.scheduler
    max_t = s.min_epochs
    asha = functools.partial(ASHAScheduler, time_attr="progress", metric=contract.METRIC, mode=contract.MODE,
                             max_t=max_t, grace_period=sch.grace_period, reduction_factor=sch.reduction_factor)
    if s.study is None:
        return Scheduler(asha, log=log)
    return Scheduler(asha, per_cell=True, log=log, max_t=max_t,
                     keep=(s.study.trials_per_cell, min(s.study.min_candidates, s.study.trials_per_cell)))


class Scheduler(FIFOScheduler):
    """Every phase's scheduler: ASHA across a plain sweep's trials, or inside each cell of a study (and each
    search repeat: a trial is compared only with trials of its own search, never across depths or arms), or
    FIFO (``make`` None).

    ``keep = (budget, n)`` (a study's cells): ASHA never stops a trial early where that would leave its cell
    fewer than ``n`` trials that can run their whole schedule out of its ``budget``, so every cell's selection
    has at least ``n`` full-schedule configurations to choose from (``study.min_candidates``).

    It also keeps a worker from taking another trial when the trial's report asks for it (its memory grew past
    its bound, or it ran out of memory: ``TrialReport.replace_worker``), and says so in one line.
    """

    def __init__(self, make=None, per_cell: bool = False, log=None, keep: tuple[int, int] | None = None,
                 max_t: float = math.inf):
        super().__init__()
        self.make, self.per_cell, self.cells, self.of = make, per_cell, {}, {}
        self.log, self.replaced = log, set()
        self.keep, self.max_t = keep, max_t
        self.stopped: dict[Any, int] = {}  # cell -> trials ASHA stopped before the end of their schedule
        self.key: dict[str, Any] = {}  # trial -> its cell

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        if self.make is None:
            return
        key = study.Cell.of(TrialConfig.from_tune(trial.config)) if self.per_cell else None
        if key not in self.cells:
            self.cells[key] = self.make()
        self.of[trial.trial_id], self.key[trial.trial_id] = self.cells[key], key
        self.of[trial.trial_id].on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        why = TrialReport.of(result).replace_worker
        if why and trial.trial_id not in self.replaced:
            self.replaced.add(trial.trial_id)
            if internals.keep_from_reuse(tune_controller, trial) and self.log:
                self.log(f"ray: the worker of trial {trial.trial_id} takes no further trial and is replaced: {why}")
        sub = self.of.get(trial.trial_id)
        if sub is None:
            return self.CONTINUE
        decision = sub.on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and (TrialReport.of(result).progress or 0) < self.max_t and self.keep:
            key, (budget, n) = self.key[trial.trial_id], self.keep
            if budget - self.stopped.get(key, 0) - 1 < n:  # its cell would end with fewer than n to choose from
                return self.CONTINUE
            self.stopped[key] = self.stopped.get(key, 0) + 1
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        sub = self.of.pop(trial.trial_id, None)
        if sub:
            sub.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        sub = self.of.pop(trial.trial_id, None)
        if sub:
            sub.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per cell: {len(self.cells)} cells" if self.per_cell else ("ASHA" if self.make else "FIFO")
