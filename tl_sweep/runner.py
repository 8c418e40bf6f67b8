"""The sweep: pre-flight, MLflow parent run, Ray Tune Tuner with OptunaSearch and ASHA, summary.

Order of work in :func:`run` (nothing expensive starts before every input is checked):

1. tracking URI reachable; data decoded once into the node cache; weights resolved (a ``source:`` model
   pretrained once) and the model built once on the driver, so a bad checkpoint fails before any trial;
2. experiment and parent run created on the driver;
3. ``Tuner.fit`` with :class:`Searcher` (Optuna TPE, seeded, ``constant_liar``) behind a concurrency
   limit, ASHA on schedule progress (or FIFO), per-trial CPU/GPU resources (fractions share a GPU);
4. the parent run closed with the best trial; child runs left RUNNING by a killed process are closed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tl_sweep import cluster, data, models, sources, space, tracking, train
from tl_sweep.errors import UserError
from tl_sweep.spec import Config, to_yaml, values_of

log_fn = Callable[[str], None]


def _min_epochs(cfg: Config) -> int:
    return int(min(values_of(cfg.spec.search.space.epochs)))


class Searcher(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended.

    A trial that ran all its epochs is COMPLETE with its best-epoch ``val_acc`` (the checkpoint it keeps).
    A trial ASHA stopped is PRUNED, not COMPLETE with a mid-schedule value: TPE then ranks it below complete
    trials by how far it got, instead of mistaking a half-annealed score for a final one.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or error or not result:
            return super().on_trial_complete(trial_id, result, error)
        if result.get("trial_error"):  # NaN loss and the like: a failed trial, not a score
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return None
        epochs = int(result.get("config", {}).get("epochs", ot_trial.params.get("epochs", 0)))
        if result.get("epoch", 0) < epochs:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, {**result, self.metric: result["best_val_acc"]}, error)


def make_searcher(cfg: Config, arm: str | None = None, depths: list[int] | None = None) -> ConcurrencyLimiter:
    """Seeded TPE (``constant_liar`` so concurrent trials do not collide) behind a concurrency limit."""
    s = cfg.spec
    n_startup = min(10, max(2, s.search.num_trials // 3))
    sampler = optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, n_startup_trials=n_startup)
    sampler_fn = space.DefineByRun(s.search.space, depths=depths, extra={"arm": arm or next(iter(cfg.arms))})
    searcher = Searcher(space=sampler_fn, metric=train.METRIC, mode="max", sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=s.search.max_concurrent)


def make_scheduler(cfg: Config):
    """ASHA on ``progress`` (epochs rescaled to the shortest schedule) or FIFO; see docs/search.md."""
    sch = cfg.spec.scheduler
    if sch.kind == "fifo":
        return FIFOScheduler()
    max_t = _min_epochs(cfg)  # progress runs 0..min_epochs over every trial's own schedule
    if sch.grace_period >= max_t:
        return FIFOScheduler()  # no rung fits before the shortest schedule ends
    return ASHAScheduler(time_attr="progress", metric=train.METRIC, mode="max", max_t=max_t,
                         grace_period=sch.grace_period, reduction_factor=sch.reduction_factor)


@dataclass
class Summary:
    experiment_id: str
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per search trial, best first
    finals: list[dict[str, Any]] = field(default_factory=list)  # a study's re-trainings scored on test
    status: str = "FINISHED"
    report: Any = None
    seconds: float = 0.0

    @property
    def best(self) -> dict[str, Any] | None:
        return self.trials[0] if self.trials else None


def _config(config: dict | None) -> dict[str, Any]:
    """A trial's flat config: a study's final re-trainings carry theirs under ``cfg`` (a grid of configs)."""
    config = config or {}
    return dict(config.get("cfg", config))


class Progress(tune.Callback):
    """One line per finished trial with the best so far; closes each trial's MLflow run with its status."""

    def __init__(self, total: int, uri: str, log: log_fn):
        self.total, self.uri, self.log = total, uri, log
        self.done, self.best, self.t0 = 0, None, time.perf_counter()
        self.added: dict[str, float] = {}  # trial id -> when Tune created it (a slot was free: it is scheduled)
        self.n_seen, self.step_began = 0, time.time()
        self.startup: dict[str, float] = {}

    def on_step_begin(self, iteration, trials, **info):
        self.step_began = time.time()

    def on_step_end(self, iteration, trials, **info):
        # trials created in this step (Tune's list only grows): dated at the step's start, so the start-up
        # measured from it is an upper bound
        for t in trials[self.n_seen:]:
            self.added[t.trial_id] = self.step_began
        self.n_seen = len(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """Start-up as the user waits for it: trial scheduled -> its first training work, incl. the actor.

        Logged with the run's end (one MLflow call per trial from the driver's loop, not two)."""
        first, added = result.get("first_step_unix"), self.added.pop(trial.trial_id, None)
        if first is not None and added is not None:
            self.startup[trial.trial_id] = first - added

    def _metrics(self, trial) -> dict[str, float]:
        s = self.startup.pop(trial.trial_id, None)
        return {} if s is None else {"scheduled_to_first_step_seconds": s}

    def _line(self, trial, how: str) -> None:
        self.done += 1
        r, c = trial.last_result or {}, _config(trial.config)
        acc = r.get("best_val_acc")
        if acc is not None and (self.best is None or acc > self.best[0]):
            self.best = (acc, trial.trial_id)
        got = f"val_acc {acc:.3f}" if acc is not None else "no result"
        best = f"best {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        self.log(f"[{self.done:>3}/{self.total}] {trial.trial_id} k={c.get('unfrozen_blocks')} {c.get('optimizer')} "
                 f"bs={c.get('batch_size')} lr×{float(c.get('lr_mult', 0)):.3g} ep={r.get('epoch', 0)}/"
                 f"{c.get('epochs')} → {got} {how}| {time.perf_counter() - self.t0:.0f}s | {best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if r.get("trial_error"):  # the trial closed its run FAILED itself
            self._line(trial, f"FAILED ({r['trial_error']}) ")
            if r.get("mlflow_run_id"):
                tracking.end_run(self.uri, r["mlflow_run_id"], "FAILED", {}, self._metrics(trial))
            return
        stopped = r.get("epoch", 0) < _config(trial.config).get("epochs", 0)
        self._line(trial, "(early-stopped) " if stopped else "")
        if r.get("mlflow_run_id"):
            tags = {"tl_sweep.epochs_run": str(r.get("epoch", 0))}
            if stopped:
                tags["tl_sweep.early_stopped"] = "true"
            tracking.end_run(self.uri, r["mlflow_run_id"], "FINISHED", tags, self._metrics(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED ")
        r = trial.last_result or {}
        if r.get("mlflow_run_id"):
            tracking.end_run(self.uri, r["mlflow_run_id"], "FAILED", {"tl_sweep.epochs_run": str(r.get("epoch", 0))},
                             self._metrics(trial))


def preflight(cfg: Config, log: log_fn = print) -> tuple[data.Prepared, dict[str, tuple[str, str | None]]]:
    """Check everything a trial will touch, in the order a user would fix it; nothing is started.

    Returns the prepared data and, per arm, its weights and checkpoint file (``source:`` models pretrained).
    """
    s = cfg.spec
    tracking.check(s.tracking.uri)
    prepared = data.prepare(s.data.dataset, size=cfg.input["resize"], seed=s.seed, split=s.data.split,
                            classes=s.data.classes, train_per_class=s.data.train_per_class, strict=s.data.strict,
                            holdout=s.data.holdout, root=s.data.root, log=log)
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
                                          use_gpu=s.resources.gpu > 0, log=log))
        elif weights != "none" and models.torchvision_weights(s.model.arch, weights) is None:
            file = weights
        # a bad checkpoint or missing torchvision file fails here, once, before any trial
        models.build(s.model.arch, len(prepared.classes), weights=weights, weights_file=file, head=s.model.head,
                     image_size=cfg.input["crop"])
        arms[arm] = (weights, file)
    return prepared, arms


def _rows(results) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m, c = r.metrics or {}, _config(r.config)
        failed = r.error is not None or bool(m.get("trial_error"))
        stopped = m.get("epoch", 0) < c.get("epochs", 0) and not failed
        trial_id = m.get("trial_id") or (Path(r.path).name if r.path else "")
        rows.append({"trial": trial_id, "arm": c.get("arm"), **{k: c.get(k) for k in space.DIMENSIONS},
                     "best_val_acc": m.get("best_val_acc"), "test_acc": m.get("test_acc"),
                     "epochs_run": m.get("epoch", 0), "seed": c.get("seed"),
                     "status": "FAILED" if failed else ("EARLY_STOPPED" if stopped else "FINISHED"),
                     "error": m.get("trial_error") or (str(r.error).splitlines()[0][:200] if r.error else None)})
    return rows


def _best_key(row: dict[str, Any]) -> float:
    return row["best_val_acc"] if row["best_val_acc"] is not None else -1.0


def finalists(rows: list[dict[str, Any]], seed: int, repeats: int) -> list[dict[str, Any]]:
    """Best configuration per (arm, depth) by validation accuracy, one config per repeat seed.

    Trials that ran their whole schedule are preferred: an early-stopped trial's score is mid-schedule.
    """
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["status"] == "FAILED" or r["best_val_acc"] is None:
            continue
        key = (r["arm"], r["unfrozen_blocks"])
        rank = (r["status"] == "FINISHED", r["best_val_acc"])
        if key not in best or rank > (best[key]["status"] == "FINISHED", best[key]["best_val_acc"]):
            best[key] = r
    return [{**{k: r[k] for k in space.DIMENSIONS}, "arm": r["arm"], "seed": seed + 1000 + i, "final": True}
            for key, r in sorted(best.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])) for i in range(repeats)]


