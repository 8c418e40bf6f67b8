"""The Ray Tune trainable: one fine-tuning trial, one nested MLflow run, one report per epoch.

:func:`run_trial` reads as torchvision's reference loop: set up, resume, then for each epoch train, evaluate,
log and report. Its parts are :class:`Training`'s methods. The trial reads its
:class:`~tl_sweep.contract.TrialConfig` from Tune's config and the sweep's :class:`~tl_sweep.contract.TrialContext`
(shipped once through the object store), and tells Tune a :class:`~tl_sweep.contract.TrialReport`.

Its MLflow run has one owner: the trial opens it and logs to it; the driver closes it with its final status
(:class:`tl_sweep.runner.Recorder`), because a trial the scheduler stops may not run another line.

Workers: Tune reuses a trial's worker process for the next trial, on a GPU too (:class:`Worker`): the CUDA context,
cuDNN's choices, built models and data on the device stay, and a trial ends only when its thread has (nothing is
left running for the interpreter's shutdown to kill). A worker whose memory grew past its bound, or that ran
out of memory, asks not to be reused (:class:`~tl_sweep.limits.WorkerMemory`).

Failures: a NaN loss or an out-of-memory error would repeat on a retry, so the trial ends at once (FAILED,
``tl_sweep.failure`` tag, the searcher told FAIL); any other exception is re-raised for Tune to retry
(``failures.max_failures``).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from tl_sweep import checkpoint, contract, internals, limits, models, tracking, train
from tl_sweep.contract import Tag, TrialConfig, TrialContext, TrialReport
from tl_sweep.cohort import Member
from tl_sweep.train import Fit, TrialError, device_for

THREAD_WAIT = 120.0  # seconds a worker waits for a stopped trial's thread to finish before it is reused or ends
_ENDED = threading.Event()  # set while no trial thread of this process is running
_ENDED.set()


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune trainable. Only a final re-training (``role: final``) reads the test split: once, at its end,
    with the best-validation weights.

    Everything is written before ``tune.report``: a scheduler's stop arrives inside it. Resume: every
    ``checkpoint_every`` epochs (once ``checkpoint_seconds`` have passed since the last) the fit's state goes
    into a Tune checkpoint with the MLflow run id; a restarted trial (``--resume``, a lost worker) continues
    from it in the same run without logging an epoch twice.
    """
    _ENDED.clear()
    t = Training(ctx, TrialConfig.from_tune(config))  # its device, worker, MLflow run and resume state
    try:
        if t.recorded():  # its last epoch ran; only the driver had not recorded the end before it was killed
            return t.report_recorded()
        t.set_up()  # the model at its depth, alone or in its cohort; restored where it was
        for epoch in range(t.first_epoch, t.config.epochs + 1):
            metrics = t.train_epoch(epoch)  # with validation at the scheduler's rungs inside the epoch
            metrics.update(t.validate(epoch))  # and the best epoch's weights kept
            if t.config.final and epoch == t.config.epochs:
                metrics.update(t.test())  # the held-out split, once, with the best epoch's weights
            t.log(epoch, metrics)
            t.report(epoch, metrics)  # with a checkpoint when one is due
    except SystemExit:  # the scheduler stopped this trial; the driver records it
        raise
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised for Tune to mark (and maybe retry) it
        t.fail(e)
    finally:
        t.close()
        _ENDED.set()


class Worker:
    """What a trial's worker process does between trials (mixed into Tune's function trainable class).

    Tune's own ``cleanup`` does not wait for a stopped trial's thread (the scheduler's stop arrives inside
    ``tune.report`` and the thread then unwinds): the process could end while that thread still freed tensors,
    which aborted GPU workers at exit (``Fatal Python error: Aborted`` in Tune's runner thread, Python 3.12's
    ``pthread_exit`` of daemon threads). Here the worker ends, or takes its next trial, only once that thread
    has finished.
    """

    def cleanup(self):
        try:
            super().cleanup()
        finally:
            _ENDED.wait(THREAD_WAIT)

    def reset_config(self, new_config):
        # Tune waits this long (2 s by default) for the previous trial's thread before reusing the worker,
        # and fails the new trial if it is still running
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(int(THREAD_WAIT)))
        return super().reset_config(new_config)


