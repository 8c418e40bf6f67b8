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
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.logger import JsonLoggerCallback

from tl_sweep import cluster, cohort, contract, data, internals, limits, models, publish, redact, schedule, sources, \
    space, study, tracking, train, trainable, transferability
# the callbacks by the names a sweep saved before they had their own module pickled them under (--resume)
from tl_sweep.callbacks import Plan, Progress, Recorder, StaleCheckpoints, drop_checkpoint  # noqa: F401
from tl_sweep.contract import Tag, TrialConfig, TrialContext, TrialReport, TrialResult
from tl_sweep.errors import UserError, one_line
from tl_sweep.spec import Config, to_yaml, values_of

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


# ---------------------------------------------------------------------------------------------- phases


def preflight(cfg: Config, log: log_fn = print) -> tuple[list[data.Prepared], dict[str, tuple[str, str | None]]]:
    """Check everything a trial will touch, in the order a user would fix it; nothing is started.

    Returns the prepared data (one per search repeat of a study: its splits drawn with its own seed, where the
    dataset does not fix them) and, per arm, its weights and checkpoint file (``source:`` models pretrained).
    """
    s = cfg.spec
    sources.check(cfg)

    def prepare(seed: int, log: log_fn) -> data.Prepared:
        return data.prepare(s.data.dataset, size=cfg.input["resize"], seed=seed, split=s.data.split,
                            classes=s.data.classes, train_per_class=s.data.train_per_class, strict=s.data.strict,
                            holdout=s.data.holdout, root=s.data.root, exclude=tuple(s.data.exclude), log=log)

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
                                          use_gpu=_gpu_here(s), log=log, own=sources.defined(s)))
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


def resumable(cfg: Config) -> str:
    """``--resume``'s checks, made before any data is prepared or source pretrained: the latest sweep of this
    experiment, which must have run the same resolved spec and not have finished. Returns its parent run id."""
    uri = cfg.spec.tracking.uri
    run = tracking.latest_sweep(uri, tracking.experiment_id(uri, cfg.experiment))
    if run is None:
        raise UserError(f"--resume: experiment {cfg.experiment!r} has no sweep to resume; run without --resume")
    changed = cfg.differences(run.data.params)  # a key a later tl-sweep added is at its default in the old sweep
    if changed:
        raise UserError(f"--resume: the latest sweep of {cfg.experiment!r} ({run.info.run_id}) ran another "
                        f"spec or other --set values ({changed[0]}); resume with the same ones, or run without "
                        f"--resume")
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
        augment=s.data.augment.model_dump(), data=data_, seed=s.seed, min_epochs=s.min_epochs,
        use_gpu=gpu > 0, tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        feature_cache=s.data.feature_cache, gpu_share=gpu, precision=s.resources.precision,
        memory_limit=int(s.resources.memory_gb * 2**30) if s.resources.memory_gb else None,
        checkpoint_every=s.failures.checkpoint_every,
        checkpoint_seconds=s.failures.checkpoint_seconds, rungs=schedule.rungs(s), repeats=tuple(repeats),
        worker_growth=s.resources.worker_growth, run_tags=dict(run_tags or {}),
        dataset=(s.data.dataset.rstrip("/").split("/")[-1], s.data.dataset),
        digests=tuple(data.split_digests(p) for p in (repeats or (data_,))),
        log_checkpoints=s.tracking.checkpoints == "all",
        keep_search_weights=s.study is None or s.tracking.checkpoints == "all")