def _tuner(cfg: Config, ctx: train.TrialContext, name: str, total: int, log: log_fn, *, search_alg=None,
           scheduler=None, param_space=None, resume: bool = False) -> tune.Tuner:
    """A Tuner for one phase (an arm's search, or a study's final re-trainings); restored when resuming."""
    s = cfg.spec
    res = {"cpu": s.resources.cpu, "gpu": s.resources.gpu}
    if ctx.memory_limit:
        res["memory"] = ctx.memory_limit  # Ray reserves what the trial may hold
    trainable = tune.with_resources(tune.with_parameters(train.run_trial, ctx=ctx), res)
    path = f"{s.storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        log(f"ray: resuming {name}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                    num_samples=total if search_alg else 1,
                                    max_concurrent_trials=None if search_alg else s.search.max_concurrent,
                                    # a new process per trial costs seconds of imports; GPU trials get a
                                    # fresh process so no memory is kept from an earlier trial (ray#32698)
                                    reuse_actors=s.resources.gpu == 0,
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=s.storage, verbose=0,
                                  callbacks=[Progress(total, s.tracking.uri, log)],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=s.failures.max_failures)))


class Interrupted(KeyboardInterrupt):
    """The sweep stopped before its trials did (Ctrl-C); ``--resume`` continues it."""


