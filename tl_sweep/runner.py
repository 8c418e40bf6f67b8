"""The sweep, phase by phase: pre-flight, the MLflow parent run, Ray, each arm's search, a study's finals, the
close, the report.

:func:`run` reads as those phases; nothing expensive starts before every input is checked:

1. :func:`preflight`: tracking URI usable; data decoded once into the node cache; weights resolved (a
   ``source:`` model pretrained once) and the model built once on the driver, so a bad checkpoint fails
   before any trial;
2. :func:`open_sweep`: experiment and parent run created on the driver (or the latest one reopened);
3. :func:`start_ray` and the cluster checks;
4. :func:`search` per arm: ``Tuner.fit`` with Optuna TPE (seeded, ``constant_liar``) behind a concurrency
   limit, ASHA on schedule progress (or FIFO), per-trial CPU/GPU resources (fractions share a GPU);
5. :func:`retrain_finalists` (a study): the best configuration per (arm, depth), re-trained per seed and
   scored once on the test split;
6. :func:`close_sweep`: runs left RUNNING by a killed process closed, the parent run closed with the best trial;
7. the report (:mod:`tl_sweep.report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.logger import JsonLoggerCallback

from tl_sweep import cluster, cohort, contract, data, internals, limits, models, redact, sources, space, tracking, train, \
    trainable, transferability
from tl_sweep.contract import Tag, TrialConfig, TrialContext, TrialReport, TrialResult
from tl_sweep.errors import UserError
from tl_sweep.spec import Config, min_epochs, to_yaml, values_of

log_fn = Callable[[str], None]


@dataclass
class Summary:
    experiment_id: str
    parent_run_id: str
    trials: list[TrialResult] = field(default_factory=list)  # one per search trial, best first
    selection: list[TrialResult] = field(default_factory=list)  # a study's candidates re-trained on validation
    finals: list[TrialResult] = field(default_factory=list)  # a study's re-trainings scored on test
    status: str = "FINISHED"
    report: Any = None
    seconds: float = 0.0
    models: dict[str, str] = field(default_factory=dict)  # arm -> MLflow model URI of its winner
    delayed: int = 0  # writes a tracking outage delayed, delivered late by this driver
    waiting: int = 0  # writes still in this node's outbox (the server is unreachable): tl-sweep sync
    chance: dict[str, float | None] = field(default_factory=dict)  # split -> its majority-class rate

    @property
    def best(self) -> TrialResult | None:
        return self.trials[0] if self.trials else None


# ------------------------------------------------------------------------------------------- callbacks


@dataclass
class Plan:
    """The whole sweep's trainings (every phase), for one progress display and ETA across phases."""

    total: int = 0
    done: int = 0
    at_most: bool = False
    t0: float = field(default_factory=time.perf_counter)
    best: tuple[float, str] | None = None
    first: float | None = None  # when the first training ended: the rate is measured from there

    def finished(self) -> None:
        self.done += 1
        if self.first is None:
            self.first = time.perf_counter()

    def eta(self) -> str:
        """Trainings left at the rate since the first one ended (the first ones also paid for starting the
        workers, which would make the first estimates several times too long); none before three ended."""
        if self.done < 3 or self.done >= self.total:
            return ""
        left = (time.perf_counter() - self.first) / (self.done - 1) * (self.total - self.done)
        return f"eta ~{_duration(left)}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress(tune.Callback):
    """The sweep's progress on stderr: one line per finished trial (its result, the best so far, the time and an
    ETA for the whole sweep); on a terminal, also a live bar (tqdm) with trainings done/total, the trials
    running, the best so far and the ETA, kept below the lines. Tune's own status table stays silent."""

    def __init__(self, total: int, log: log_fn, at_most: bool = False, plan: Plan | None = None, stream=None):
        self.total, self.log = (f"≤{total}" if at_most else total), log  # at most: halving may stop earlier
        self.plan = plan or Plan(total, at_most=at_most)
        self.done, self.t0 = 0, self.plan.t0
        self.stream, self.bar = stream, None  # the bar is made on first use (Tune pickles its callbacks)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "bar": None, "stream": None}

    @property
    def out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _bar(self):
        if self.bar is None and getattr(self.out, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=self.plan.total, initial=self.plan.done, file=self.out, dynamic_ncols=True,
                            unit="training", leave=False, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}")
        return self.bar

    def _status(self, trials) -> None:
        if self._bar() is not None:
            running = sum(t.status == "RUNNING" for t in trials)
            best = f" · best {self.plan.best[0]:.3f}" if self.plan.best else ""
            self.bar.set_postfix_str(f"{running} running{best} · {_duration(time.perf_counter() - self.t0)} "
                                     f"{self.plan.eta()}".rstrip(), refresh=True)

    def _line(self, trial, how: str) -> None:
        self.done += 1
        self.plan.finished()
        r, c = TrialReport.of(trial.last_result), trial.config
        acc = r.best_val_acc
        if acc is not None and (self.plan.best is None or acc > self.plan.best[0]):
            self.plan.best = (acc, trial.trial_id)
        if acc is None and r.val_acc is not None:  # stopped at a rung before its first epoch ended
            got = f"{contract.METRIC} {r.val_acc:.3f} at the rung"
        else:
            got = f"{contract.METRIC} {acc:.3f}" if acc is not None else "no result"
        best = f"best {self.plan.best[0]:.3f} ({self.plan.best[1]})" if self.plan.best else ""
        eta = f" | {self.plan.eta()}" if self.plan.eta() else ""
        line = (f"[{self.done:>3}/{self.total}] {trial.trial_id} k={c.get('unfrozen_blocks')} {c.get('optimizer')} "
                f"bs={c.get('batch_size')} lr×{float(c.get('lr_mult', 0)):.3g} ep={r.epochs_run}/{c.get('epochs')} → "
                f"{got} {how}| {time.perf_counter() - self.t0:.0f}s{eta} | {best}")
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
            stopped = contract.stopped_early(r.epochs_run, trial.config.get("epochs", 0))
            self._line(trial, "(early-stopped) " if stopped else "")
        self._status(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED ")
        self._status(trials)

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
        stopped = not failed and contract.stopped_early(epochs_run, trial.config.get("epochs", 0))
        # a checkpoint that can never be published goes now (a finished trial's Tune checkpoint holds its best
        # weights, 45 MB for a ResNet18): study search trials, stopped and failed ones
        if failed or stopped or (self.study and trial.config.get("role") != "final"):
            drop_checkpoint(trial.checkpoint)
        # a trial that raised before its first report never told the driver its run: found by its trial id
        run_id = r.mlflow_run_id or tracking.trial_run_id(self.uri, *self.where, trial.trial_id)
        if not run_id:
            return
        tags = {Tag.EPOCHS_RUN: str(epochs_run)}
        if stopped:
            tags[Tag.EARLY_STOPPED] = "true"
        s = self.startup.pop(trial.trial_id, None)
        tracking.close_run(self.uri, run_id, "FAILED" if failed else "FINISHED", tags,  # with the first epoch
                           {} if s is None else {"scheduled_to_first_step_seconds": s}, step=1)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial's worker or node was lost and Tune restarts it from its last checkpoint: counted on its run."""
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        with _offline_ok(f"the retry count of trial {trial.trial_id}"):
            run_id = TrialReport.of(trial.last_result).mlflow_run_id or tracking.trial_run_id(
                self.uri, *self.where, trial.trial_id)
            if run_id:
                tracking.log_batch(self.uri, run_id, {}, {Tag.RETRIES: str(self.retries[trial.trial_id])})

    def on_trial_complete(self, iteration, trials, trial, **info):
        with _offline_ok(f"the end of trial {trial.trial_id}"):
            self._close(trial, failed=bool(TrialReport.of(trial.last_result).trial_error))

    def on_trial_error(self, iteration, trials, trial, **info):
        with _offline_ok(f"the end of trial {trial.trial_id}"):
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
        if not _on_disk(ckpt) or os.path.isdir(ckpt.path):
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


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint_NNNNNN`` in a trial's folder whose ``trial.pt`` is whole (a worker killed while
    Ray copied it in leaves a torn zip: no end record)."""
    import zipfile

    for d in sorted(folder.glob("checkpoint_[0-9]*"), reverse=True):
        try:
            with zipfile.ZipFile(d / trainable.CHECKPOINT_FILE):
                return d
        except (OSError, zipfile.BadZipFile):
            continue
    return None


@contextmanager
def _offline_ok(what: str):
    """A callback's MLflow read that an outage made impossible costs that record, never the sweep (writes wait
    in the outbox by themselves)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - an exception in a Tune callback would end the whole sweep
        print(f"mlflow: could not record {what} ({type(e).__name__}: {_plain(str(e))})", file=sys.stderr)