def open_sweep(cfg: Config, repeats: list[data.Prepared], resumed: str | None, run_tags: dict[str, str],
               hashed: str, within: str | None = None) -> tuple[str, str]:
    """The experiment and the sweep's parent run: a new one, or the one :func:`resumable` found, reopened. A
    transfer matrix's part (``within``: the matrix's run) is a run nested under the matrix's, one per target."""
    s, uri = cfg.spec, cfg.spec.tracking.uri
    exp_id = tracking.experiment_id(uri, cfg.experiment)
    if resumed:
        tracking.reopen(uri, resumed)
        return exp_id, resumed
    run_name = f"{s.name}·{s.model.arch}·{'+'.join(cfg.arms)}·{time.strftime('%Y%m%d-%H%M%S')}"
    if within:
        run_name = f"{cfg.target}·{s.model.arch}·{'+'.join(cfg.arms)}"
        run_tags = {**run_tags, Tag.PARENT: within, Tag.ROLE: "target", Tag.TARGET: cfg.target, Tag.PART: cfg.part}
    files = {"spec.yaml": cfg.spec_text or to_yaml(cfg), "resolved.yaml": to_yaml(cfg)}
    prepared = repeats[0]
    if prepared.skipped:
        files["skipped_files.txt"] = "\n".join(prepared.skipped) + "\n"
    parent = tracking.start_parent(uri, exp_id, run_name, cfg.params(), files, tags={
        **run_tags,
        Tag.ARCH: s.model.arch, Tag.ARMS: ",".join(cfg.arms), Tag.SPEC_HASH: hashed,
        Tag.DATA_FINGERPRINT: prepared.fingerprint,
        **{f"{Tag.DATA}{k}": str(v) for k, v in data.describe(prepared).items()},
        Tag.CHANCE_BY_SEARCH: json.dumps([data.chance(p) for p in repeats]),
        Tag.OPTUNA_STORAGE: optuna_url(cfg)})
    return exp_id, parent


def settle(uri: str, exp_id: str, parent: str, results: list[TrialResult]) -> int:
    """Close every run of an ended trial as Tune knows it ended (FINISHED, with its early stop; or FAILED) where
    MLflow says otherwise: a driver killed between a trial's end and the Recorder's close left it RUNNING (and
    a Ctrl-C, KILLED), and Tune restores such a trial as ended, so no callback closes it again. Returns how
    many runs it set right."""
    status = {r.info.run_id: r.info.status for r in tracking.children(uri, exp_id, parent)}
    n = 0
    for r in results:
        want = "FAILED" if r.status == "FAILED" else "FINISHED"
        if r.run_id and status.get(r.run_id) not in (None, want):
            tags = {Tag.EPOCHS_RUN: str(r.epochs_run), **({Tag.EARLY_STOPPED: "true"} if r.status == "EARLY_STOPPED"
                                                          else {})}
            tracking.close_run(uri, r.run_id, want, tags, correct=True)
            n += 1
    return n


def finished_so_far(uri: str, exp_id: str, parent: str) -> tuple[int, int, dict[str, tuple[float, str]]]:
    """A resumed sweep's trainings that had ended (FINISHED or FAILED runs), how many of them were a study's
    re-trainings (selection and finals: the search phase's count does not hold them), and each arm's best validation
    accuracy among them."""
    n, retrained, best = 0, 0, {}
    for run in tracking.children(uri, exp_id, parent):
        if run.info.status not in ("FINISHED", "FAILED"):
            continue
        n += 1
        c = TrialConfig.from_params(run.data.params)
        retrained += not c.searched
        acc = run.data.metrics.get("best_val_acc")
        if acc is not None and (c.arm not in best or acc > best[c.arm][0]):
            best[c.arm] = (acc, run.data.tags.get(Tag.TRIAL_ID, ""))
    return n, retrained, best


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
    # on Ctrl-C Tune prints its own advice (Tuner.restore(path=...)) beside tl-sweep's (--resume): only ours
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
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
            batch = max(b for sp in s.spaces() for b in values_of(sp.batch_size))
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
    return cluster.check_nodes(s.storage, cfg.tracking_store, paths)


