"""The search: spec search space → Optuna define-by-run function, the seeded searcher, the scheduler.

A define-by-run function (rather than a fixed Ray Tune ``param_space``) lets ranges depend on the resolved
model, e.g. ``unfrozen_blocks: {low: 0, high: max}`` becomes ``0..5`` for resnet18 and ``0..13`` for
vit_b_16. Each dimension keeps one name and one fixed set of choices, since Optuna refuses a categorical whose
values change between trials (optuna#2564). Constants are returned as a dict so they reach the trial config
too: every trial config carries every dimension, under the same names as the MLflow params.
"""

from __future__ import annotations

from typing import Any

import functools
import math
import pickle

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search import Searcher as TuneSearcher
from ray.tune.search.optuna import OptunaSearch

from tl_sweep import contract, internals
from tl_sweep.contract import DIMENSIONS, TrialReport
from tl_sweep.spec import Range, Space, Spec

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "new study created" line per cell buries the progress


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


# ------------------------------------------------------------------------------------ searcher, scheduler


class Searcher(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended, and keeps a copy of its study where
    optuna-dashboard and ``optuna.load_study`` open it.

    A trial that ran all its epochs is COMPLETE with its best-epoch ``val_acc`` (the checkpoint it keeps).
    A trial ASHA stopped is PRUNED, not COMPLETE with a mid-schedule value: TPE then ranks it below complete
    trials by how far it got, instead of mistaking a half-annealed score for a final one. A trial that
    failed deterministically (NaN loss, out of memory) is FAIL.

    The search itself runs on an in-memory study, whose state Ray Tune checkpoints with the experiment (so
    ``--resume`` restores exactly what the sampler knew); each ended trial is then copied into the persistent
    study ``mirror = (storage, name)``, once (its Tune trial id is a user attribute).
    """

    mirror: tuple | None = None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        report = TrialReport.of(result)
        if ot_trial is None or trial_id in self._completed_trials or error or not result:
            out = super().on_trial_complete(trial_id, result, error)
        elif report.trial_error:
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            out = None
        # Tune hands searchers the flattened result ("config/epochs"); a constant epochs is only there
        elif contract.stopped_early(report.epochs_run,
                                    int(result.get("config/epochs", ot_trial.params.get("epochs", 0)))):
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            out = None
        else:
            out = super().on_trial_complete(trial_id, {**result, self.metric: report.best_val_acc}, error)
        if ot_trial is not None and self.mirror:
            self._copy(trial_id, ot_trial)
        return out

    def _copy(self, trial_id: str, ot_trial) -> None:
        frozen = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
        if not frozen.state.is_finished():
            return
        study, copied = self._mirrored()
        if trial_id in copied:
            return  # copied before a --resume
        study.add_trial(optuna.trial.create_trial(
            state=frozen.state, value=frozen.value if frozen.state == TrialState.COMPLETE else None,
            params=frozen.params, distributions=frozen.distributions, intermediate_values=frozen.intermediate_values,
            user_attrs={**frozen.user_attrs, "tune_trial_id": trial_id}))
        copied.add(trial_id)

    def _mirrored(self) -> tuple[optuna.Study, set[str]]:
        """The persistent study and the Tune trial ids already in it, read once (not at every trial's end:
        reading every trial back each time made a sweep's cost grow with its square)."""
        if getattr(self, "_mirror_study", None) is None:
            storage, name = self.mirror
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
            self._mirror_study = (study, {t.user_attrs.get("tune_trial_id") for t in study.get_trials(deepcopy=False)})
        return self._mirror_study

    def __getstate__(self) -> dict:  # the experiment state keeps the sampler, not the open persistent study
        return {k: v for k, v in self.__dict__.items() if k != "_mirror_study"}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)


def optuna_storage(url: str | None):
    """An Optuna RDB storage (sqlite waits up to a minute for another sweep's write), or in-memory (None)."""
    if not url:
        return None
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                      if url.startswith("sqlite") else {})