def drop_checkpoint(ckpt) -> None:
    """Delete a Tune checkpoint of a trial that has ended, where storage is a local or mounted folder."""
    import shutil

    if _on_disk(ckpt):
        shutil.rmtree(ckpt.path, ignore_errors=True)


def _on_disk(ckpt) -> bool:
    """A Tune checkpoint in a local or mounted folder (what tl-sweep may delete or rename; not s3:// and the like)."""
    return ckpt is not None and getattr(ckpt.filesystem, "type_name", "") == "local"


# ---------------------------------------------------------------------------------------------- phases


def preflight(cfg: Config, log: log_fn = print) -> tuple[list[data.Prepared], dict[str, tuple[str, str | None]]]:
    """Check everything a trial will touch, in the order a user would fix it; nothing is started.

    Returns the prepared data (one per search repeat of a study: its splits drawn with its own seed, where the
    dataset does not fix them) and, per arm, its weights and checkpoint file (``source:`` models pretrained).
    """
    s = cfg.spec
    sources.check(cfg)
    tracking.check(tracking.normalise_uri(s.tracking.uri))

    def prepare(seed: int, log: log_fn) -> data.Prepared:
        return data.prepare(s.data.dataset, size=cfg.input["resize"], seed=seed, split=s.data.split,
                            classes=s.data.classes, train_per_class=s.data.train_per_class, strict=s.data.strict,
                            holdout=s.data.holdout, root=s.data.root, log=log)

    prepared = prepare(s.seed, log)
    counts = prepared.counts()
    test = f"test {counts['test']} (held out)" if counts.get("test") else "no test split"
    log(f"data: {s.data.dataset} {len(prepared.classes)} classes ({', '.join(prepared.classes)}): "
        f"train {counts['train']}, val {counts['val']}, {test} at {cfg.input['crop']}px"
        f"{' - decoded cache reused' if prepared.reused else ''}")
    if s.model.head == "binary" and len(prepared.classes) != 2:
        raise UserError(f"model.head: binary needs 2 classes, the data has {len(prepared.classes)}; "
                        f"use head: linear")
    if s.study is not None and not counts.get("test"):
        raise UserError(f"data: a study evaluates its final configurations on a test split and "
                        f"{s.data.dataset} has none; add a test/ folder or a test fraction in data.split")
    arms = {}
    for arm, weights in cfg.arms.items():
        file = None
        if weights.startswith("source:"):
            file = str(sources.checkpoint(weights.removeprefix("source:"), s.model.arch, cfg.input, s.seed,
                                          use_gpu=_gpu_here(s), log=log))
        elif weights != "none" and models.torchvision_weights(s.model.arch, weights) is None:
            file = weights
        # a bad checkpoint or missing torchvision file fails here, once, before any trial
        models.build(s.model.arch, len(prepared.classes), weights=weights, weights_file=file, head=s.model.head,
                     image_size=cfg.input["crop"])
        arms[arm] = (weights, file)
    repeats = [prepared] + [prepare(s.seed + r, lambda m: None) for r in range(1, s.study.search_repeats)] \
        if s.study is not None else [prepared]
    return repeats, arms