def _tuner(cfg: Config, ctx: TrialContext, name: str, total: int, log: log_fn, search_alg, plan: Plan | None, *,
           scheduler=None, resume: bool = False) -> tune.Tuner:
    """A Tuner for one phase (an arm's search, or a study's final re-trainings); restored when resuming, with this
    process's callbacks. The searcher alone says when the phase is done: it counts its trials itself and on
    ``--resume`` agrees with the trials Tune saved (:class:`tl_sweep.space.Agreeing`); Tune's count could not."""
    s = cfg.spec
    res = {"cpu": s.resources.cpu, "gpu": s.resources.gpu}
    if ctx.memory_limit:
        res["memory"] = ctx.memory_limit  # Ray reserves what the trial may hold
    if ctx.cohorts is not None:  # a member trains in its cohort's worker, which holds the CPU and GPU
        res = {"cpu": 0, "memory": cohort.MEMBER_MEMORY}
    fn = tune.with_resources(tune.with_parameters(trainable.run_trial, ctx=ctx), res)  # its class: trainable.Worker
    path = f"{s.storage.rstrip('/')}/{name}"
    callbacks = [Progress(log, plan if plan is not None else Plan(total)),
                 Recorder(s.tracking.uri, s.study is not None, ctx.experiment_id, ctx.parent_run_id),
                 StaleCheckpoints(log), JsonLoggerCallback()]
    if resume and tune.Tuner.can_restore(path):
        log(f"ray: resuming {name}: finished trials are kept, unfinished ones continue from their checkpoints")
        tuner = tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=True)
        internals.use_callbacks(tuner, callbacks)
        return tuner
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=space.Agreeing(search_alg), scheduler=scheduler, num_samples=-1,
                                    # a new process per trial costs seconds of imports (and on a GPU a CUDA
                                    # context and cuDNN's autotuning); a worker whose memory grew is replaced
                                    # instead (trainable.Worker, schedule.Scheduler; ray#32698)
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=s.storage, verbose=0,
                                  # Tune's own record: result.json per trial (no TensorBoard or CSV, _fit)
                                  callbacks=callbacks,
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
                               error=rep.trial_error or (one_line(str(r.error)) if r.error else None)))
    return out


