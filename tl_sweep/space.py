"""The search: spec search space → Optuna define-by-run function, the seeded searchers (the trials' schedule is
:mod:`tl_sweep.schedule`'s).

A define-by-run function (rather than a fixed Ray Tune ``param_space``) lets ranges depend on the resolved
model, e.g. ``unfrozen_blocks: {low: 0, high: max}`` becomes ``0..5`` for resnet18 and ``0..13`` for
vit_b_16. Each dimension keeps one name and one fixed set of choices, since Optuna refuses a categorical whose
values change between trials (optuna#2564). Constants are returned as a dict so they reach the trial config
too: every trial config carries every dimension, under the same names as the MLflow params.
"""

from __future__ import annotations

import copy
import math
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher as TuneSearcher
from ray.tune.search.search_generator import SearchGenerator

from tl_sweep import contract, internals, study
from tl_sweep.contract import NAMES, TrialConfig, TrialReport
# the scheduler by the name a sweep saved before it had its own module pickled it under (--resume)
from tl_sweep.schedule import Scheduler  # noqa: F401
from tl_sweep.spec import Range, Space, Spec

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "new study created" line per cell buries the progress


class DefineByRun:
    """The function OptunaSearch calls once per trial to sample ``space`` (a class: Tune pickles it).

    With ``depths``, ``unfrozen_blocks`` is not sampled but assigned round-robin by trial number, so a
    study's budget covers every depth evenly while TPE searches the other dimensions; ``extra`` constants
    (the study arm) are added to every trial.
    """

    def __init__(self, space: Space, depths: list[int] | None = None, extra: dict[str, Any] | None = None):
        self.dims = {name: getattr(space, name) for name in NAMES}
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