def _gpu_here(s) -> bool:
    """Whether this process trains on its GPU (pretraining a source): ``auto`` where it has one."""
    return torch.cuda.is_available() if s.resources.gpu == "auto" else s.resources.gpu > 0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def spec_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.dump(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def resumable(cfg: Config) -> str:
    """``--resume``'s checks, made before any data is prepared or source pretrained: the latest sweep of this
    experiment, which must have run the same resolved spec and not have finished. Returns its parent run id."""
    uri = cfg.spec.tracking.uri
    tracking.check(uri)  # an unreachable server: its one line, as without --resume
    run = tracking.latest_sweep(uri, tracking.experiment_id(uri, cfg.experiment))
    if run is None:
        raise UserError(f"--resume: experiment {cfg.experiment!r} has no sweep to resume; run without --resume")
    if run.data.tags.get(Tag.SPEC_HASH) != spec_hash(cfg):
        raise UserError(f"--resume: the latest sweep of {cfg.experiment!r} ({run.info.run_id}) ran another "
                        f"spec or other --set values; resume with the same ones, or run without --resume")
    if run.info.status == "FINISHED":
        raise UserError(f"--resume: the latest sweep of {cfg.experiment!r} ({run.info.run_id}) already "
                        f"finished; run without --resume to start a new one")
    return run.info.run_id


def trial_context(cfg: Config, data_: data.Prepared, arms: dict[str, tuple[str, str | None]], *,
                  tracking_uri: str = "", experiment_id: str = "", parent_run_id: str = "", repeats: tuple = (),
                  run_tags: dict[str, str] | None = None) -> TrialContext:
    """The one place a trial's context is built: from a resolved (and planned: :func:`plan_gpus`) config."""
    s = cfg.spec
    gpu = s.resources.gpu  # "auto" where nothing planned it (estimates on the driver): its own GPU, if any
    if gpu == "auto":
        gpu = 1.0 if torch.cuda.is_available() else 0.0
    return TrialContext(
        arch=s.model.arch, arms=arms, head=s.model.head, head_hidden=s.model.head_hidden,
        head_dropout=s.model.head_dropout, regime=s.regime.model_dump(), input=cfg.input,
        augment=s.data.augment.model_dump(), data=data_, seed=s.seed, min_epochs=min_epochs(s.search.space),
        use_gpu=gpu > 0, tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        feature_cache=s.data.feature_cache, gpu_share=gpu, precision=s.resources.precision,
        memory_limit=int(s.resources.memory_gb * 2**30) if s.resources.memory_gb else None,
        checkpoint_every=s.failures.checkpoint_every,
        checkpoint_seconds=s.failures.checkpoint_seconds, rungs=space.rungs(s), repeats=tuple(repeats),
        worker_growth=s.resources.worker_growth, run_tags=dict(run_tags or {}),
        dataset=(s.data.dataset.rstrip("/").split("/")[-1], s.data.dataset),
        digests=tuple(data.split_digests(p) for p in (repeats or (data_,))),
        log_checkpoints=s.tracking.checkpoints == "all",
        keep_search_weights=s.study is None or s.tracking.checkpoints == "all")


def open_sweep(cfg: Config, repeats: list[data.Prepared], resumed: str | None, run_tags: dict[str, str],
               hashed: str) -> tuple[str, str]:
    """The experiment and the sweep's parent run: a new one, or the one :func:`resumable` found, reopened."""
    s, uri = cfg.spec, cfg.spec.tracking.uri
    exp_id = tracking.experiment_id(uri, cfg.experiment)
    if resumed:
        tracking.reopen(uri, resumed)
        return exp_id, resumed
    run_name = f"{s.name}·{s.model.arch}·{'+'.join(cfg.arms)}·{time.strftime('%Y%m%d-%H%M%S')}"
    files = {"spec.yaml": cfg.spec_text or to_yaml(cfg), "resolved.yaml": to_yaml(cfg)}
    prepared = repeats[0]
    if prepared.skipped:
        files["skipped_files.txt"] = "\n".join(prepared.skipped) + "\n"
    parent = tracking.start_parent(uri, exp_id, run_name, cfg.dump(), files, tags={
        **run_tags,
        "tl_sweep.arch": s.model.arch, "tl_sweep.arms": ",".join(cfg.arms), Tag.SPEC_HASH: hashed,
        "tl_sweep.data_fingerprint": prepared.fingerprint,
        **{f"tl_sweep.data.{k}": str(v) for k, v in data.describe(prepared).items()},
        "tl_sweep.data.chance_by_search": json.dumps([data.chance(p) for p in repeats]),
        "tl_sweep.optuna_storage": optuna_url(cfg)})
    return exp_id, parent


def start_ray(address: str | None) -> None:
    """Join (or start) the Ray cluster ``address`` resolved by :func:`tl_sweep.cluster.ray_address`."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for name, value in cluster.WORKER_ENV.items():  # for the trial workers a local Ray starts (a user's value wins)
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    # Ray says at every start that token authentication is on (its default); it stays on, said once in the docs
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                 configure_logging=True, log_to_driver=True)
        internals.end_local_monitor_at_exit()  # Ray's shutdown would wait 1 s for it
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--address: cannot join the Ray cluster at {address or 'this machine'} "
                        f"({' '.join(str(e).split())[:160]}); check the address (auto, or the head's host:6379) "
                        f"and that the cluster runs") from None


def plan_gpus(cfg: Config, prepared: data.Prepared, log: log_fn) -> Config:
    """``resources.gpu: auto``: no GPU where Ray sees none; where it sees some, trials per GPU by
    :func:`tl_sweep.limits.trials_per_gpu` (one full fine-tuning step at the space's largest batch measured on
    the driver's GPU, if it has one), and ``search.max_concurrent`` enough to fill every GPU unless the spec set
    it. Returns the config with the numbers chosen; the plan line says what and why."""
    s = cfg.spec
    if s.resources.gpu != "auto":
        return cfg
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), float(total.get("CPU", 1))
    resources, search = s.resources.model_copy(update={"gpu": 0.0}), s.search
    if gpus:
        step = memory = None
        if torch.cuda.is_available():  # the driver's own GPU measures what a trial needs
            device = torch.device("cuda")
            batch = max(values_of(s.search.space.batch_size))
            step = train.step_memory(s.model.arch, len(prepared.classes), cfg.input["crop"], int(batch),
                                     s.resources.precision, device)
            memory = torch.cuda.get_device_properties(device).total_memory
        n, why = limits.trials_per_gpu(step, memory, max(1.0, cpus - 1) / gpus, s.resources.cpu)
        resources = s.resources.model_copy(update={"gpu": math.floor(1e4 / n) / 1e4})
        if "max_concurrent" not in s.search.model_fields_set:
            search = s.search.model_copy(update={"max_concurrent": max(1, n * gpus // s.resources.cohort)})
        log(f"resources.gpu auto: {n} trials per GPU ({resources.gpu:g} GPU and {s.resources.cpu:g} CPU each), "
            f"{search.max_concurrent} at a time on {gpus} GPU{'s' if gpus > 1 else ''}: the fewest of {why}")
    return cfg.model_copy(update={"spec": s.model_copy(update={"resources": resources, "search": search})})


def check_cluster(cfg: Config) -> int:
    """Resources fit some node; on several nodes, storage, tracking and data are seen by each. Returns the node
    count."""
    s = cfg.spec
    cluster.check_resources(s.resources.cpu, s.resources.gpu)
    paths = [p for p in (s.data.dataset.removeprefix("imagefolder:") if s.data.dataset.startswith("imagefolder:")
                         else None, s.data.root) if p]
    return cluster.check_nodes(s.storage, s.tracking.uri, paths)


def _tuner(cfg: Config, ctx: TrialContext, name: str, total: int, log: log_fn, search_alg, *, scheduler=None,
           param_space: dict | None = None, resume: bool = False, at_most: bool = False,
           plan: Plan | None = None) -> tune.Tuner:
    """A Tuner for one phase (an arm's search, or a study's final re-trainings); restored when resuming."""
    s = cfg.spec
    res = {"cpu": s.resources.cpu, "gpu": s.resources.gpu}
    if ctx.memory_limit:
        res["memory"] = ctx.memory_limit  # Ray reserves what the trial may hold
    if ctx.cohorts is not None:  # a member trains in its cohort's worker, which holds the CPU and GPU
        res = {"cpu": 0, "memory": cohort.MEMBER_MEMORY}
    fn = tune.with_resources(tune.with_parameters(trainable.run_trial, ctx=ctx), res)  # its class: trainable.Worker
    path = f"{s.storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        log(f"ray: resuming {name}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        fn, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=total,
                                    # a new process per trial costs seconds of imports (and on a GPU a CUDA
                                    # context and cuDNN's autotuning); a worker whose memory grew is replaced
                                    # instead (trainable.Worker, space.Scheduler; ray#32698)
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=s.storage, verbose=0,
                                  # Tune's own record: result.json per trial (no TensorBoard or CSV, _fit)
                                  callbacks=[Progress(total, log, at_most, plan),
                                             Recorder(s.tracking.uri, s.study is not None, ctx.experiment_id,
                                                      ctx.parent_run_id),
                                             StaleCheckpoints(log), JsonLoggerCallback()],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=s.failures.max_failures)))


class Interrupted(KeyboardInterrupt):
    """The sweep stopped before its trials did (Ctrl-C); ``--resume`` continues it."""


def _results(grid) -> list[TrialResult]:
    out = []
    for r in grid:
        m = r.metrics or {}
        rep, config = TrialReport.of(m), TrialConfig.from_tune(r.config)
        failed = r.error is not None or bool(rep.trial_error)
        out.append(TrialResult(config, contract.status(failed, rep.epochs_run, config.epochs), rep.epochs_run,
                               best_val_acc=rep.best_val_acc, test_acc=rep.test_acc,
                               trial=m.get("trial_id") or (Path(r.path).name if r.path else ""),
                               run_id=rep.mlflow_run_id or "", checkpoint=r.checkpoint,
                               error=rep.trial_error or (_plain(str(r.error)) if r.error else None)))
    return out


def _plain(text: str) -> str:
    """The first line of an error without terminal colour codes (Ray colours its worker output)."""
    import re

    return (re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines() or [""])[0][:200]


def _fit(tuner: tune.Tuner) -> list[TrialResult]:
    """``tuner.fit()``, raising :class:`Interrupted` when Ctrl-C ended it early.

    Tune swallows the first SIGINT: its handler saves the experiment, ends the loop and puts the previous
    handler back. So a handler that is ours again after ``fit`` means the sweep was interrupted.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    # MLflow is the record: Tune's TensorBoard and CSV copies of every result (the TensorBoard file flushed at
    # each, ~10 ms of the driver per trial) are left out; its result.json stays (a JsonLoggerCallback). Only
    # for this fit: a Tuner the caller runs afterwards in this process keeps its default loggers.
    was = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        grid = tuner.fit()
    finally:
        if was is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = was
    if main and signal.getsignal(signal.SIGINT) is before:
        raise Interrupted("interrupted")
    if main:
        signal.signal(signal.SIGINT, before)
    return _results(grid)


def _phase_name(cfg: Config, parent: str, phase: str) -> str:
    return f"{cfg.experiment}-{parent[:8]}-{''.join(c if c.isalnum() or c in '-_' else '-' for c in phase).strip('-')}"


def optuna_url(cfg: Config) -> str:
    """Where the sweep's Optuna studies live: ``optuna.db`` beside a sqlite tracking store, else in the cache."""
    uri = cfg.spec.tracking.uri
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else data.cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def search(cfg: Config, ctx: TrialContext, parent: str, log: log_fn, resume: bool = False,
           prior: dict[tuple[str, int], float] | None = None, plan: Plan | None = None) -> list[TrialResult]:
    """A plain sweep: each arm's search in turn. A study: every cell's searches in one Tuner (equal budgets,
    one TPE and one ASHA per cell and search repeat). The Optuna studies persist in :func:`optuna_url`, named
    ``<experiment>/<parent run>/...``. Returns every search trial."""
    s = cfg.spec
    storage, prefix = space.optuna_storage(optuna_url(cfg)), f"{cfg.experiment}/{parent}/"
    how = (f"{s.search.max_concurrent} at a time, {s.resources.cpu:g} CPU / {s.resources.gpu:g} GPU each, "
           + (f"up to {s.resources.cohort} trials per worker in cohorts, " if s.resources.cohort > 1 else "")
           + f"scheduler {s.scheduler.kind}")
    if s.study is not None:
        n = cfg.trainings()[0]
        if s.study.allocate == "halving":
            pretrained = sum(arm != "scratch" for arm, _ in cfg.cells)
            budgets = space.halving_budgets(s.study.trials_per_cell, pretrained, s.study.eta, s.study.first_rung)
            log(f"ray: study search, successive halving over {pretrained} pretrained cells (trials per cell at "
                f"each rung: {budgets}, 1/{s.study.eta} of the cells go on; scratch gets all "
                f"{s.study.trials_per_cell}) × {s.study.search_repeats} search repeats, at most {n} trials, {how}")
        else:
            log(f"ray: study search: {len(cfg.cells)} cells × {s.study.search_repeats} search repeats × "
                f"{s.study.trials_per_cell} trials = {n} trials, {how} (ASHA within each cell)")
        return _fit(_tuner(cfg, ctx, _phase_name(cfg, parent, "search"), n, log,
                           space.study_searcher(s, cfg.cells, storage, prefix, prior),
                           scheduler=space.make_scheduler(s, log), resume=resume,
                           at_most=s.study.allocate == "halving", plan=plan))
    out, n = [], s.search.num_trials
    for arm in ctx.arms:
        log(f"ray: arm {arm}: {n} trials, {how}")
        tuner = _tuner(cfg, ctx, _phase_name(cfg, parent, arm), n, log,
                       space.make_searcher(s, arm, storage=storage, name=prefix + arm),
                       scheduler=space.make_scheduler(s, log), resume=resume, plan=plan)
        out += _fit(tuner)
    return out


def final_seeds(seed: int, search: int, repeats: int) -> list[int]:
    """The seeds of a search repeat's final re-trainings: the same in every arm (pairing), new per repeat."""
    return [seed + 1000 + 100 * search + i for i in range(repeats)]


def selection_seeds(seed: int, search: int, n: int) -> list[int]:
    """The seeds of a search repeat's selection re-trainings: new to the search and to the finals."""
    return [seed + 2000 + 100 * search + i for i in range(n)]


def _cell(c: TrialConfig) -> tuple[int, str, int]:
    return c.search, c.arm, c.unfrozen_blocks


def candidates(results: list[TrialResult], seed: int, n: int, seeds: int, full_budget: int | None = None
               ) -> list[TrialConfig]:
    """The declared selection rule, step one: per cell (arm, depth) and search repeat, its ``n`` best
    configurations by search validation accuracy, those that ran their whole schedule first (an early-stopped
    trial's score is mid-schedule), ties to the earlier trial; each re-trained with ``seeds`` new seeds (role
    ``candidate``: validation only). With ``full_budget`` (``study.allocate: halving``), only cells that got it:
    the others were cut."""
    count: dict[tuple, int] = {}
    for r in results:
        count[_cell(r.config)] = count.get(_cell(r.config), 0) + 1
    ranked: dict[tuple, list[TrialResult]] = {}
    for r in results:
        if r.status == "FAILED" or r.best_val_acc is None or (full_budget and count[_cell(r.config)] < full_budget):
            continue
        ranked.setdefault(_cell(r.config), []).append(r)
    out = []
    for key in sorted(ranked, key=lambda k: (k[0], str(k[1]), k[2])):
        best = sorted(ranked[key], key=lambda r: (r.status != "FINISHED", -r.best_val_acc))[:n]  # stable: ties
        out += [dataclasses.replace(r.config, seed=s, role="candidate") for r in best
                for s in selection_seeds(seed, key[0], seeds)]
    return out


def finalists(selection: list[TrialResult], seed: int, repeats: int) -> list[TrialConfig]:
    """The declared selection rule, step two: per cell and search repeat, the candidate configuration with the
    best mean validation accuracy over its selection seeds (a seed that failed counts 0), ties to the better
    search rank; one config per final seed (the same seeds in every arm)."""
    scores: dict[tuple, dict[tuple, list[float]]] = {}
    order: dict[tuple, TrialConfig] = {}
    for r in selection:
        key = tuple(sorted(r.config.dims().items()))
        scores.setdefault(_cell(r.config), {}).setdefault(key, []).append(
            0.0 if r.status == "FAILED" or r.best_val_acc is None else r.best_val_acc)
        order.setdefault(key + _cell(r.config), r.config)
    out = []
    for cell in sorted(scores, key=lambda k: (k[0], str(k[1]), k[2])):
        means = {k: sum(v) / len(v) for k, v in scores[cell].items()}  # in search-rank order (dicts keep it)
        chosen = order[max(means, key=means.get) + cell]
        out += [dataclasses.replace(chosen, seed=s, role="final") for s in final_seeds(seed, cell[0], repeats)]
    return out


def _retrain(cfg: Config, ctx: TrialContext, parent: str, phase: str, configs: list[TrialConfig], log: log_fn,
             resume: bool, plan: Plan | None = None) -> list[TrialResult]:
    """A phase that re-trains given configurations (a study's selection, its finals): one Tuner over them."""
    s = cfg.spec
    points = BasicVariantGenerator(points_to_evaluate=[c.to_tune() for c in configs],
                                   max_concurrent=s.trials_at_once)
    keys = {k: None for k in configs[0].to_tune()} if configs else {}  # the points fill every key in
    return _fit(_tuner(cfg, ctx, _phase_name(cfg, parent, phase), len(configs), log, points, param_space=keys,
                       scheduler=space.make_scheduler(s, log, finals=True), resume=resume, plan=plan))


def select(cfg: Config, ctx: TrialContext, parent: str, trials: list[TrialResult], log: log_fn,
           resume: bool = False, plan: Plan | None = None) -> list[TrialResult]:
    """A study's selection: each cell's best configurations re-trained with new seeds, on validation only."""
    st = cfg.spec.study
    configs = candidates(trials, cfg.spec.seed, st.candidates, st.selection_seeds,
                         st.trials_per_cell if st.allocate == "halving" else None)
    log(f"ray: selection: {len(configs)} re-trainings (each cell's {st.candidates} best configurations × "
        f"{st.selection_seeds} new seeds, validation only; the best mean is the cell's choice)")
    return _retrain(cfg, ctx, parent, "select", configs, log, resume, plan)


def retrain_finalists(cfg: Config, ctx: TrialContext, parent: str, selection: list[TrialResult], log: log_fn,
                      resume: bool = False, plan: Plan | None = None) -> list[TrialResult]:
    s = cfg.spec
    configs = finalists(selection, s.seed, s.study.repeats)
    log(f"ray: final evaluation: {len(configs)} re-trainings (the chosen configuration of each cell and search "
        f"repeat × {s.study.repeats} seeds, the same seeds in every arm), each scored once on the test split")
    return _retrain(cfg, ctx, parent, "final", configs, log, resume, plan)


def close_sweep(summary: Summary, uri: str, resume: bool, log: log_fn) -> None:
    """Deliver what a tracking outage held back, close runs a killed process left open and the parent run,
    with the best trial's figures."""
    exp_id, parent = summary.experiment_id, summary.parent_run_id
    online = tracking.reachable(uri)
    if online:  # this node's outbox: trials' and the Recorder's queued writes
        summary.delayed, _ = tracking.sync(uri)
        if summary.delayed:
            log(f"mlflow: {summary.delayed} writes held back by a tracking outage were delivered now")
    if summary.status != "KILLED" and online:  # a resumed sweep reopens its unfinished runs itself
        if resume:  # trials a killed driver started after its last saved state: the search never saw them
            known = {r.trial for r in summary.trials + summary.selection + summary.finals}
            n_gone = tracking.retire_unknown(uri, exp_id, parent, known)
            if n_gone:
                log(f"mlflow: {n_gone} unfinished runs of trials started after the killed driver's last "
                    f"saved state were deleted (restorable: mlflow runs restore)")
        tracking.close_orphans(uri, exp_id, parent)
    best = summary.best
    metrics = {"best_val_acc": best.best_val_acc} if best and best.best_val_acc is not None else {}
    metrics.update(n_trials=len(summary.trials), n_selection=len(summary.selection), n_final=len(summary.finals),
                   sweep_seconds=summary.seconds)
    tags = {"tl_sweep.best_trial": best.trial, "tl_sweep.best.arm": best.config.arm} if best else {}
    if best:
        tags.update({f"tl_sweep.best.{k}": str(v) for k, v in best.config.dims().items()})
    tracking.finish_parent(uri, parent, metrics, tags, summary.status)
    summary.waiting = tracking.waiting(uri)
    if summary.waiting:
        log(f"mlflow: {redact.uri(uri)} is unreachable: {summary.waiting} writes wait in this node's outbox "
            f"({tracking.Outbox(uri).dir}); nothing is lost. When the server is back: tl-sweep sync "
            f"--tracking-uri {redact.uri(uri)}, then tl-sweep report --run {parent}")


def run(cfg: Config, *, address: str | None = None, log: log_fn = print, report_dir: str | None = None,
        resume: bool = False) -> Summary:
    """Run the sweep (or study) that ``cfg`` describes; returns the trials, best first.

    With ``resume``, the latest sweep of the experiment (same resolved spec) continues: its parent run is
    reused and each phase's Tuner is restored from storage with the searcher's state.
    """
    t0 = time.perf_counter()
    uri = tracking.normalise_uri(cfg.spec.tracking.uri)  # a password moves to MLflow's own variables
    cfg = cfg.model_copy(update={"spec": cfg.spec.model_copy(
        update={"tracking": cfg.spec.tracking.model_copy(update={"uri": uri})})})
    tracking.check(uri)  # the quick refusals first: tracking, --resume, the Ray address
    resumed = resumable(cfg) if resume else None
    address = cluster.ray_address(address)
    repeats, arms = preflight(cfg, log)  # data decoded, sources pretrained, weights loaded once
    hashed = spec_hash(cfg)  # of the spec as written (resources.gpu: auto, not what auto chose here)
    start_ray(address)
    cfg = plan_gpus(cfg, repeats[0], log)
    s = cfg.spec
    nodes = check_cluster(cfg)  # a refusal here still comes before any MLflow run
    search_n, select_n, final_n = cfg.trainings()
    most = "at most " if s.study is not None and s.study.allocate == "halving" else ""
    plan = Plan(search_n + select_n + final_n, at_most=bool(most))
    log(f"plan: {most}{search_n} search trials"
        + (f" + {most}{select_n} selection re-trainings + {most}{final_n} final re-trainings" if s.study else "")
        + f" = {most}{search_n + select_n + final_n} trainings")
    run_tags = tracking.source_tags(cfg.spec_file)
    exp_id, parent = open_sweep(cfg, repeats, resumed, run_tags, hashed)
    log(f"mlflow: experiment {cfg.experiment!r} ({exp_id}), parent run {parent} in {uri}"
        + (" (resumed)" if resume else ""))
    summary = Summary(exp_id, parent, chance={k: data.chance(repeats[0], k) for k in ("val", "test")})
    ctx = trial_context(cfg, repeats[0], arms, tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent,
                        repeats=tuple(repeats), run_tags=run_tags)
    if nodes > 1:  # checkpoint files travel with the context: other nodes have no source cache
        ctx = dataclasses.replace(ctx, blobs={arm: Path(f).read_bytes() for arm, (_, f) in ctx.arms.items() if f})
    monitors = []
    try:  # from here on, whatever happens closes the parent run with its status
        if s.study is None and s.tracking.log_models and not ctx.log_checkpoints:  # only the best trial's weights
            ctx = dataclasses.replace(ctx, leader=ray.remote(num_cpus=0)(contract.Leader).remote())
        if s.resources.cohort > 1:
            ctx = dataclasses.replace(ctx, cohorts=start_cohorts(cfg, ctx))
        monitors = cluster.system_metrics(uri, parent) if s.tracking.system_metrics else []
        prior: dict[tuple[str, int], float] = {}  # LogME per cell: the halving's tie-break at its first rung
        if not resume:
            tracking.log_datasets(uri, parent, *ctx.dataset, ctx.digests[0])
            if s.study is not None and s.study.estimates:  # before any training: a prediction the report checks
                est = transferability.estimate(cfg, repeats[0], arms, log)
                tracking.log_estimates(uri, exp_id, parent, transferability.metrics_of(est),
                                       transferability.table(est), {})
                prior = {(e.arm, e.depth): e.values["logme"] for e in est if "logme" in e.values}
        summary.trials = search(cfg, ctx, parent, log, resume, prior, plan)
        summary.trials.sort(key=lambda r: -(r.best_val_acc if r.best_val_acc is not None else -1.0))
        if s.study is not None:
            plan.done = len(summary.trials)  # a halving search ran fewer than its plan
            plan.total = plan.done + sum(cfg.trainings()[1:])
            summary.selection = select(cfg, ctx, parent, summary.trials, log, resume, plan)
            summary.finals = retrain_finalists(cfg, ctx, parent, summary.selection, log, resume, plan)
        everything = summary.trials + summary.selection + summary.finals
        if everything and all(r.status == "FAILED" for r in everything):
            summary.status = "FAILED"
    except KeyboardInterrupt:
        summary.status = "KILLED"
        raise Interrupted(f"interrupted; finished trials are in MLflow (parent run {parent}); continue with "
                          f"--resume") from None
    except BaseException:
        summary.status = "FAILED"
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        cluster.stop_system_metrics(monitors)
        if ctx.cohorts is not None:  # its workers (its own actors) go with it, and give back their CPUs
            ray.kill(ctx.cohorts)
        close_sweep(summary, uri, resume, log)
    if summary.status != "KILLED" and not summary.waiting:
        from tl_sweep import report

        summary.report = report.build(uri, exp_id, parent, out_dir=report_dir, log=log)
        if s.tracking.log_models:
            try:
                summary.models = publish(cfg, summary, repeats, arms, log)
            except Exception as e:  # noqa: BLE001 - every trial and the report are in MLflow already
                log(f"mlflow: the winners could not be logged as models ({type(e).__name__}: "
                    f"{_plain(str(e))}); the sweep's runs and report are complete")
        for r in summary.trials + summary.selection + summary.finals:  # published or not wanted: Tune's copies go
            drop_checkpoint(r.checkpoint)
    return summary


def start_cohorts(cfg: Config, ctx: TrialContext):
    """``resources.cohort > 1``: the sweep's cohort registry, its workers placed before any trial starts."""
    s = cfg.spec
    registry = ray.remote(num_cpus=0)(cohort.Registry).remote(ctx, s.resources.cohort, s.resources.cpu,
                                                               s.resources.gpu, s.search.max_concurrent)
    try:  # the workers hold their resources before any trial starts
        ray.get(registry.ready.remote(), timeout=300)
    except ray.exceptions.GetTimeoutError:
        need = (cohort.WORKER_MEMORY + s.resources.cohort * cohort.FIT_MEMORY) / 2**30
        raise UserError(f"resources.cohort: {s.search.max_concurrent} cohort workers ({s.resources.cpu:g} CPU, "
                        f"{s.resources.gpu:g} GPU, {need:.1f} GiB of memory each) could not start in 5 minutes; "
                        f"lower search.max_concurrent or resources.cohort") from None
    return registry


def publish(cfg: Config, summary: Summary, repeats: list[data.Prepared], arms: dict[str, tuple[str, str | None]],
            log: log_fn) -> dict[str, str]:
    """The winner as an MLflow Model: per arm in a study (its chosen cell's best final by validation), the best
    trial of a plain sweep; the overall winner registered under ``tracking.register_as`` with the alias
    ``champion`` and its lineage. Returns arm -> model URI."""
    import shutil
    import tempfile

    from tl_sweep.report import stats

    s, uri = cfg.spec, cfg.spec.tracking.uri
    picks: dict[str, TrialResult] = {}
    a = summary.report.analysis if summary.report else None
    if s.study is not None and a is not None:
        for arm, cell in stats.winners(a).items():
            mine = [r for r in summary.finals if (r.config.arm, r.config.unfrozen_blocks, r.config.search)
                    == (arm, cell.depth, cell.search) and r.best_val_acc is not None and r.run_id]
            if mine:
                picks[arm] = max(mine, key=lambda r: (r.best_val_acc, -r.config.seed))
    else:  # a plain sweep: the best trial that ran its whole schedule (of equals, the first to finish kept its
        # weights: contract.Leader)
        done = [r for r in summary.trials if r.status == "FINISHED" and r.best_val_acc is not None and r.run_id
                and r.checkpoint is not None]
        if done:
            best = max(done, key=lambda r: r.best_val_acc)
            picks[best.config.arm] = best
    uris = {}
    with tempfile.TemporaryDirectory() as tmp:
        x, _, rows = repeats[0].split("train")
        example = np.ascontiguousarray(x[np.sort(rows[:2])].transpose(0, 2, 3, 1))  # two real images, H×W×3 uint8
        for arm, r in picks.items():
            if r.checkpoint is None:
                continue
            with r.checkpoint.as_directory() as d:  # the best epoch's weights, from Tune's storage
                path = Path(tmp) / f"{len(uris)}" / "best.pt"
                path.parent.mkdir()
                shutil.copy(Path(d) / trainable.CHECKPOINT_FILE, path)
            tracking.log_files(uri, r.run_id, [path])
            name = model_name(cfg.experiment, arm, r.config.unfrozen_blocks)
            uris[arm] = tracking.log_model(uri, r.run_id, path, example, name=name)
            torch_uri = tracking.log_torch_model(uri, r.run_id, path, name=f"{name}-torch")
            # the Models page compares logged models on the metrics linked to them
            tracking.link_metrics(uri, r.run_id, [uris[arm], torch_uri], ["best_val_acc", "test_acc"])
            log(f"mlflow: {arm}: model {uris[arm]} (run {r.run_id}, k={r.config.unfrozen_blocks}, "
                f"seed {r.config.seed})")
    if s.tracking.register_as and uris:
        winners = stats.winners(a) if a is not None and s.study is not None else {}
        champion = max(uris, key=lambda arm: winners[arm].val) if winners else next(iter(uris))
        why = _below_chance(summary, winners.get(champion), a)
        if why and not s.tracking.register_below_chance:
            log(f"mlflow: {champion}'s winner is logged as a model but not registered as {s.tracking.register_as}: "
                f"{why}; --set tracking.register_below_chance=true registers it anyway")
            return uris
        weights, file = arms[champion]
        tags = {"source_weights": weights if file is None else f"sha256:{_sha256(file)}", "arm": champion,
                "data_fingerprint": repeats[0].fingerprint, "spec_hash": spec_hash(cfg),
                "parent_run_id": summary.parent_run_id}
        if a is not None and a.stability(champion):
            tags["ntg_verdict"] = "; ".join(f"{k} in {v} of {len(a.searches)}"
                                            for k, v in a.stability(champion).items())
        version = tracking.register(uri, uris[champion], s.tracking.register_as, tags)
        log(f"mlflow: registered {champion} as models:/{s.tracking.register_as}@champion (version {version})")
    return uris


def model_name(experiment: str, arm: str, depth: int) -> str:
    """A logged model's name: the sweep, the arm and the depth it was trained at (``freeze-depth-mnist-5k-k5``)."""
    raw = f"{experiment}-{arm.removeprefix('source:')}-k{depth}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip("-")[:100]


def _below_chance(summary: Summary, cell, a) -> str | None:
    """Why the winner is not above the majority-class rate (a study: its cell's finals on test, Holm-corrected;
    a plain sweep: its validation accuracy, exact binomial test over the trials it is the best of); ``None``
    when it is above it."""
    from tl_sweep.report import stats

    if cell is not None:
        if cell.above_chance:
            return None
        mean, rate = cell.test[0] if cell.test else float("nan"), a.chance.get(cell.search, float("nan"))
        return (f"its finals' test accuracy {100 * mean:.1f}% is not shown above the test split's majority-class "
                f"rate {100 * rate:.1f}% (one-sided t-test, Holm p {cell.p_chance:.2g})")
    best = summary.report.best_chance if summary.report else None
    if best is None or best[2] < stats.ALPHA:
        return None
    acc, rate, p, tries = best
    return (f"its validation accuracy {100 * acc:.1f}% is not above the validation split's majority-class rate "
            f"{100 * rate:.1f}% (exact one-sided binomial p {p:.2g}, over the {tries} trials it is the best of)")


def table(results: list[TrialResult], limit: int = 8) -> str:
    """The best trials as an aligned text table."""
    cols = ["trial", "arm", "unfrozen_blocks", "optimizer", "batch_size", "lr_mult", "epochs", "best_val_acc",
            "status"]
    heads = ["trial", "arm", "k", "optimizer", "bs", "lr_mult", "epochs", "best val_acc", "status"]
    fmt = lambda c, v: f"{v:.4f}" if c == "best_val_acc" and v is not None else (  # noqa: E731
        f"{v:.3g}" if isinstance(v, float) else str(v))
    body = [[fmt(c, r.row().get(c)) for c in cols] for r in results[:limit]]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(heads)] + [line(b) for b in body])
