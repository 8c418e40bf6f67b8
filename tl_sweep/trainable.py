"""The Ray Tune trainable: one fine-tuning trial, one nested MLflow run, one report per epoch.

``run_trial(config, ctx)`` reads its :class:`~tl_sweep.contract.TrialConfig` from Tune's config and the sweep's
:class:`~tl_sweep.contract.TrialContext` (shipped once through the object store), runs :class:`~tl_sweep.train.Fit`
epoch by epoch, logs each epoch and the best checkpoint to its MLflow run, and reports to Tune.

Its MLflow run has one owner: the trial opens it and logs to it; the driver closes it with its final status
(:class:`tl_sweep.runner.Recorder`), because a trial the scheduler stops may not run another line.

Failures: a NaN loss or an out-of-memory error would repeat on a retry, so the trial ends at once (FAILED,
``tl_sweep.failure`` tag, the searcher told FAIL); any other exception is re-raised for Tune to retry
(``failures.max_failures``).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from tl_sweep import checkpoint, contract, limits, tracking
from tl_sweep.contract import Tag, TrialConfig, TrialContext
from tl_sweep.cohort import Member
from tl_sweep.train import Fit, TrialError, device_for


CHECKPOINT_FILE = "trial.pt"  # what a trial's Tune checkpoint folder holds (checkpoint.make's format)


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune trainable. Only a final re-training (``role: final``) reads the test split: once, at its end,
    with the best-validation weights.

    Everything is written before ``tune.report``: a scheduler's stop arrives inside it.
    Resume: every ``checkpoint_every`` epochs the fit state goes into a Tune checkpoint with the MLflow run id;
    a restarted trial (``--resume``, a lost worker) continues from it in the same run without logging an epoch
    twice.
    """
    from ray import tune

    entered = time.perf_counter()
    # one "Checkpoint successfully created" INFO line per epoch per trial would bury the progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial = TrialConfig.from_tune(config)
    device = device_for(ctx.use_gpu)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    limits.share_gpu(device, ctx.gpu_share)
    resumed = _read(tune.get_checkpoint())
    run = _open_run(ctx, trial, resumed["resume"]["run_id"] if resumed else None, device)
    logged = run.last_step(contract.METRIC)
    done = resumed is not None and resumed["resume"].get("done")  # its last epoch ran: only the driver had not
    if done or (run.previous == "FINISHED" and logged >= trial.epochs):  # recorded it before it was killed
        tune.report({**run.metrics, "epoch": logged, "progress": ctx.min_epochs, "mlflow_run_id": run.run_id})
        return
    fit, member, best = None, None, -1.0
    limit = limits.MemoryLimit(ctx.memory_limit if device.type == "cpu" else None)
    try:
        blob = ctx.blobs.get(trial.arm)  # another node of a cluster: the checkpoint came through the object store
        if ctx.cohorts is not None:  # trained in its cohort's worker with the members that share its prefix
            fit = member = Member(ctx.cohorts, ctx, trial, tune.get_context().get_trial_id(), blob)
            run.log_tags({Tag.DEVICE: member.where["device"], Tag.COHORT: member.where["cohort"],
                          **({Tag.GPU_IDS: member.where["gpu_ids"]} if member.where["gpu_ids"] else {})})
        else:
            fit = Fit(ctx, trial, device, weights_file=io.BytesIO(blob) if blob else None)
        best_state, best_epoch, first = None, 0, 1
        if resumed:
            r = resumed["resume"]
            fit.restore({**r["fit"], "model": resumed["model"]})
            best, best_state, best_epoch, first = resumed["val_acc"], r["best_state"], r["best_epoch"], \
                resumed["epoch"] + 1
        rungs = contract.rung_steps(ctx.rungs, ctx.min_epochs, fit.steps)
        steps_per_epoch = fit.steps // trial.epochs

        def at_rung(step: int, acc: float | None = None) -> None:
            """A rung inside an epoch: validation now, so ASHA judges every trial at the same schedule fraction
            (a cohort member's was measured in its cohort, at that step, and is reported after the epoch)."""
            if step in rungs and step % steps_per_epoch:  # at an epoch's end, the epoch's own report does it
                if acc is None:
                    _, acc = fit.evaluate_mid_epoch("val")
                # best_val_acc stays the best *epoch* (the checkpoint the trial keeps), None before the first
                tune.report({contract.METRIC: acc, "best_val_acc": best if best >= 0 else None,
                             "epoch": fit.n_epochs - 1, "progress": rungs[step], "steps": step,
                             "total_steps": fit.steps, "mlflow_run_id": run.run_id})

        # the best epoch's weights matter where they can be published or tested: finals, and search trials
        # outside a study (a study's search trials are re-trained by its finals)
        keep = trial.final or ctx.keep_search_weights
        with tempfile.TemporaryDirectory() as tmp:
            for epoch in range(first, trial.epochs + 1):
                metrics = member.epoch(after_step=at_rung, rungs=rungs) if member else \
                    fit.epoch(after_step=at_rung if rungs else None)
                if epoch == first:  # model build, weights, MLflow run, data: what a trial pays before training
                    metrics["startup_seconds"] = fit.first_step_at - entered
                metrics["val_loss"], metrics[contract.METRIC] = fit.evaluate("val")
                if metrics[contract.METRIC] > best:  # the best epoch's weights: the model this trial keeps
                    best, best_epoch = metrics[contract.METRIC], epoch
                    if keep:
                        # a copy, unless no epoch follows to change the weights (a 45 MB copy saved)
                        last = epoch == trial.epochs and member is None and device.type == "cpu"
                        best_state = fit.model.state_dict() if last else \
                            {k: v.detach().to("cpu", copy=True) for k, v in fit.model.state_dict().items()}
                metrics["best_val_acc"] = best
                metrics["compute_seconds"] = time.perf_counter() - entered  # this attempt's, from its start
                if trial.final and epoch == trial.epochs:  # the held-out test split, once, best-val weights
                    fit.model.load_state_dict(best_state)
                    metrics["test_loss"], metrics["test_acc"] = fit.evaluate("test")
                if epoch > logged:
                    run.log_epoch(epoch, metrics, {Tag.FEATURE_CACHE: "; ".join(fit.notes)[:5000]}
                                  if fit.notes else None)
                resume = None
                if ctx.checkpoint_every and epoch < trial.epochs and epoch % ctx.checkpoint_every == 0:
                    state = fit.state()
                    resume = _write(Path(tmp) / "resume", _checkpoint(
                        ctx, trial, state.pop("model"), epoch, best,
                        resume={"fit": state, "best_state": best_state, "best_epoch": best_epoch,
                                "run_id": run.run_id}))
                elif epoch == trial.epochs and keep and _leads(ctx, best):  # kept in Tune's storage to publish
                    best_ckpt = _checkpoint(ctx, trial, best_state, best_epoch, best,
                                            resume={"run_id": run.run_id, "done": True})
                    resume = _write(Path(tmp) / "best", best_ckpt)
                    if ctx.log_checkpoints:  # tracking.checkpoints: all
                        run.log_artifact(checkpoint.save(best_ckpt, Path(tmp) / "best.pt"))
                # first_step_unix: the driver measures scheduling -> first step (runner.Recorder)
                progress = max(contract.progress(epoch, trial.epochs, ctx.min_epochs), rungs.get(fit.step_count, 0))
                tune.report({**metrics, "epoch": epoch, "progress": progress, "steps": fit.step_count,
                             "total_steps": fit.steps,
                             "mlflow_run_id": run.run_id,
                             **({"first_step_unix": fit.first_step_wall} if epoch == first else {})},
                            checkpoint=resume)
    except SystemExit:  # the scheduler stopped this trial; the driver records it
        raise
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised for Tune to mark (and maybe retry) it
        limit.restore()
        failure = deterministic_failure(e, trial, ctx)
        if failure is None:
            run.log_tags({Tag.ERROR: f"{type(e).__name__}: {e}"[:500]})
            raise
        epochs_done, fit = (fit.n_epochs if fit else 0), None  # what the failed fit held can go now
        _end_failed(e, failure, run, limit, best, epochs_done, ctx)
    finally:
        limit.restore()
        if member is not None:  # stopped, failed or done: it trains no more
            member.leave()