class OwnSearcher(TuneSearcher):
    """A searcher of tl-sweep's own: its space, metric and mode are its own (Tune's are not passed on), and its
    saved state is its attributes."""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class Searcher(OwnSearcher):
    """A seeded TPE over one search space, through Optuna's public ask-and-tell API.

    Each Tune trial is one Optuna trial: :meth:`suggest` asks Optuna for one and samples the space through it
    (define-by-run: ranges may depend on the resolved model), each report's metric is an intermediate value, and
    at its end Optuna is told how the trial really ended. A trial that ran all its epochs is COMPLETE with its
    best-epoch ``val_acc`` (the checkpoint it keeps). A trial ASHA stopped is PRUNED, not COMPLETE with a
    mid-schedule value: TPE then ranks it below complete trials by how far it got, instead of mistaking a
    half-annealed score for a final one. A trial that failed (NaN loss, out of memory, an exception) is FAIL.

    The search runs on an in-memory study, whose state Ray Tune checkpoints with the experiment (so ``--resume``
    restores exactly what the sampler knew); each ended trial is then copied into the persistent study
    ``mirror = (storage, name)``, once (its Tune trial id is a user attribute), where optuna-dashboard and
    ``optuna.load_study`` open it.
    """

    def __init__(self, space: DefineByRun, sampler: optuna.samplers.BaseSampler, mirror: tuple | None = None):
        super().__init__(metric=contract.METRIC, mode=contract.MODE)
        self.space, self.mirror = space, mirror
        self.study = optuna.create_study(sampler=sampler, pruner=optuna.pruners.NopPruner(), direction="maximize")
        self.trials: dict[str, optuna.Trial] = {}  # Tune trial id -> its Optuna trial
        self.schedules: dict[str, int] = {}  # Tune trial id -> its epochs, until it ends
        self.ended: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.trials:
            self.trials[trial_id] = self.study.ask()
        trial = self.trials[trial_id]
        constants = self.space(trial)  # samples the trial's params
        config = {**trial.params, **constants}
        self.schedules[trial_id] = int(config["epochs"])
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.trials and trial_id not in self.ended:
            trial, step = self.trials[trial_id], result["training_iteration"]
            # a trial resumed from its checkpoint reports again the steps after it: each step is told once
            if step not in self.study.get_trials(deepcopy=False)[trial.number].intermediate_values:
                trial.report(result[self.metric], step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.trials.get(trial_id)
        if trial is None or trial_id in self.ended:
            return
        report = TrialReport.of(result)
        # its schedule: kept when suggested (a state saved before: Optuna's sampled value, or the constant)
        epochs = self.schedules.pop(trial_id, None) or int(trial.params.get("epochs", self.space.dims["epochs"]))
        if error or report.trial_error:
            state, value = TrialState.FAIL, None
        elif not result or contract.stopped_early(report.epochs_run, epochs):
            state, value = TrialState.PRUNED, None
        else:
            state, value = TrialState.COMPLETE, report.best_val_acc
        try:
            self.study.tell(trial, value, state=state)
        except ValueError as e:  # a NaN value: Optuna refuses it, the trial stays unfinished for the sampler
            print(f"optuna: trial {trial_id}: {e}")
        self.ended.add(trial_id)
        if self.mirror:
            self._copy(trial_id, trial)

    def forget(self, trial_id: str) -> None:
        """A trial it gave out that Tune never ran (:meth:`StudySearcher.agree`): its Optuna trial ends FAIL, so
        the sampler neither waits on it nor counts it as a lie (``constant_liar``), and it is not mirrored."""
        trial = self.trials.pop(trial_id, None)
        self.schedules.pop(trial_id, None)
        if trial is not None and not self.study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            self.study.tell(trial, state=TrialState.FAIL)

    def _copy(self, trial_id: str, trial: optuna.Trial) -> None:
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        if not frozen.state.is_finished():
            return
        study, copied = self._mirrored()
        if trial_id in copied:
            return  # copied before a --resume
        kept = copy.deepcopy(frozen)  # with its start and end times (a dashboard's durations and timeline)
        kept.user_attrs = {**frozen.user_attrs, "tune_trial_id": trial_id}
        study.add_trial(kept)
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

    def __setstate__(self, state: dict) -> None:  # a state saved before schedules were kept: each trial's params
        self.__dict__.update({"schedules": {}, **state})

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if "_ot_study" in state:  # saved by tl-sweep <= 0.1's OptunaSearch subclass: the same study, other names
            state = {**state, "study": state["_ot_study"], "trials": state["_ot_trials"],
                     "ended": state["_completed_trials"], "space": state["_space"]}
        self.__setstate__(state)


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
    return Searcher(DefineByRun(space, depths=depths, extra=extra), sampler,
                    mirror=(storage, name) if storage is not None and name else None)


def make_searcher(s: Spec, arm: str, depths: list[int] | None = None, storage=None,
                  name: str | None = None) -> Budget:
    """A plain sweep's search: seeded TPE, ``search.num_trials`` trials, ``trials_at_once`` at a time (its Optuna
    study ``name`` in ``storage``)."""
    searcher = _tpe(s.search.space, s.search.num_trials, s.seed, depths, {"arm": arm, "seed": s.seed, "role": "trial"},
                    storage, name)
    return Budget(searcher, s.search.num_trials, s.trials_at_once)


class Budget(OwnSearcher):
    """A plain sweep's search: its TPE (``tpe``; an attribute named ``searcher`` would make Tune save this as a
    wrapper) given ``budget`` trials, at most ``max_concurrent`` at a time. It counts its trials itself, so that on
    ``--resume`` it can follow the trials Tune saved (:class:`Agreeing`): Ray's ``ConcurrencyLimiter`` and Tune's
    ``num_samples`` would count a trial Tune never had, and the sweep would end one trial short."""

    def __init__(self, tpe: Searcher, budget: int, max_concurrent: int):
        super().__init__(metric=contract.METRIC, mode=contract.MODE)
        self.tpe, self.budget, self.max_concurrent = tpe, budget, max(1, max_concurrent)
        self.issued, self.running, self.adopted = 0, set(), set()  # adopted: trials Tune had that it never gave

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if len(self.running) >= self.max_concurrent:
            return None
        if self.issued >= self.budget:
            return None if self.running else TuneSearcher.FINISHED
        config = self.tpe.suggest(trial_id)
        self.issued += 1
        self.running.add(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.tpe.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.running.discard(trial_id)
        self.tpe.on_trial_complete(trial_id, result, error)

    def done(self) -> bool:
        return not self.running and self.issued >= self.budget

    def agree(self, saved: dict[str, tuple[str, dict, dict]]) -> int:
        """A trial given out that Tune never had is given again (its Optuna trial ends FAIL); one it saw running
        that Tune saved ended is ended with Tune's last result; one Tune has that this state never gave counts.
        Returns how many it corrected."""
        n = 0
        for trial_id in [t for t in self.running if t not in saved]:
            self.running.discard(trial_id)
            self.issued -= 1
            self.tpe.forget(trial_id)
            n += 1
        for trial_id in [t for t in self.running if saved[t][0] == "TERMINATED"]:  # ended after this state was saved
            self.on_trial_complete(trial_id, saved[trial_id][2])
            n += 1
        for trial_id, (status, _, _) in saved.items():
            if trial_id in self.tpe.trials or trial_id in self.adopted:
                continue
            self.issued += 1
            self.adopted.add(trial_id)
            n += 1
            if status != "TERMINATED":  # Tune runs it (again) and tells its end
                self.running.add(trial_id)
        return n


@dataclass(eq=False)
class CellSearch:
    """One cell's search in one search repeat: its seeded TPE, how many trials it was given, how they ended."""

    index: int  # its place in the round-robin (and the order ties are kept in)
    search: int
    arm: str
    depth: int
    tpe: Searcher
    issued: int = 0
    scores: list[tuple[bool, float]] = field(default_factory=list)  # ended trials: (whole schedule, best val)

    @property
    def cell(self) -> tuple[str, int]:
        return self.arm, self.depth

    @property
    def key(self) -> study.Cell:
        """Its cell in its search repeat."""
        return study.Cell(self.search, self.arm, self.depth)

    def record(self, result: dict | None, epochs: int, error: bool) -> None:
        """An ended trial's score: whether it ran its whole schedule of ``epochs``, its best validation."""
        report = TrialReport.of(result)
        whole = not error and not contract.stopped_early(report.epochs_run, epochs)
        self.scores.append((whole, -1.0 if error or report.best_val_acc is None else float(report.best_val_acc)))

    def rank(self) -> tuple[float, float, float]:
        """Its standing at a rung (:func:`tl_sweep.study.standing`: its search trials ranked as the selection's first
        step ranks them)."""
        return study.standing(self.scores)


class StudySearcher(OwnSearcher):
    """A study's searches behind one Tune searcher: one seeded TPE per (cell, search repeat).

    ``study.allocate: grid``: each gets the same budget (``study.trials_per_cell``). Suggestions go round-robin
    over the searches that have budget left, so concurrent trials belong to different cells and each cell's TPE
    has seen its own earlier results.

    ``halving``: within each search repeat, successive halving across the pretrained cells (the scratch cell,
    the baseline every verdict needs, always gets the full budget). Every cell starts with the first rung's
    trials; when all of a rung's trials have ended, the cells are ranked on their search trials as the selection's
    first step ranks a cell's configurations (the best validation accuracy among trials that ran their whole
    schedule; ties: the second best, then the best of any trial, then the higher transferability estimate,
    ``prior``) and the best ``1/eta`` go on, at
    least one cell per source so every source keeps a verdict. A cell without an estimate (no frozen prefix)
    tied with the last cell kept goes on too: a missing estimate says nothing. The others are cut (recorded in
    :attr:`cuts`, and visible in the trials: a cut cell has fewer trials and no finals).
    """

    max_concurrent = 1_000_000  # in a state saved before it had its own limit, the ConcurrencyLimiter around it
    adopted: frozenset | set = frozenset()  # trials Tune had that this searcher never gave (:meth:`agree`)

    def __init__(self, s: Spec, cells: list[tuple[str, int]], storage=None, prefix: str = "",
                 prior: dict[tuple[str, int], float] | None = None, max_concurrent: int = 1_000_000):
        super().__init__(metric=contract.METRIC, mode=contract.MODE)
        st = s.study
        self.max_concurrent = max_concurrent  # trials running at once
        self.searches: list[CellSearch] = []
        for r in range(st.search_repeats):
            for arm, depth in cells:
                extra = {"arm": arm, "seed": s.seed + r, "role": "trial", "search": r}
                tpe = _tpe(s.space_for(arm), st.trials_per_cell, study.sampler_seed(s.seed, arm, depth, r), [depth],
                           extra, storage, f"{prefix}{arm}@k={depth}/search{r}")
                self.searches.append(CellSearch(len(self.searches), r, arm, depth, tpe))
        self.budget, self.next = st.trials_per_cell, 0
        self.owner: dict[str, CellSearch] = {}  # running trial -> its search
        self.epochs: dict[str, int] = {}  # running trial -> its schedule
        self.halving = st.allocate == "halving"
        pretrained = [c for c in self.searches if c.arm != "scratch"]
        n_cells = len({c.cell for c in pretrained})
        self.rungs = study.halving_budgets(self.budget, n_cells, st.eta, st.first_rung) if self.halving \
            else [self.budget]
        self.eta, self.prior = st.eta, dict(prior or {})
        self.rung = dict.fromkeys(range(st.search_repeats), 0)  # search repeat -> its current rung
        self.alive = {r: [c for c in pretrained if c.search == r] for r in range(st.search_repeats)}  # not cut yet
        self.cuts: list[dict] = []

    def _quota(self, c: CellSearch) -> int:
        if not self.halving or c.arm == "scratch":
            return self.budget
        return self.rungs[self.rung[c.search]] if c in self.alive[c.search] else 0

    def suggest(self, trial_id: str):
        if len(self.owner) >= self.max_concurrent:
            return None
        for _ in range(2):  # a second pass after a rung's promotion
            n = len(self.searches)
            for i in range(n):
                c = self.searches[(self.next + i) % n]
                if c.issued < self._quota(c):
                    config = c.tpe.suggest(trial_id)
                    c.issued += 1
                    self.epochs[trial_id] = int((config or {}).get("epochs", 0))
                    self.owner[trial_id], self.next = c, c.index + 1
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
            if any(len(c.scores) < self.rungs[rung] for c in alive):
                continue  # trials of this rung still running
            rank = {c: c.rank() for c in alive}
            order = sorted(alive, key=lambda c: (rank[c], self.prior.get(c.cell, -math.inf)), reverse=True)
            keep = [next(c for c in order if c.arm == arm) for arm in dict.fromkeys(c.arm for c in alive)]
            for c in order:  # every source's best cell, then the best of the rest up to 1/eta of the cells
                if len(keep) >= math.ceil(len(order) / self.eta):
                    break
                if c not in keep:
                    keep.append(c)
            last = order[max(order.index(c) for c in keep)]
            keep += [c for c in alive if c not in keep and rank[c] == rank[last]
                     and (c.cell not in self.prior or last.cell not in self.prior)]
            for c in alive:
                if c not in keep:
                    self.cuts.append({"search": r, "cell": f"{c.arm}@k={c.depth}", "after_trials": self.rungs[rung],
                                      "best_val_acc": rank[c][2], "rung": rung})
            self.alive[r], self.rung[r], moved = [c for c in alive if c in keep], rung + 1, True
        return moved

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.owner[trial_id].tpe.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            c = self.owner.pop(trial_id)
            c.tpe.on_trial_complete(trial_id, result, error)
            c.record(result, self.epochs.pop(trial_id, 0), error)

    def done(self) -> bool:
        """Every search has had its trials (or was cut) and none runs."""
        return not self.owner and all(c.issued >= self._quota(c) for c in self.searches) and not (
            self.halving and any(self.rung[r] < len(self.rungs) - 1 and self.alive[r] for r in self.rung))

    def agree(self, saved: dict[str, tuple[str, dict, dict]]) -> int:
        """Agree with the trials Tune restored (:func:`tl_sweep.internals.saved_trials`): a trial given out that
        Tune does not have is given again (its cell's count goes back, its Optuna trial ends FAIL); one this state
        saw running that Tune saved ended is ended here with Tune's last result (Tune will not report it again,
        and the search would wait on it for ever); a trial Tune has that this state never gave is counted in its
        cell (running: it is followed to its end; ended: its score counts at the rung, though its TPE never saw
        it). Returns how many trials it corrected."""
        n = 0
        for trial_id in [t for t in self.owner if t not in saved]:
            c = self.owner.pop(trial_id)
            c.issued -= 1
            self.epochs.pop(trial_id, None)
            c.tpe.forget(trial_id)
            n += 1
        for trial_id in [t for t in self.owner if saved[t][0] == "TERMINATED"]:  # ended after this state was saved:
            self.on_trial_complete(trial_id, saved[trial_id][2])  # Tune will not say so again
            n += 1
        for trial_id, (status, config, result) in saved.items():
            if trial_id in self.owner or trial_id in self.adopted or any(trial_id in c.tpe.trials
                                                                           for c in self.searches):
                continue
            tc = TrialConfig.from_tune(config)
            c = next((c for c in self.searches if c.key == study.Cell.of(tc)), None)
            if c is None:
                continue
            c.issued += 1
            self.adopted = {*self.adopted, trial_id}
            n += 1
            if status == "TERMINATED":
                c.record(result, tc.epochs, error=bool(TrialReport.of(result).trial_error))
            else:  # running, pending or errored: Tune runs it (again) and tells its end
                self.owner[trial_id], self.epochs[trial_id] = c, tc.epochs
        return n

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if "keys" in state:  # saved by an earlier tl-sweep: parallel lists indexed by search
            cells = [CellSearch(j, r, arm, depth, tpe, issued, [v if isinstance(v, tuple) else (True, v)
                                                                for v in state["scores"][j]])
                     for j, ((tpe, issued), (r, arm, depth)) in enumerate(zip(state["searches"], state["keys"]))]
            state = {**{k: v for k, v in state.items() if k not in ("keys", "scores")}, "searches": cells,
                     "owner": {t: cells[j] for t, j in state["owner"].items()},
                     "alive": {r: [cells[j] for j in sorted(js)] for r, js in state["alive"].items()}}
        self.__dict__.update(state)


def study_searcher(s: Spec, cells: list[tuple[str, int]], storage=None, prefix: str = "",
                   prior: dict[tuple[str, int], float] | None = None) -> StudySearcher:
    """A study's searcher: one Optuna study per cell and search repeat, named ``<prefix><arm>@k=<depth>/search<r>``
    in ``storage`` (optuna-dashboard opens them)."""
    return StudySearcher(s, cells, storage, prefix, prior, max_concurrent=s.trials_at_once)


class Agreeing(SearchGenerator):
    """Tune's search loop around one of tl-sweep's searchers (:class:`Budget`, :class:`StudySearcher`,
    :class:`Points`), which on ``--resume`` agrees with the trials Tune restored.

    A driver writes Tune's trials and the searcher's state to a staging folder, and a background thread copies
    them to ``storage`` one file after the other; a driver killed between the two copies leaves a pair that
    disagree. Restored from it, a searcher would never run a trial it gave out that Tune never heard of (a
    study one re-training and its cell's finals short: seen on the 2-node cluster), or give a cell a trial more
    than its budget. Here the searcher corrects its count from Tune's trials
    (:func:`tl_sweep.internals.saved_trials`), and where work is left the search is not finished, whatever the
    saved flag says. Its trials are counted by the searcher alone (``num_samples=-1``): Tune's count would
    include the lost trial.
    """

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        saved = internals.saved_trials(dirpath)
        if saved is None:
            return
        n = self.searcher.agree(saved)
        if n:
            print(f"ray: the searcher's saved state and Tune's saved trials disagreed on {n} trial(s) (the driver "
                  f"was killed while saving them); the searcher now follows Tune's trials", file=sys.stderr)
        if not self.searcher.done():  # work left: Tune asks again
            self.set_state({**self.get_state(), "finished": False})


class Points(OwnSearcher):
    """A study's re-trainings (its selection, its finals): the given configurations, each trained once, at most
    ``max_concurrent`` at a time; finished when each has been given out and none runs.

    Which were given out is Tune's own record: restored (``--resume``), it is rebuilt from the trials Tune saved
    (:func:`tl_sweep.internals.saved_trials`), so a configuration Tune never heard of is given again and one it has
    is not given twice, whichever of Tune's two files a killed driver left newer (Tune's ``BasicVariantGenerator``
    trusts its own file: a study then lost a selection re-training and the finals of its cell).
    """

    def __init__(self, configs: list[dict[str, Any]], max_concurrent: int):
        super().__init__(metric=contract.METRIC, mode=contract.MODE)
        self.configs, self.max_concurrent = [dict(c) for c in configs], max(1, max_concurrent)
        self.given: dict[str, int] = {}  # trial id -> its configuration's index
        self.running: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if len(self.running) >= self.max_concurrent:
            return None
        taken = set(self.given.values())
        left = next((i for i in range(len(self.configs)) if i not in taken), None)
        if left is None:
            return None if self.running else TuneSearcher.FINISHED
        self.given[trial_id] = left
        self.running.add(trial_id)
        return dict(self.configs[left])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.running.discard(trial_id)

    def done(self) -> bool:
        return not self.running and len(self.given) >= len(self.configs)

    def agree(self, saved: dict[str, tuple[str, dict, dict]]) -> int:
        """Rebuild what was given from Tune's restored trials; returns how many trials that changed."""
        before = dict(self.given)
        self.given, self.running = {}, set()
        free = list(range(len(self.configs)))
        for trial_id, (status, config, _) in saved.items():
            i = next((j for j in free if all(config.get(k) == v for k, v in self.configs[j].items())), None)
            if i is None:
                continue
            free.remove(i)
            self.given[trial_id] = i
            if status != "TERMINATED":  # Tune runs it (again) and tells its end
                self.running.add(trial_id)
        return len(set(before) ^ set(self.given))