def _fit(tuner: tune.Tuner, at_once: int) -> list[TrialResult]:
    """``tuner.fit()``, raising :class:`Interrupted` when Ctrl-C ended it early.

    Tune swallows the first SIGINT: its handler saves the experiment, ends the loop and puts the previous
    handler back. So a handler that is ours again after ``fit`` means the sweep was interrupted.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    # Only for this fit (a Tuner the caller runs afterwards in this process keeps Tune's defaults):
    # MLflow is the record: Tune's TensorBoard and CSV copies of every result (the TensorBoard file flushed at
    # each, ~10 ms of the driver per trial) are left out; its result.json stays (a JsonLoggerCallback).
    # Tune keeps one trial waiting for resources at a time behind a searcher that is not its ConcurrencyLimiter
    # (tl-sweep's count their trials themselves, space.Agreeing): as many as run at once, as the limiter had it
    # (Tune's documented variable; a value the user set wins).
    env = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
           "TUNE_MAX_PENDING_TRIALS_PG": os.environ.get("TUNE_MAX_PENDING_TRIALS_PG", str(at_once))}
    was = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        grid = tuner.fit()
    finally:
        for k, v in was.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
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
            budgets = study.halving_budgets(s.study.trials_per_cell, pretrained, s.study.eta, s.study.first_rung)
            log(f"ray: study search, successive halving over {pretrained} pretrained cells (trials per cell at "
                f"each rung: {budgets}, 1/{s.study.eta} of the cells go on; scratch gets all "
                f"{s.study.trials_per_cell}) × {s.study.search_repeats} search repeats, at most {n} trials, {how}")
        else:
            log(f"ray: study search: {len(cfg.cells)} cells × {s.study.search_repeats} search repeats × "
                f"{s.study.trials_per_cell} trials = {n} trials, {how} (ASHA within each cell)")
        return _fit(_tuner(cfg, ctx, _phase_name(cfg, parent, "search"), n, log,
                           space.study_searcher(s, cfg.cells, storage, prefix, prior), plan,
                           scheduler=schedule.make_scheduler(s, log), resume=resume), s.trials_at_once)
    out, n = [], s.search.num_trials
    for arm in ctx.arms:
        log(f"ray: arm {arm}: {n} trials, {how}")
        tuner = _tuner(cfg, ctx, _phase_name(cfg, parent, arm), n, log,
                       space.make_searcher(s, arm, storage=storage, name=prefix + arm), plan,
                       scheduler=schedule.make_scheduler(s, log), resume=resume)
        out += _fit(tuner, s.trials_at_once)
    return out


def _retrain(cfg: Config, ctx: TrialContext, parent: str, phase: str, configs: list[TrialConfig], log: log_fn,
             resume: bool, plan: Plan | None = None) -> list[TrialResult]:
    """A phase that re-trains given configurations (a study's selection, its finals): one Tuner over them."""
    s = cfg.spec
    points = space.Points([c.to_tune() for c in configs], s.trials_at_once)
    return _fit(_tuner(cfg, ctx, _phase_name(cfg, parent, phase), len(configs), log, points, plan,
                       scheduler=schedule.make_scheduler(s, log, finals=True), resume=resume), s.trials_at_once)


def select(cfg: Config, ctx: TrialContext, parent: str, trials: list[TrialResult], log: log_fn,
           resume: bool = False, plan: Plan | None = None) -> list[TrialResult]:
    """A study's selection: each cell's best configurations re-trained with new seeds, on validation only."""
    st = cfg.spec.study
    configs = study.candidates(trials, cfg.spec.seed, st.candidates, st.selection_seeds,
                               st.trials_per_cell if st.allocate == "halving" else None)
    log(f"ray: selection: {len(configs)} re-trainings (each cell's {st.candidates} best configurations × "
        f"{st.selection_seeds} new seeds, validation only; the best mean is the cell's choice)")
    return _retrain(cfg, ctx, parent, "select", configs, log, resume, plan)


def retrain_finalists(cfg: Config, ctx: TrialContext, parent: str, selection: list[TrialResult], log: log_fn,
                      resume: bool = False, plan: Plan | None = None) -> list[TrialResult]:
    s = cfg.spec
    configs = study.finalists(selection, s.seed, s.study.repeats)
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
    if summary.status == "KILLED" and online:  # the trials that were running: --resume continues each in its run
        tracking.close_orphans(uri, exp_id, parent, "the sweep was interrupted while this trial ran; tl-sweep run "
                                                    "... --resume continues it from its last checkpoint, in this run")
    if summary.status != "KILLED" and online:  # a resumed sweep reopens its unfinished runs itself
        if resume:  # trials that had ended before the driver was killed, their end not yet in MLflow
            n_set = settle(uri, exp_id, parent, summary.trials + summary.selection + summary.finals)
            if n_set:
                log(f"mlflow: {n_set} runs of trials that had ended before the driver stopped are closed now")  # trials a killed driver started after its last saved state: the search never saw them
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
    tags = {Tag.BEST_TRIAL: best.trial, f"{Tag.BEST}arm": best.config.arm} if best else {}
    if best:
        tags.update({f"{Tag.BEST}{k}": str(v) for k, v in best.config.dims().items()})
    tracking.finish_parent(uri, parent, metrics, tags, summary.status)
    summary.waiting = tracking.waiting(uri)
    if summary.waiting:
        log(f"mlflow: {redact.uri(uri)} is unreachable: {summary.waiting} writes wait in this node's outbox "
            f"({tracking.Outbox(uri).dir}); nothing is lost. When the server is back: tl-sweep sync "
            f"--tracking-uri {redact.uri(uri)}, then tl-sweep report --run {parent}")


def run(cfg: Config, *, address: str | None = None, log: log_fn = print, report_dir: str | None = None,
        resume: bool = False, within: str | None = None, resumed: str | None = None) -> Summary:
    """Run the sweep (or study) that ``cfg`` describes; returns the trials, best first.

    With ``resume``, the latest sweep of the experiment (same resolved spec) continues: its parent run is reused and
    each phase's Tuner is restored with the searcher's state. A matrix's part runs ``within`` the matrix's run."""
    t0 = time.perf_counter()
    uri = cfg.spec.tracking.uri  # as tracking.resolve_uri made it (a password moved to MLflow's own variables)
    tracking.check(uri)  # the quick refusals first: tracking, --resume, the Ray address
    resumed = resumed if within else resumable(cfg) if resume else None
    address = cluster.ray_address(address)
    repeats, arms = preflight(cfg, log)  # data decoded, sources pretrained, weights loaded once
    hashed = cfg.digest()  # of the spec as written (resources.gpu: auto, not what auto chose here)
    start_ray(address)
    cfg = plan_gpus(cfg, repeats[0], log)
    s = cfg.spec
    nodes = check_cluster(cfg)  # a refusal here still comes before any MLflow run
    search_n, select_n, final_n = cfg.trainings()
    most = "at most " if s.study is not None and s.study.allocate == "halving" else ""
    plan = Plan(search_n + select_n + final_n, at_most=bool(most),
                repeats=s.study.search_repeats if s.study is not None else 1)
    log(f"plan: {most}{search_n} search trials"
        + (f" + {most}{select_n} selection re-trainings + {most}{final_n} final re-trainings" if s.study else "")
        + f" = {most}{search_n + select_n + final_n} trainings")
    run_tags = tracking.source_tags(cfg.spec_file)
    exp_id, parent = open_sweep(cfg, repeats, resumed, run_tags, hashed, within)
    log(f"mlflow: experiment {cfg.experiment!r} ({exp_id}), parent run {parent} in {uri}"
        + (" (resumed)" if resume else ""))
    retrained = 0  # a resumed study's selection and final re-trainings that had finished
    if resume:  # the counter, the best so far and the ETA go on from what the sweep had finished
        plan.done, retrained, plan.best = finished_so_far(uri, exp_id, parent)
        log(f"resumed: {plan.done} of {plan.total} trainings had finished"
            + (f"; best so far: {plan.bests()}" if plan.best else ""))
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
                est = transferability.estimate(ctx, transferability.cells_of(cfg), log)
                tracking.log_estimates(uri, exp_id, parent, transferability.metrics_of(est),
                                       transferability.table(est), {})
                prior = {(e.arm, e.depth): e.values["logme"] for e in est if "logme" in e.values}
        summary.trials = search(cfg, ctx, parent, log, resume, prior, plan)
        summary.trials.sort(key=lambda r: -(r.best_val_acc if r.best_val_acc is not None else -1.0))
        if s.study is not None:
            plan.done = len(summary.trials) + retrained  # a halving search ran fewer than its plan
            plan.total = plan.done + sum(cfg.trainings()[1:])
            summary.selection = select(cfg, ctx, parent, summary.trials, log, resume, plan)
            summary.finals = retrain_finalists(cfg, ctx, parent, summary.selection, log, resume, plan)
        everything = summary.trials + summary.selection + summary.finals
        if everything and all(r.status == "FAILED" for r in everything):
            summary.status = "FAILED"
    except KeyboardInterrupt:
        summary.status = "KILLED"
        raise Interrupted(f"interrupted; {plan.done} finished trainings are in MLflow (parent run {parent}), the "
                          f"trials that were running are marked KILLED there and resume from their last "
                          f"checkpoint") from None
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
            x, _, rows = repeats[0].split("train")
            example = np.ascontiguousarray(x[np.sort(rows[:2])].transpose(0, 2, 3, 1))  # two real images, H×W×3
            lineage = {"data_fingerprint": repeats[0].fingerprint, "spec_hash": hashed, "parent_run_id": parent}
            try:
                summary.models = publish.publish(cfg, summary.finals, summary.trials, summary.report, example,
                                                 lineage, arms, log)
            except Exception as e:  # noqa: BLE001 - every trial and the report are in MLflow already
                log(f"mlflow: the winners could not be logged as models ({type(e).__name__}: "
                    f"{one_line(str(e))}); the sweep's runs and report are complete")
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