class Leader:
    """A plain sweep's best validation accuracy among its finished trials (a Ray actor, see ``TrialContext``).

    The sweep publishes its best trial only, so a trial that ends below the leader skips writing its weights
    to Tune's storage (45 MB for a ResNet18, ~0.15 s of a short trial). Ties keep the first to finish.
    """

    def __init__(self):
        self.best = -1.0

    def offer(self, score: float) -> bool:
        if score > self.best:
            self.best = score
            return True
        return False


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
    device it trains on and the GPUs Ray gave it."""
    import ray
    from ray import tune

    weights = ctx.arms[trial.arm][0]
    gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    where = {Tag.DEVICE: "cuda:0" if device.type == "cuda" else "cpu", **({Tag.GPU_IDS: gpus} if gpus else {})}
    if ctx.cohorts is not None:  # it trains in its cohort's worker, which says where once the trial joins it
        where = {}
    elif ctx.use_gpu and device.type != "cuda":  # Ray gave it a GPU this worker's torch cannot use
        where[Tag.WARNING] = (f"resources.gpu {ctx.gpu_share:g}: Ray gave GPU {gpus or '(none)'} but torch "
                            f"{torch.__version__} sees no CUDA device here; trained on the CPU")
        print(f"tl-sweep: trial {tune.get_context().get_trial_id()}: {where[Tag.WARNING]}", flush=True)
    run = tracking.TrialRun.open(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, name=trial.name(ctx.arch, len(ctx.arms) > 1),
        params={**trial.to_params(), "arch": ctx.arch, "weights": weights},
        tags={**ctx.run_tags, Tag.TRIAL_ID: tune.get_context().get_trial_id(), Tag.ROLE: trial.role,
              Tag.NODE: ray.get_runtime_context().get_node_id(), Tag.ARM: trial.arm, Tag.SOURCE: weights,
              Tag.DEPTH: str(trial.unfrozen_blocks), **where}, run_id=run_id)
    splits = ctx.digests[trial.search] if trial.search < len(ctx.digests) else {}
    if run.previous is None and splits:  # a new run: the splits it reads, as dataset inputs (test: finals only)
        tracking.log_datasets(ctx.tracking_uri, run.run_id, *ctx.dataset,
                              {k: v for k, v in splits.items() if k != "test" or trial.final})
    return run


def _end_failed(e: BaseException, failure: tuple[str, str], run: tracking.TrialRun, limit: limits.MemoryLimit,
                best: float, epochs_done: int, ctx: TrialContext) -> None:
    """A NaN loss or out of memory: a retry would fail the same way, so the trial ends here, FAILED with why."""
    from ray import tune

    kind, reason = failure
    traceback.clear_frames(e.__traceback__)  # the failed step's tensors go now, not with the exception
    limit.give_back()
    if isinstance(e, limits.TrialOutOfMemory):
        cause = f" [held {limit.held / 2**30:.2f} GiB, past resources.memory_gb {limit.limit / 2**30:g}]"
    else:
        cause = "" if kind == "TrialError" else f" [{type(e).__name__}: {str(e).strip()[:200]}]"
    run.log_tags({Tag.ERROR: f"{kind}: {reason}{cause}"[:700], Tag.FAILURE: kind})
    # the metric must be there for the searcher; 0 at the end of the schedule ranks it worst
    tune.report({"trial_error": reason, contract.METRIC: 0.0, "best_val_acc": max(best, 0.0),
                 "epoch": epochs_done, "progress": ctx.min_epochs, "mlflow_run_id": run.run_id})


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
    checkpoint.save(ckpt, folder / CHECKPOINT_FILE)
    return Checkpoint.from_directory(str(folder))


def _read(ckpt) -> dict[str, Any] | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return checkpoint.load(Path(d) / CHECKPOINT_FILE)