def _tpe(space: Space, budget: int, seed: int, depths: list[int] | None, extra: dict, storage=None,
         name: str | None = None) -> Searcher:
    """Seeded TPE (``constant_liar`` so concurrent trials do not collide), its study in ``storage`` as ``name``."""
    n_startup = min(10, max(2, budget // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=n_startup)
    searcher = Searcher(space=DefineByRun(space, depths=depths, extra=extra), metric=contract.METRIC,
                        mode=contract.MODE, sampler=sampler)
    searcher.mirror = (storage, name) if storage is not None and name else None
    return searcher


def make_searcher(s: Spec, arm: str, depths: list[int] | None = None, storage=None,
                  name: str | None = None) -> ConcurrencyLimiter:
    """A plain sweep's search: seeded TPE behind a concurrency limit (its Optuna study ``name`` in ``storage``)."""
    searcher = _tpe(s.search.space, s.search.num_trials, s.seed, depths, {"arm": arm, "seed": s.seed, "role": "trial"},
                    storage, name)
    return ConcurrencyLimiter(searcher, max_concurrent=s.trials_at_once)


def cell_seed(seed: int, arm: str, depth: int, search: int) -> int:
    """The sampler seed of one cell's search repeat: independent across cells and repeats, fixed by the spec."""
    import hashlib

    return int(hashlib.sha256(f"{seed}/{arm}/{depth}/{search}".encode()).hexdigest()[:8], 16)


def halving_budgets(trials_per_cell: int, cells: int, eta: int, first: int | None = None) -> list[int]:
    """Successive halving's cumulative trials per cell at each rung, the last one the full budget.

    The first rung is ``first`` trials (default: the budget / ``eta``, at least 2); each later one ``eta`` times
    more, while more than one cell would be left to cut. On the default study a first rung of 2 of 8 trials
    (TPE's random start-up draws) ended on another depth than the grid design's in 4 of 6 (source, repeat)
    pairs, half the budget in 2 of 6 (BENCHMARKS.md)."""
    r = min(first or max(2, math.ceil(trials_per_cell / eta)), trials_per_cell)
    rungs, alive = [], cells
    while r < trials_per_cell and alive > 1:
        rungs.append(r)
        r, alive = r * eta, math.ceil(alive / eta)
    return rungs + [trials_per_cell]


class StudySearcher(TuneSearcher):
    """A study's searches behind one Tune searcher: one seeded TPE per (cell, search repeat).

    ``study.allocate: grid``: each gets the same budget (``study.trials_per_cell``). Suggestions go round-robin
    over the searches that have budget left, so concurrent trials belong to different cells and each cell's TPE
    has seen its own earlier results.

    ``halving``: within each search repeat, successive halving across the pretrained cells (the scratch cell,
    the baseline every verdict needs, always gets the full budget). Every cell starts with the first rung's
    trials; when all of a rung's trials have ended, the cells are ranked by the selection rule the finals use
    (the best validation accuracy among trials that ran their whole schedule; ties: the second best, then the
    best of any trial, then the higher transferability estimate, ``prior``) and the best ``1/eta`` go on, at
    least one cell per source so every source keeps a verdict. A cell without an estimate (no frozen prefix)
    tied with the last cell kept goes on too: a missing estimate says nothing. The others are cut (recorded in
    :attr:`cuts`, and visible in the trials: a cut cell has fewer trials and no finals).
    """

    def __init__(self, s: Spec, cells: list[tuple[str, int]], storage=None, prefix: str = "",
                 prior: dict[tuple[str, int], float] | None = None):
        super().__init__(metric=contract.METRIC, mode=contract.MODE)
        st = s.study
        self.searches = []  # [searcher, trials issued], one per (search repeat, cell)
        self.keys: list[tuple[int, str, int]] = []  # (search repeat, arm, depth) of each search
        for r in range(st.search_repeats):
            for arm, depth in cells:
                extra = {"arm": arm, "seed": s.seed + r, "role": "trial", "search": r}
                tpe = _tpe(s.search.space, st.trials_per_cell, cell_seed(s.seed, arm, depth, r), [depth], extra,
                           storage, f"{prefix}{arm}@k={depth}/search{r}")
                self.searches.append([tpe, 0])
                self.keys.append((r, arm, depth))
        self.budget, self.owner, self.next = st.trials_per_cell, {}, 0
        self.halving = st.allocate == "halving"
        pretrained = [j for j, (_, arm, _) in enumerate(self.keys) if arm != "scratch"]
        n_cells = len({(a, d) for _, a, d in (self.keys[j] for j in pretrained)})
        self.rungs = halving_budgets(self.budget, n_cells, st.eta, st.first_rung) if self.halving else [self.budget]
        self.eta, self.prior = st.eta, dict(prior or {})
        self.rung = dict.fromkeys(range(st.search_repeats), 0)
        self.alive = {r: {j for j in pretrained if self.keys[j][0] == r} for r in range(st.search_repeats)}
        self.scores: dict[int, list[tuple[bool, float]]] = {j: [] for j in range(len(self.keys))}  # ended
        # trials' (ran their whole schedule, best val)
        self.epochs: dict[str, int] = {}  # each running trial's schedule
        self.cuts: list[dict] = []

    def _quota(self, j: int) -> int:
        r, arm, _ = self.keys[j]
        if not self.halving or arm == "scratch":
            return self.budget
        return self.rungs[self.rung[r]] if j in self.alive[r] else 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # each cell's searcher has its own space, metric and mode

    def suggest(self, trial_id: str):
        for _ in range(2):  # a second pass after a rung's promotion
            n = len(self.searches)
            for i in range(n):
                j = (self.next + i) % n
                entry = self.searches[j]
                if entry[1] < self._quota(j):
                    config = entry[0].suggest(trial_id)
                    entry[1] += 1
                    self.epochs[trial_id] = int((config or {}).get("epochs", 0))
                    self.owner[trial_id], self.next = j, j + 1
                    return config
            if not (self.halving and self._promote()):
                break
        running = bool(self.owner)
        waiting = self.halving and any(self.rung[r] < len(self.rungs) - 1 and self.alive[r] for r in self.rung)
        return None if running or waiting else TuneSearcher.FINISHED

    def _promote(self) -> bool:
        """Close every rung whose trials have all ended: the best cells go on, the rest are cut."""
        moved = False
        for r, rung in self.rung.items():
            alive = self.alive[r]
            if rung >= len(self.rungs) - 1 or not alive:
                continue
            if any(len(self.scores[j]) < self.rungs[rung] for j in alive):
                continue  # trials of this rung still running
            rank = {j: self._rank(j) for j in alive}
            best = {j: rank[j][2] for j in alive}
            order = sorted(alive, key=lambda j: (rank[j], self.prior.get(self.keys[j][1:], -math.inf)),
                           reverse=True)
            keep = {next(j for j in order if self.keys[j][1] == arm) for arm in {self.keys[j][1] for j in alive}}
            for j in order:  # every source's best cell, then the best of the rest up to 1/eta of the cells
                if len(keep) >= math.ceil(len(order) / self.eta):
                    break
                keep.add(j)
            last = order[max(order.index(j) for j in keep)]
            keep |= {j for j in alive if rank[j] == rank[last] and (self.keys[j][1:] not in self.prior
                                                                    or self.keys[last][1:] not in self.prior)}
            for j in sorted(alive - keep):
                _, arm, depth = self.keys[j]
                self.cuts.append({"search": r, "cell": f"{arm}@k={depth}", "after_trials": self.rungs[rung],
                                  "best_val_acc": best[j], "rung": rung})
            self.alive[r], self.rung[r], moved = keep, rung + 1, True
        return moved

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searches[self.owner[trial_id]][0].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            j = self.owner.pop(trial_id)
            self.searches[j][0].on_trial_complete(trial_id, result, error)
            report, epochs = TrialReport.of(result), self.epochs.pop(trial_id, 0)
            score = report.best_val_acc
            whole = not error and not contract.stopped_early(report.epochs_run, epochs)
            self.scores[j].append((whole, -1.0 if error or score is None else float(score)))

    def _rank(self, j: int) -> tuple[float, float, float]:
        """A cell's standing at a rung: its best and second best validation among trials that ran their whole
        schedule (the finals' selection rule), then its best of any trial (-1: none)."""
        whole = sorted((v for done, v in self.scores[j] if done), reverse=True) + [-1.0, -1.0]
        return whole[0], whole[1], max((v for _, v in self.scores[j]), default=-1.0)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        # a state saved before scores said whether the trial ran its whole schedule: count it as having run
        self.scores = {j: [v if isinstance(v, tuple) else (True, v) for v in vs] for j, vs in self.scores.items()}


def study_searcher(s: Spec, cells: list[tuple[str, int]], storage=None, prefix: str = "",
                   prior: dict[tuple[str, int], float] | None = None) -> ConcurrencyLimiter:
    """A study's searcher: one Optuna study per cell and search repeat, named ``<prefix><arm>@k=<depth>/search<r>``
    in ``storage`` (optuna-dashboard opens them)."""
    return ConcurrencyLimiter(StudySearcher(s, cells, storage, prefix, prior),
                              max_concurrent=s.trials_at_once)


def make_scheduler(s: Spec, log=None, finals: bool = False) -> Scheduler:
    """ASHA on ``progress`` (the fraction of each trial's own schedule, in epochs of the shortest one), or FIFO
    (``scheduler.kind: fifo``, no rung before the shortest schedule ends, a study's finals); in a study, one ASHA
    per cell and search repeat. See docs/search.md."""
    if finals or not contract.rungs(s):
        return Scheduler(None, log=log)
    sch = s.scheduler
    asha = functools.partial(ASHAScheduler, time_attr="progress", metric=contract.METRIC, mode=contract.MODE,
                             max_t=contract.min_epochs(s.search.space), grace_period=sch.grace_period,
                             reduction_factor=sch.reduction_factor)
    return Scheduler(asha, per_cell=s.study is not None, log=log)


class Scheduler(FIFOScheduler):
    """Every phase's scheduler: ASHA across a plain sweep's trials, or inside each cell of a study (and each
    search repeat: a trial is compared only with trials of its own search, never across depths or arms), or
    FIFO (``make`` None).

    It also keeps a worker from taking another trial when the trial's report asks for it (its memory grew past
    its bound, or it ran out of memory: ``TrialReport.replace_worker``), and says so in one line.
    """

    def __init__(self, make=None, per_cell: bool = False, log=None):
        super().__init__()
        self.make, self.per_cell, self.cells, self.of = make, per_cell, {}, {}
        self.log, self.replaced = log, set()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        if self.make is None:
            return
        c = trial.config
        key = (c.get("arm"), c.get("unfrozen_blocks"), c.get("search", 0)) if self.per_cell else None
        if key not in self.cells:
            self.cells[key] = self.make()
        self.of[trial.trial_id] = self.cells[key]
        self.of[trial.trial_id].on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        why = TrialReport.of(result).replace_worker
        if why and trial.trial_id not in self.replaced:
            self.replaced.add(trial.trial_id)
            if internals.keep_from_reuse(tune_controller, trial) and self.log:
                self.log(f"ray: the worker of trial {trial.trial_id} takes no further trial and is replaced: {why}")
        sub = self.of.get(trial.trial_id)
        return sub.on_trial_result(tune_controller, trial, result) if sub else self.CONTINUE

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
