"""The sweep's Ray Tune callbacks, on the driver: what a person sees while it runs and what is recorded as each
trial ends.

* :class:`Plan` and :class:`Progress`: one line per finished training (its arm and cell, its result, the best so
  far in its arm, an ETA for the whole sweep across phases), and on a terminal a live bar;
* :class:`Recorder`: closes each trial's MLflow run once with its final status, counts retries, measures start-up,
  and drops Tune checkpoints that can never be published;
* :class:`StaleCheckpoints`: a trial restored by ``--resume`` continues from its newest whole checkpoint.

Tune pickles its callbacks with the experiment's state; a resumed sweep replaces them with its own
(``internals.use_callbacks``), and ``tl_sweep.runner`` keeps their names importable so that a state saved before
this module existed still unpickles.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ray import tune

from tl_sweep import contract, internals, tracking
from tl_sweep.checkpoint import TUNE_FILE
from tl_sweep.contract import Tag, TrialConfig, TrialReport
from tl_sweep.errors import one_line

log_fn = Callable[[str], None]


@dataclass
class Plan:
    """The whole sweep's trainings (every phase), for one progress display and ETA across phases.

    ``done`` starts at the trainings already finished (a resumed sweep's), so its counter and ETA go on from
    there; ``best`` is per arm: a best that pooled a source and scratch would mean nothing in a comparison."""

    total: int = 0
    done: int = 0
    at_most: bool = False
    repeats: int = 1  # a study's search repeats: lines name the repeat when there are several
    t0: float = field(default_factory=time.perf_counter)
    best: dict[str, tuple[float, str]] = field(default_factory=dict)  # arm -> (best val_acc, its trial)
    first: float | None = None  # when this process's first training ended: the rate is measured from there
    done_at_first: int = 0

    def finished(self) -> None:
        self.done += 1
        if self.first is None:
            self.first, self.done_at_first = time.perf_counter(), self.done

    def offer(self, arm: str, acc: float | None, trial: str) -> None:
        if acc is not None and (arm not in self.best or acc > self.best[arm][0]):
            self.best[arm] = (acc, trial)

    def eta(self) -> str:
        """Trainings left at this process's rate since its first training ended (the first ones also paid for
        starting the workers, which would make the first estimates several times too long); none before three
        more ended."""
        n = self.done - self.done_at_first
        if self.first is None or n < 2 or self.done >= self.total:
            return ""
        left = (time.perf_counter() - self.first) / n * (self.total - self.done)
        return f"eta ~{duration(left)}"

    def bests(self) -> str:
        """Each arm's best validation accuracy so far, in one unit (percent)."""
        return ", ".join(f"{arm} {contract.percent(acc)}" for arm, (acc, _) in self.best.items())


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress(tune.Callback):
    """The sweep's progress on stderr: one line per finished training (its arm, depth and configuration, its
    result, the best so far in its arm, the time and an ETA for the whole sweep); on a terminal, also a live bar
    (tqdm) with trainings done/total, the trials running, the elapsed time and the ETA, kept below the lines.
    Tune's own status table stays silent. Accuracy is a percentage with one decimal, as in the report."""

    def __init__(self, log: log_fn, plan: Plan, stream=None):
        self.log, self.plan = log, plan
        self.stream, self.bar = stream, None  # the bar is made on first use (Tune pickles its callbacks)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "bar": None, "stream": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "plan" not in state or not isinstance(getattr(self.plan, "best", None), dict):
            self.plan = Plan(0)  # pickled by an earlier tl-sweep: the runner hands the restored sweep its plan

    @property
    def out(self):
        return self.stream if self.stream is not None else sys.stderr

    @property
    def total(self) -> str:
        return f"≤{self.plan.total}" if self.plan.at_most else str(self.plan.total)  # halving may stop earlier

    def _bar(self):
        if self.bar is None and getattr(self.out, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=self.plan.total, initial=self.plan.done, file=self.out, dynamic_ncols=True,
                            unit="training", leave=False, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}")
        return self.bar

    def _status(self, trials, ended=None) -> None:
        if self._bar() is not None:  # the trial that just ended may still read RUNNING in Tune's list
            running = sum(t.status == "RUNNING" and t is not ended for t in trials)
            self.bar.set_postfix_str(f"{running} running · {duration(time.perf_counter() - self.plan.t0)} "
                                     f"{self.plan.eta()}".rstrip(), refresh=True)

    def _line(self, trial, how: str) -> None:
        self.plan.finished()
        r, c = TrialReport.of(trial.last_result), TrialConfig.from_tune(trial.config)
        acc = r.best_val_acc
        self.plan.offer(c.arm, acc, trial.trial_id)
        if acc is None and r.val_acc is not None:  # stopped at a rung before its first epoch ended
            got = f"val {contract.percent(r.val_acc)} at the rung"
        else:
            got = f"val {contract.percent(acc)}" if acc is not None else "no result"
        role = {"candidate": "selection ", "final": "final "}.get(c.role, "")
        repeat = f" repeat {c.search}" if self.plan.repeats > 1 else ""
        eta = f" | {self.plan.eta()}" if self.plan.eta() else ""
        best = f" | best {c.arm} {contract.percent(self.plan.best[c.arm][0])}" if c.arm in self.plan.best else ""
        line = (f"[{self.plan.done:>3}/{self.total}] {role}{c.arm} k={c.unfrozen_blocks}{repeat} · {c.optimizer} "
                f"bs={c.batch_size} lr×{c.lr_mult:.3g} ep={r.epochs_run}/{c.epochs} → {got} {how}| "
                f"{duration(time.perf_counter() - self.plan.t0)}{eta}{best} ({trial.trial_id})")
        if self._bar() is not None:
            self.bar.write(line, file=self.out)
            self.bar.update(1)
        else:
            self.log(line)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._status(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = TrialReport.of(trial.last_result)
        if r.trial_error:
            self._line(trial, f"FAILED ({r.trial_error}) ")
        else:
            stopped = contract.stopped_early(r.epochs_run, TrialConfig.from_tune(trial.config).epochs)
            self._line(trial, "(early-stopped) " if stopped else "")
        self._status(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED ")
        self._status(trials, trial)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()


class Recorder(tune.Callback):
    """Closes each trial's MLflow run with its final status (the one close call), and measures start-up from
    scheduling: the Tune step that created the trial to its first training work, actor start included."""

    def __init__(self, uri: str, study: bool, experiment_id: str, parent_run_id: str):
        self.uri, self.study, self.where = uri, study, (experiment_id, parent_run_id)
        self.added: dict[str, float] = {}  # trial id -> when Tune created it (a slot was free: it is scheduled)
        self.n_seen, self.step_began = 0, time.time()
        self.startup: dict[str, float] = {}
        self.retries: dict[str, int] = {}

    def on_step_begin(self, iteration, trials, **info):
        self.step_began = time.time()

    def on_step_end(self, iteration, trials, **info):
        # trials created in this step (Tune's list only grows): dated at the step's start, an upper bound
        for t in trials[self.n_seen:]:
            self.added[t.trial_id] = self.step_began
        self.n_seen = len(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        first, added = TrialReport.of(result).first_step_unix, self.added.pop(trial.trial_id, None)
        if first is not None and added is not None:
            self.startup[trial.trial_id] = first - added

    def _close(self, trial, failed: bool) -> None:
        r = TrialReport.of(trial.last_result)
        epochs_run = r.epochs_run
        config = TrialConfig.from_tune(trial.config)
        stopped = not failed and contract.stopped_early(epochs_run, config.epochs)
        # a checkpoint that can never be published goes now (a finished trial's Tune checkpoint holds its best
        # weights, 45 MB for a ResNet18): study search trials, stopped and failed ones
        if failed or stopped or (self.study and not config.final):
            drop_checkpoint(trial.checkpoint)
        # a trial that raised before its first report never told the driver its run: found by its trial id
        run_id = r.mlflow_run_id or tracking.trial_run_id(self.uri, *self.where, trial.trial_id)
        if not run_id:
            return
        tags = {Tag.EPOCHS_RUN: str(epochs_run), Tag.NOTE: describe(config, r, failed, stopped)}
        if stopped:
            tags[Tag.EARLY_STOPPED] = "true"
        s = self.startup.pop(trial.trial_id, None)
        tracking.close_run(self.uri, run_id, "FAILED" if failed else "FINISHED", tags,  # with the first epoch
                           {} if s is None else {contract.mlflow_key("scheduled_to_first_step_seconds"): s}, step=1)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial's worker or node was lost and Tune restarts it from its last checkpoint: counted on its run."""
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        with offline_ok(f"the retry count of trial {trial.trial_id}"):
            run_id = TrialReport.of(trial.last_result).mlflow_run_id or tracking.trial_run_id(
                self.uri, *self.where, trial.trial_id)
            if run_id:
                tracking.log_batch(self.uri, run_id, {}, {Tag.RETRIES: str(self.retries[trial.trial_id])})

    def on_trial_complete(self, iteration, trials, trial, **info):
        with offline_ok(f"the end of trial {trial.trial_id}"):
            self._close(trial, failed=bool(TrialReport.of(trial.last_result).trial_error))

    def on_trial_error(self, iteration, trials, trial, **info):
        with offline_ok(f"the end of trial {trial.trial_id}"):
            self._close(trial, failed=True)


class StaleCheckpoints(tune.Callback):
    """A trial restored by ``--resume`` continues from its newest complete checkpoint, even where Tune's saved
    state names an older one that is gone.

    Tune saves its experiment state every ≥ 10 s, and a trial's newer checkpoint replaces the older one at once
    (``num_to_keep=1``). A driver killed in between leaves a state that names a deleted folder: Tune would try
    to restore from it three times and fail the trial (ray-project/ray#27790; Ray 2.60 has no fallback). Just
    before Tune restores such a trial (``on_trial_start``), the newest complete checkpoint in the trial's folder
    takes the missing one's name, so Tune's own bookkeeping (its next checkpoint index) stays as it expects.
    With no complete checkpoint left, the trial starts over: its MLflow run keeps the epochs it logged and only
    later ones are logged (``trainable.run_trial``). Storage that is not a local or mounted folder is left as is.
    """

    def __init__(self, log: log_fn):
        self.log = log

    def on_trial_start(self, iteration, trials, trial, **info):
        result = trial.latest_checkpoint_result
        ckpt = result.checkpoint if result is not None else None
        if not on_disk(ckpt) or os.path.isdir(ckpt.path):
            return
        missing = Path(ckpt.path)
        newest = newest_complete_checkpoint(missing.parent)
        if newest is not None:
            os.rename(newest, missing)
            self.log(f"ray: trial {trial.trial_id}: Tune's saved state named {missing.name}, replaced before the "
                     f"driver stopped; continuing from the newest complete checkpoint ({newest.name})")
            return
        internals.forget_checkpoints(trial)  # nothing to restore from: Tune would fail the trial
        self.log(f"ray: trial {trial.trial_id}: no complete checkpoint is left in {missing.parent}; it starts "
                 f"over (its MLflow run keeps the epochs it logged)")


def describe(config: TrialConfig, r: TrialReport, failed: bool, stopped: bool) -> str:
    """A trial run's description (the top of its MLflow page): its result first, then what it was."""
    role = {"candidate": "Selection re-training", "final": "Final"}.get(config.role, "Search trial")
    how = ("failed" + (f": {r.trial_error}" if r.trial_error else "") if failed else
           f"stopped early by ASHA after {r.epochs_run} of {config.epochs} epochs" if stopped else
           f"ran its {config.epochs} epochs")
    got = f"**best val {contract.percent(r.best_val_acc)}**" + (
        f", **test {contract.percent(r.test_acc)}**" if r.test_acc is not None else "")
    return (f"{got} — {role} of `{config.arm}` at k = {config.unfrozen_blocks} (search repeat {config.search}, seed "
            f"{config.seed}); it {how}.")


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint_NNNNNN`` in a trial's folder whose ``trial.pt`` is whole (a worker killed while
    Ray copied it in leaves a torn zip: no end record)."""
    import zipfile

    for d in sorted(folder.glob("checkpoint_[0-9]*"), reverse=True):
        try:
            with zipfile.ZipFile(d / TUNE_FILE):
                return d
        except (OSError, zipfile.BadZipFile):
            continue
    return None


@contextmanager
def offline_ok(what: str):
    """A callback's MLflow read that an outage made impossible costs that record, never the sweep (writes wait
    in the outbox by themselves)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - an exception in a Tune callback would end the whole sweep
        print(f"mlflow: could not record {what} ({type(e).__name__}: {one_line(str(e))})", file=sys.stderr)


def drop_checkpoint(ckpt) -> None:
    """Delete a Tune checkpoint of a trial that has ended, where storage is a local or mounted folder."""
    import shutil

    if on_disk(ckpt):
        shutil.rmtree(ckpt.path, ignore_errors=True)


def on_disk(ckpt) -> bool:
    """A Tune checkpoint in a local or mounted folder (what tl-sweep may delete or rename; not s3:// and the like)."""
    return ckpt is not None and getattr(ckpt.filesystem, "type_name", "") == "local"