def _fit(tuner: tune.Tuner) -> list[dict[str, Any]]:
    """``tuner.fit()``, raising :class:`Interrupted` when Ctrl-C ended it early.

    Tune swallows the first SIGINT: its handler saves the experiment, ends the loop and puts the previous
    handler back. So a handler that is ours again after ``fit`` means the sweep was interrupted.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    results = tuner.fit()
    if main and signal.getsignal(signal.SIGINT) is before:
        raise Interrupted("interrupted")
    if main:
        signal.signal(signal.SIGINT, before)
    return _rows(results)


def spec_hash(cfg: Config) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg.dump(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resumable_parent(cfg: Config, uri: str, exp_id: str) -> str:
    c = tracking.client(uri)
    runs = tracking._retry(c.search_runs, [exp_id], filter_string="tags.`tl_sweep.role` = 'sweep'",
                           order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UserError(f"--resume: experiment {cfg.experiment!r} has no sweep to resume; run without --resume")
    run = runs[0]
    if run.data.tags.get("tl_sweep.spec_hash") != spec_hash(cfg):
        raise UserError(f"--resume: the latest sweep of {cfg.experiment!r} ({run.info.run_id}) ran another spec "
                        f"or other --set values; resume with the same ones, or run without --resume")
    if run.info.status == "FINISHED":
        raise UserError(f"--resume: the latest sweep of {cfg.experiment!r} ({run.info.run_id}) already finished; "
                        f"run without --resume to start a new one")
    tracking._retry(c.update_run, run.info.run_id, status="RUNNING")
    return run.info.run_id


def run(cfg: Config, *, address: str | None = None, log: log_fn = print, report_dir: str | None = None,
        resume: bool = False) -> Summary:
    """Run the sweep (or study) that ``cfg`` describes; returns the trials, best first.

    With ``resume``, the latest sweep of the experiment (same resolved spec) continues: its parent run is
    reused and each phase's Tuner is restored from storage with the searcher's state.
    """
    t0 = time.perf_counter()
    s = cfg.spec
    prepared, arms = preflight(cfg, log)
    uri = s.tracking.uri
    exp_id = tracking.experiment_id(uri, cfg.experiment)
    if resume:
        parent = _resumable_parent(cfg, uri, exp_id)
    else:
        run_name = f"{s.name}·{s.model.arch}·{'+'.join(cfg.arms)}·{time.strftime('%Y%m%d-%H%M%S')}"
        files = {"spec.yaml": cfg.spec_text or to_yaml(cfg), "resolved.yaml": to_yaml(cfg)}
        if prepared.skipped:
            files["skipped_files.txt"] = "\n".join(prepared.skipped) + "\n"
        parent = tracking.start_parent(uri, exp_id, run_name, cfg.dump(), files, tags={
            "tl_sweep.arch": s.model.arch, "tl_sweep.arms": ",".join(cfg.arms), "tl_sweep.spec_hash": spec_hash(cfg),
            "tl_sweep.data_fingerprint": prepared.fingerprint,
            **{f"tl_sweep.data.{k}": str(v) for k, v in data.describe(prepared).items()}})
    log(f"mlflow: experiment {cfg.experiment!r} ({exp_id}), parent run {parent} in {uri}"
        + (" (resumed)" if resume else ""))
    summary = Summary(exp_id, parent)
    ctx = train.TrialContext(
        arch=s.model.arch, arms=arms, head=s.model.head, head_hidden=s.model.head_hidden,
        head_dropout=s.model.head_dropout, regime=s.regime.model_dump(), input=cfg.input,
        augment=s.data.augment.model_dump(), data=prepared, seed=s.seed, min_epochs=_min_epochs(cfg),
        tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent, use_gpu=s.resources.gpu > 0,
        feature_cache=s.data.feature_cache, gpu_share=s.resources.gpu, precision=s.resources.precision,
        memory_limit=int(s.resources.memory_gb * 2**30) if s.resources.memory_gb else None,
        checkpoint_every=s.failures.checkpoint_every)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                     configure_logging=True, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--address: cannot join the Ray cluster at {address} ({' '.join(str(e).split())[:160]}); "
                            f"check the address (auto, or the head's host:6379) and that the cluster runs") from None
    cluster.check_resources(s.resources.cpu, s.resources.gpu)
    paths = [p for p in (s.data.dataset.removeprefix("imagefolder:") if s.data.dataset.startswith("imagefolder:")
                         else None, s.data.root) if p]
    if cluster.check_nodes(s.storage, uri, paths) > 1:  # other nodes have no source cache: ship the weights
        ctx = dataclasses.replace(ctx, blobs={arm: Path(f).read_bytes() for arm, (_, f) in arms.items() if f})
    n = s.search.num_trials
    try:
        for arm, (weights, _) in arms.items():
            depths = None
            if s.study is not None:
                depths = [cfg.max_blocks] if weights == "none" else space.depths(s.search.space)
            log(f"ray: arm {arm}: {n} trials{f' over depths {depths}' if depths else ''}, "
                f"{s.search.max_concurrent} at a time, {s.resources.cpu:g} CPU / {s.resources.gpu:g} GPU each, "
                f"scheduler {s.scheduler.kind}")
            tuner = _tuner(cfg, ctx, f"{cfg.experiment}-{parent[:8]}-{_slug(arm)}", n, log,
                           search_alg=make_searcher(cfg, arm, depths), scheduler=make_scheduler(cfg), resume=resume)
            summary.trials += _fit(tuner)
        summary.trials.sort(key=lambda row: -_best_key(row))
        if s.study is not None:
            configs = finalists(summary.trials, s.seed, s.study.repeats)
            log(f"ray: final evaluation: {len(configs)} re-trainings (best per arm and depth × "
                f"{s.study.repeats} seeds), each scored once on the test split")
            tuner = _tuner(cfg, ctx, f"{cfg.experiment}-{parent[:8]}-final", len(configs), log,
                           param_space={"cfg": tune.grid_search(configs)}, resume=resume)
            summary.finals = _fit(tuner)
        everything = summary.trials + summary.finals
        if everything and all(row["status"] == "FAILED" for row in everything):
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
        if summary.status != "KILLED":  # a resumed sweep reopens its unfinished runs itself
            if resume:  # trials a killed driver started after its last saved state: the search never saw them
                known = {row["trial"] for row in summary.trials + summary.finals}
                n_gone = tracking.retire_unknown(uri, exp_id, parent, known)
                if n_gone:
                    log(f"mlflow: {n_gone} unfinished runs of trials started after the killed driver's last "
                        f"saved state were deleted (restorable: mlflow runs restore)")
            tracking.close_orphans(uri, exp_id, parent)
        best = summary.best
        metrics = {"best_val_acc": best["best_val_acc"]} if best and best["best_val_acc"] is not None else {}
        metrics.update(n_trials=len(summary.trials), n_final=len(summary.finals), sweep_seconds=summary.seconds)
        tags = {"tl_sweep.best_trial": best["trial"], "tl_sweep.best.arm": str(best["arm"])} if best else {}
        if best:
            tags.update({f"tl_sweep.best.{k}": str(best[k]) for k in space.DIMENSIONS})
        tracking.finish_parent(uri, parent, metrics, tags, summary.status)
    if summary.status != "KILLED":
        from tl_sweep import report

        summary.report = report.build(uri, exp_id, parent, out_dir=report_dir, log=log)
    return summary


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")


def table(rows: list[dict[str, Any]], limit: int = 8) -> str:
    """The best trials as an aligned text table."""
    cols = ["trial", "arm", "unfrozen_blocks", "optimizer", "batch_size", "lr_mult", "epochs", "best_val_acc",
            "status"]
    heads = ["trial", "arm", "k", "optimizer", "bs", "lr_mult", "epochs", "best val_acc", "status"]
    fmt = lambda c, v: f"{v:.4f}" if c == "best_val_acc" and v is not None else (  # noqa: E731
        f"{v:.3g}" if isinstance(v, float) else str(v))
    body = [[fmt(c, r.get(c)) for c in cols] for r in rows[:limit]]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(heads)] + [line(b) for b in body])