internals.with_mixins(run_trial, Worker)


class Training:
    """One trial's state while it runs: :func:`run_trial`'s steps."""

    def __init__(self, ctx: TrialContext, config: TrialConfig):
        from ray import tune

        self.entered = self.checkpointed = time.perf_counter()
        self.ctx, self.config = ctx, config
        # one "Checkpoint successfully created" INFO line per epoch per trial would bury the progress lines
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
        self.device = device_for(ctx.use_gpu)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        limits.share_gpu(self.device, ctx.gpu_share)
        self.worker = limits.worker(ctx.worker_growth)
        self.worker.begin()
        if self.worker.trials > 1:  # what the worker holds after its previous trial (whose thread has ended)
            self.worker.after_trial(self._held())
        self.resumed = _read(tune.get_checkpoint())
        self.run = _open_run(ctx, config, self.resumed["resume"]["run_id"] if self.resumed else None, self.device)
        self.logged = self.run.last_step(contract.METRIC)
        self.fit: Fit | Member | None = None  # a Member has the Fit's methods a trial calls
        self.best, self.best_state, self.best_epoch, self.first_epoch = -1.0, None, 0, 1
        self.limit = limits.MemoryLimit(ctx.memory_limit if self.device.type == "cpu" else None)
        self.tmp = tempfile.TemporaryDirectory()
        self.rungs: dict[int, float] = {}

    def _held(self) -> int:
        """What this worker holds now, less the models and data it keeps for its next trials on purpose."""
        kept = models.kept_bytes() if self.device.type == "cpu" else train.kept_bytes()
        return limits.WorkerMemory.measure(self.device, kept)

    # ----------------------------------------------------------------------------------- set up, resume

    def recorded(self) -> bool:
        done = self.resumed is not None and self.resumed["resume"].get("done")
        return bool(done or (self.run.previous == "FINISHED" and self.logged >= self.config.epochs))

    def report_recorded(self) -> None:
        from ray import tune

        m = dict(self.run.metrics)
        tune.report(TrialReport(m.pop(contract.METRIC, None), m.pop("best_val_acc", None), self.logged,
                                self.ctx.min_epochs, self.run.run_id, test_acc=m.pop("test_acc", None),
                                replace_worker=self.worker.replace, metrics=m).to_tune())

    def set_up(self) -> None:
        """The fit at its depth (in the trial's cohort when it has one), restored from its checkpoint."""
        from ray import tune

        ctx, blob = self.ctx, self.ctx.blobs.get(self.config.arm)  # a cluster's other node: the file came along
        if ctx.cohorts is not None:  # trained in its cohort's worker with the members that share its prefix
            self.fit = Member(ctx.cohorts, ctx, self.config, tune.get_context().get_trial_id(), blob)
        else:
            self.fit = Fit(ctx, self.config, self.device, weights_file=io.BytesIO(blob) if blob else None)
        if self.fit.where():
            self.run.log_tags(self.fit.where())
        if self.resumed:
            r = self.resumed["resume"]
            self.fit.restore({**r["fit"], "model": self.resumed["model"]})
            self.best, self.best_state, self.best_epoch = self.resumed["val_acc"], r["best_state"], r["best_epoch"]
            self.first_epoch = self.resumed["epoch"] + 1
        self.rungs = contract.rung_steps(ctx.rungs, ctx.min_epochs, self.fit.steps)

    # ---------------------------------------------------------------------------------------- epochs

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch; a scheduler's rung inside it is validated at its step and reported at once."""
        fit = self.fit
        metrics = fit.epoch(after_step=self._at_rung if self.rungs else None, at_steps=self.rungs)
        if epoch == self.first_epoch:  # model build, weights, MLflow run, data: what a trial pays before training
            metrics["startup_seconds"] = fit.first_step_at - self.entered
            if self.worker.trials > 1:  # a reused worker: what it held after its previous trial
                metrics["worker_memory_mb"] = self.worker.last / 2**20
        return metrics

    def _at_rung(self, step: int, acc: float | None = None) -> None:
        """A rung inside an epoch: validation now, so ASHA judges every trial at the same schedule fraction (a
        cohort member's was measured in its cohort, at that step, and is reported after the epoch)."""
        from ray import tune

        fit = self.fit
        if step in self.rungs and step % (fit.steps // self.config.epochs):  # an epoch's end reports itself
            if acc is None:
                _, acc = fit.evaluate_mid_epoch("val")
            # best_val_acc stays the best *epoch* (the checkpoint the trial keeps), None before the first
            tune.report(TrialReport(acc, self.best if self.best >= 0 else None, fit.n_epochs - 1, self.rungs[step],
                                    self.run.run_id, steps=step, total_steps=fit.steps,
                                    replace_worker=self.worker.replace).to_tune())

    def validate(self, epoch: int) -> dict[str, float]:
        """Validation loss and accuracy; the best epoch's weights kept where they can be published or tested
        (finals, and search trials outside a study: a study's search trials are re-trained by its finals)."""
        fit, out = self.fit, {}
        out["val_loss"], out[contract.METRIC] = fit.evaluate("val")
        if out[contract.METRIC] > self.best:
            self.best, self.best_epoch = out[contract.METRIC], epoch
            if self.config.final or self.ctx.keep_search_weights:
                # a copy, unless no epoch follows to change the weights (a 45 MB copy saved)
                self.best_state = fit.weights(copy=epoch < self.config.epochs)
        out["best_val_acc"] = self.best
        out["compute_seconds"] = time.perf_counter() - self.entered  # this attempt's, from its start
        return out

    def test(self) -> dict[str, float]:
        """The held-out split, once, with the best epoch's weights; each image's prediction (and validation's) is
        logged too (``predictions.csv``: what the report's pooled verdict and chance tests resample)."""
        self.fit.model.load_state_dict(self.best_state)
        loss, acc = self.fit.evaluate("test")
        lines = ["split,row,label,predicted,probability"]
        for split in ("test", "val"):
            p = self.fit.predictions(split)
            lines += [f"{split},{r},{y},{q},{pr}" for r, y, q, pr in zip(p["row"], p["label"], p["predicted"],
                                                                           p["probability"])]
        path = Path(self.tmp.name) / contract.PREDICTIONS
        path.write_text("\n".join(lines) + "\n")
        self.run.log_artifact(path)
        return {"test_loss": loss, "test_acc": acc}

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch > self.logged:  # a resumed trial does not log an epoch twice
            notes = self.fit.notes
            self.run.log_epoch(epoch, {contract.mlflow_key(k): v for k, v in metrics.items()},
                               {Tag.FEATURE_CACHE: "; ".join(notes)[:5000]} if notes else None)

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        """Tune's report of an epoch, with a resume checkpoint every ``checkpoint_every`` epochs, or the best
        weights at the end where they can be published. At the end the trial's objects go first and the worker
        measures what it still holds (its report then says whether it must be replaced)."""
        from ray import tune

        last = epoch == self.config.epochs
        ckpt = self._checkpoint_due(epoch, last)
        progress = max(contract.progress(epoch, self.config.epochs, self.ctx.min_epochs),
                       self.rungs.get(self.fit.step_count, 0))
        report = TrialReport(metrics.pop(contract.METRIC), metrics.pop("best_val_acc"), epoch, progress,
                             self.run.run_id, steps=self.fit.step_count, total_steps=self.fit.steps,
                             test_acc=metrics.pop("test_acc", None), metrics=metrics,
                             first_step_unix=self.fit.first_step_wall if epoch == self.first_epoch else None)
        if last:
            self.release()
        report.replace_worker = self.worker.replace
        tune.report(report.to_tune(), checkpoint=ckpt)

    def _checkpoint_due(self, epoch: int, last: bool):
        """The Tune checkpoint this epoch's report carries, if any (written to disk here)."""
        if not last and resume_due(epoch, self.ctx.checkpoint_every, self.ctx.checkpoint_seconds,
                                   time.perf_counter() - self.checkpointed):
            self.checkpointed = time.perf_counter()
            state = self.fit.state()
            return _write(Path(self.tmp.name) / "resume", _checkpoint(
                self.ctx, self.config, state.pop("model"), epoch, self.best,
                resume={"fit": state, "best_state": self.best_state, "best_epoch": self.best_epoch,
                        "run_id": self.run.run_id}))
        if last and (self.config.final or self.ctx.keep_search_weights) and _leads(self.ctx, self.best):
            best = _checkpoint(self.ctx, self.config, self.best_state, self.best_epoch, self.best,
                               resume={"run_id": self.run.run_id, "done": True})
            if self.ctx.log_checkpoints:  # tracking.checkpoints: all
                self.run.log_artifact(checkpoint.save(best, Path(self.tmp.name) / "best.pt"))
            return _write(Path(self.tmp.name) / "best", best)  # kept in Tune's storage to publish
        return None

    # ------------------------------------------------------------------------------------- the end

    def release(self) -> None:
        """Drop what the trial holds (model, optimizer, data views, kept weights) and measure the worker."""
        self.limit.restore()
        if self.fit is not None:  # it trains no more
            self.fit.leave()
        self.fit = self.best_state = None
        self.worker.after_trial(self._held())

    def fail(self, e: BaseException) -> None:
        """A NaN loss or out of memory: a retry would fail the same way, so the trial ends here, FAILED with
        why (and an out-of-memory worker is not reused). Anything else is re-raised for Tune to retry."""
        from ray import tune

        self.limit.restore()
        failure = deterministic_failure(e, self.config, self.ctx)
        if failure is None:
            self.run.log_tags({Tag.ERROR: f"{type(e).__name__}: {e}"[:500]})
            raise e
        kind, reason = failure
        epochs_done = self.fit.n_epochs if self.fit else 0
        traceback.clear_frames(e.__traceback__)  # the failed step's tensors go now, not with the exception
        self.release()
        if kind == "OutOfMemory":
            self.worker.replace = self.worker.replace or "it ran out of memory"
        if isinstance(e, limits.TrialOutOfMemory):
            cause = f" [held {self.limit.held / 2**30:.2f} GiB, past resources.memory_gb {self.limit.limit / 2**30:g}]"
        else:
            cause = "" if kind == "TrialError" else f" [{type(e).__name__}: {str(e).strip()[:200]}]"
        self.run.log_tags({Tag.ERROR: f"{kind}: {reason}{cause}"[:700], Tag.FAILURE: kind})
        # the metric must be there for the searcher; 0 at the end of the schedule ranks it worst
        tune.report(TrialReport(0.0, max(self.best, 0.0), epochs_done, self.ctx.min_epochs, self.run.run_id,
                                trial_error=reason, replace_worker=self.worker.replace).to_tune())

    def close(self) -> None:
        self.limit.restore()
        if self.fit is not None:  # stopped, failed or done: it trains no more
            self.fit.leave()
        self.fit = self.best_state = None
        self.tmp.cleanup()


def resume_due(epoch: int, every: int, seconds: float, since: float) -> bool:
    """Whether an epoch's end writes a resume checkpoint: every ``every`` epochs (0: never), once ``seconds``
    of the trial have passed ``since`` its last one (or its start): a shorter stretch is cheaper to redo."""
    return bool(every) and epoch % every == 0 and since >= seconds


def _leads(ctx: TrialContext, best: float) -> bool:
    """Whether this trial's weights may be published: it leads the sweep, or there is no leader to ask."""
    if ctx.leader is None or ctx.log_checkpoints:
        return True
    import ray

    try:
        return ray.get(ctx.leader.offer.remote(best), timeout=60)
    except Exception:  # noqa: BLE001 - a lost leader (a restarted driver): keep the weights, as without one
        return True


def _open_run(ctx: TrialContext, trial: TrialConfig, run_id: str | None, device: torch.device
              ) -> tracking.TrialRun:
    """The trial's MLflow run: reopened (a resumed or retried trial) or new, with its dataset inputs, the
    device it trains on, the GPUs Ray gave it and the worker process it runs in."""
    import ray
    from ray import tune

    weights = ctx.weights_of(trial.arm)[0]
    gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    node = ray.get_runtime_context().get_node_id()
    where = {Tag.DEVICE: "cuda:0" if device.type == "cuda" else "cpu", **({Tag.GPU_IDS: gpus} if gpus else {})}
    if ctx.cohorts is not None:  # it trains in its cohort's worker, which says where once the trial joins it
        where = {}
    elif ctx.use_gpu and device.type != "cuda":  # Ray gave it a GPU this worker's torch cannot use
        where[Tag.WARNING] = (f"resources.gpu {ctx.gpu_share:g}: Ray gave GPU {gpus or '(none)'} but torch "
                              f"{torch.__version__} sees no CUDA device here; trained on the CPU")
        print(f"tl-sweep: trial {tune.get_context().get_trial_id()}: {where[Tag.WARNING]}", flush=True)
    trial_id = tune.get_context().get_trial_id()
    run = tracking.TrialRun.open(  # a run name tells trials apart at a glance; its trial id makes it unique
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id,
        name=f"{trial.name(len(ctx.arms) > 1, len(ctx.repeats) > 1)}·{trial_id}",
        params={**trial.to_params(), "arch": ctx.arch, "weights": weights},
        tags={**ctx.run_tags, Tag.TRIAL_ID: trial_id, Tag.ROLE: trial.role,
              Tag.NODE: node, Tag.WORKER: f"{node[:8]}:{os.getpid()}", Tag.ARM: trial.arm, Tag.SOURCE: weights,
              Tag.DEPTH: str(trial.unfrozen_blocks), **where}, run_id=run_id)
    splits = ctx.digests[trial.search] if trial.search < len(ctx.digests) else {}
    if run.previous is None and splits:  # a new run: the splits it reads, as dataset inputs (test: finals only)
        tracking.log_datasets(ctx.tracking_uri, run.run_id, *ctx.dataset,
                              {k: v for k, v in splits.items() if k != "test" or trial.final})
    return run


def deterministic_failure(e: BaseException, trial: TrialConfig, ctx: TrialContext) -> tuple[str, str] | None:
    """``(kind, reason)`` for failures a retry would repeat (NaN loss, out of memory); ``None`` otherwise."""
    if isinstance(e, TrialError):
        return "TrialError", str(e)
    if not limits.is_out_of_memory(e):
        return None
    return "OutOfMemory", (f"out of memory (batch_size {trial.batch_size}, {ctx.input['crop']}px, "
                           f"{trial.unfrozen_blocks} unfrozen blocks): lower batch_size or data.image_size, "
                           f"or give trials more memory (resources.memory_gb, fewer trials per GPU)")


def _checkpoint(ctx: TrialContext, trial: TrialConfig, state: dict, epoch: int, val_acc: float,
                resume: dict | None = None) -> dict[str, Any]:
    return checkpoint.make(state, arch=ctx.arch, classes=list(ctx.data_for(trial.search).classes), input=ctx.input,
                           head={"kind": ctx.head, "hidden": ctx.head_hidden, "dropout": ctx.head_dropout},
                           trial=trial.to_tune(), epoch=epoch, val_acc=val_acc, resume=resume)


def _write(folder: Path, ckpt: dict[str, Any]):
    from ray.tune import Checkpoint

    folder.mkdir(exist_ok=True)
    checkpoint.save(ckpt, folder / checkpoint.TUNE_FILE)
    return Checkpoint.from_directory(str(folder))


def _read(ckpt) -> dict[str, Any] | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return checkpoint.load(Path(d) / checkpoint.TUNE_FILE)
