"""Cohorts: trials that share a frozen prefix train together in one worker (``resources.cohort: N``).

Trials of one cell with the same (arch, frozen weights, depth, data, batch size, seed) see the same batches
and augmentations (their data generator starts from the same seed: common random numbers, see
docs/search.md), so the frozen prefix's forward of each batch can be computed once for all of them. With
augmentation on, that forward is most of a linear probe's step and about 40% of a k = 1 step on a CPU.

How it runs: each member is still its own Ray Tune trial (its own MLflow run, metrics, checkpoint, early
stopping and failure), but a light one (no CPU of its own): its training happens in a :class:`Worker` actor
(``resources.cpu``/``gpu`` each, at most ``search.max_concurrent`` of them, kept for the whole sweep) that
holds every member's :class:`~tl_sweep.train.Fit` and trains a cohort's members side by side
(:func:`~tl_sweep.train.epoch_together`). A member asks for its next epoch; the worker trains everyone in
its cohort who asked at once, then each member logs and reports its own epoch as a solo trial would. A member
the scheduler stops or that fails simply stops asking and leaves.

:class:`Registry` (one per sweep, owned by the driver) forms cohorts: members with one key that arrive within
``OPEN_SECONDS`` of a cohort's first member join it, up to N; later ones start the next cohort, so members
of one cohort start together and stay in step. Members whose generators differ (another seed, a trial
resumed from a checkpoint) still share the worker but not the batches. A worker serving several cohorts
trains them in turn.

The trainable uses :class:`Member`, which has the methods of a ``Fit`` that ``run_trial`` calls.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import torch

from tl_sweep import study
from tl_sweep.contract import Tag

# What Ray reserves (its "memory" resource), from this machine's measurements (ResNet18, 64 px): a member is a
# Tune trial process with torch loaded (0.76-0.85 GB), a worker ~1 GB plus ~0.3 GB per member's Fit (3.1-3.2
# GB with 8 members training layer4 with Adam). Without these, 16 members and 2 workers filled 24 GB.
MEMBER_MEMORY = 2**30
WORKER_MEMORY, FIT_MEMORY = 2**30, int(0.3 * 2**30)
OPEN_SECONDS = 2.0  # a cohort takes members for this long after its first one (or until it is full)
START_WAIT = 30.0  # its first round waits at most this much longer for members that were handed it
ROUND_WAIT = 0.5  # a round starts when every member asked for its epoch, or this long after the first ask


def key_of(trial) -> tuple:
    """What members of one cohort share: their cell (frozen weights, depth, search repeat's data), batch size and
    seed."""
    return study.Cell.of(trial), trial.batch_size, trial.seed


class Registry:
    """Hands each new member its cohort and that cohort's worker (a Ray actor owned by the driver; the workers
    are its own and end with it)."""

    def __init__(self, ctx, size: int, cpu: float, gpu: float, workers: int):
        import ray

        self.size = size
        actor = ray.remote(Worker).options(num_cpus=cpu, num_gpus=gpu, memory=WORKER_MEMORY + size * FIT_MEMORY,
                                           max_concurrency=4 * size + 8)
        # all workers first, before any member: members hold memory, and a worker that could not be placed
        # after them would leave them waiting for ever
        self.workers: list[list] = [[actor.remote(ctx), 0] for _ in range(workers)]  # [actor, members in it]
        self.open: dict[tuple, list] = {}  # key -> [cohort id, opened at, members joined, worker index]
        self.where: dict[int, int] = {}  # cohort id -> worker index
        self.count = 0

    def ready(self) -> int:
        """Waits until every worker is placed and started; the number of workers."""
        import ray

        ray.get([w.stats.remote() for w, _ in self.workers])
        return len(self.workers)

    def join(self, key: tuple) -> tuple[Any, int, float, int]:
        """(worker, cohort id, when the cohort opened, most members) for a new member with ``key``."""
        got = self.open.get(key)
        if got is None or got[2] >= self.size or time.time() - got[1] > OPEN_SECONDS:
            self.count += 1
            got = self.open[key] = [self.count, time.time(), 0, self._worker()]
            self.where[self.count] = got[3]
        got[2] += 1
        worker = self.workers[got[3]]
        worker[1] += 1
        worker[0].expect.remote(got[0], got[2], got[1], self.size)
        return worker[0], got[0], got[1], self.size

    def _worker(self) -> int:
        """An idle worker, else the least busy."""
        return min(range(len(self.workers)), key=lambda i: self.workers[i][1])

    def leave(self, cid: int) -> None:
        if cid in self.where:
            self.workers[self.where[cid]][1] -= 1


class Worker:
    """The Fits of cohorts' members, trained in rounds of one epoch per cohort (a threaded Ray actor)."""

    def __init__(self, ctx):
        import os

        from tl_sweep import limits
        from tl_sweep.train import device_for

        self.ctx = ctx
        self.device = device_for(ctx.use_gpu)
        limits.share_gpu(self.device, ctx.gpu_share)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.fits: dict[str, Any] = {}  # member -> its Fit
        self.cohort_of: dict[str, int] = {}  # member -> cohort id
        self.cohorts: dict[int, dict] = {}  # cohort id -> opened, expected members, size, rounds
        self.asked: dict[str, float] = {}  # member -> when it asked for its next epoch
        self.rungs: dict[str, set[int]] = {}  # member -> the steps of its scheduler's rungs
        self.done: dict[str, Any] = {}  # member -> its epoch's result, until it takes it
        self.lock, self.cv = threading.Lock(), threading.Condition(threading.Lock())
        self.rounds, self.shared = 0, 0

    def _cohort(self, cid: int, opened: float, size: int) -> dict:
        return self.cohorts.setdefault(cid, {"opened": opened, "expected": 0, "size": size, "rounds": 0})

    def expect(self, cid: int, n: int, opened: float, size: int) -> None:
        """The registry has handed ``n`` members this cohort so far."""
        with self.cv:
            c = self._cohort(cid, opened, size)
            c["expected"] = max(c["expected"], n)
            self.cv.notify_all()

    def add(self, trial_id: str, cid: int, opened: float, size: int, trial_dict: dict, state: dict | None = None,
            weights: bytes | None = None) -> dict:
        """A member joins cohort ``cid``: its Fit is built here (and restored when it resumes)."""
        import io

        import ray

        from tl_sweep.contract import TrialConfig
        from tl_sweep.train import Fit

        trial = TrialConfig.from_tune(trial_dict)
        with self.lock:  # the build seeds the global generator: never while another build or a round uses it
            fit = Fit(self.ctx, trial, self.device, weights_file=io.BytesIO(weights) if weights else None)
            if state is not None:
                fit.restore(state)
        with self.cv:
            self._cohort(cid, opened, size)
            self.fits[trial_id], self.cohort_of[trial_id] = fit, cid
            self.cv.notify_all()
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []  # (a Worker used outside Ray starts none)
        return {"steps": fit.steps, "device": "cuda:0" if self.device.type == "cuda" else "cpu",
                "gpu_ids": ",".join(str(g) for g in gpus)}

    def leave(self, trial_id: str) -> None:
        with self.cv:
            cid = self.cohort_of.pop(trial_id, None)
            for d in (self.fits, self.asked, self.done, self.rungs):
                d.pop(trial_id, None)
            if cid is not None and cid not in self.cohort_of.values():
                self.cohorts.pop(cid, None)
            self.cv.notify_all()

    def _ready(self, cid: int, now: float) -> bool:
        """Whether cohort ``cid``'s next round can start (called holding the condition)."""
        c = self.cohorts[cid]
        members = [t for t, x in self.cohort_of.items() if x == cid]
        asked = [self.asked[t] for t in members if t in self.asked]
        if c["rounds"] == 0:  # the first: every member handed this cohort is here, and it takes no more
            closed = c["expected"] >= c["size"] or now - c["opened"] >= OPEN_SECONDS
            if not (closed and len(members) >= c["expected"]) and now - c["opened"] < OPEN_SECONDS + START_WAIT:
                return False
        return len(asked) == len(members) or now - min(asked) >= ROUND_WAIT

    def epoch(self, trial_id: str, rungs: set[int]) -> dict:
        """Train this member's next epoch with every member of its cohort that asks in the same round; returns
        its metrics, the rung evaluations inside the epoch (at the steps ``rungs``: step, accuracy), its step count
        and feature-cache notes (or ``{"error": exception}``: this member failed).

        A round starts when every member of the cohort has asked, or ``ROUND_WAIT`` after the first ask; the
        first round also waits until the cohort is closed to new members and all of them have joined, so its
        members start in step."""
        with self.cv:
            self.asked[trial_id], self.rungs[trial_id] = time.time(), rungs
            self.cv.notify_all()
            cid = self.cohort_of[trial_id]
            while trial_id not in self.done:
                if trial_id in self.asked and self._ready(cid, time.time()) and self.lock.acquire(blocking=False):
                    break
                self.cv.wait(timeout=0.05)
            else:
                return self.done.pop(trial_id)
            batch = {t: self.fits[t] for t, x in self.cohort_of.items() if x == cid and t in self.asked}
            for t in batch:
                del self.asked[t]
            self.cohorts[cid]["rounds"] += 1
        try:  # this thread trains the round, outside the condition so members can still ask and leave
            results = self._round(batch)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory in the shared forward: every member's failure
            results = {t: {"error": e} for t in batch}
        finally:
            self.lock.release()
        with self.cv:
            self.done.update(results)
            self.cv.notify_all()
            return self.done.pop(trial_id)

    def _round(self, batch: dict[str, Any]) -> dict[str, dict]:
        """Members grouped by what their batches depend on; each group trains one epoch together."""
        from tl_sweep.train import epoch_together

        groups: dict[tuple, list[str]] = {}
        for t, f in batch.items():
            groups.setdefault((f.n_epochs, f.trial.batch_size,
                               hashlib.sha1(f.gen.get_state().numpy().tobytes()).hexdigest()), []).append(t)
        self.rounds += 1
        out = {}
        for members in groups.values():
            self.shared += len(members) - 1
            fits = [batch[t] for t in members]
            evals: dict[str, list] = {t: [] for t in members}
            hooks = [self._hook(batch[t], evals[t], self.rungs.get(t, set())) for t in members]
            at = [set(self.rungs.get(t, set())) for t in members]
            for t, r in zip(members, epoch_together(fits, hooks, at)):
                f = batch[t]
                out[t] = {"error": r} if isinstance(r, BaseException) else {
                    "metrics": {**r, "cohort_members": float(len(members))}, "rungs": evals[t],
                    "step_count": f.step_count, "n_epochs": f.n_epochs, "notes": list(f.notes)}
        return out

    @staticmethod
    def _hook(fit, evals: list, rungs: set[int]):
        """A rung inside an epoch: the member's validation accuracy at that step, reported after the epoch."""
        if not rungs:
            return None
        per_epoch = fit.steps // fit.trial.epochs

        def at(step: int) -> None:
            if step in rungs and step % per_epoch:
                evals.append((step, fit.evaluate_mid_epoch("val")[1]))
        return at

    def call(self, trial_id: str, method: str, *args) -> Any:
        """Another method of a member's Fit (evaluate, state, restore...), run here on its own Fit."""
        fit = self.fits[trial_id]
        if method == "weights":
            return {k: v.detach().to("cpu", copy=True) for k, v in fit.model.state_dict().items()}
        if method == "load":
            return fit.model.load_state_dict(args[0])
        return getattr(fit, method)(*args)

    def stats(self) -> dict:
        return {"rounds": self.rounds, "shared": self.shared, "members": len(self.fits)}


class Member:
    """A trial's handle on its Fit in a cohort: what ``run_trial`` calls on a local ``Fit``."""

    def __init__(self, registry, ctx, trial, trial_id: str, weights: bytes | None = None):
        import ray

        self.ray, self.registry, self.trial_id = ray, registry, trial_id
        self.worker, self.cid, opened, size = ray.get(registry.join.remote(key_of(trial)))
        got = ray.get(self.worker.add.remote(trial_id, self.cid, opened, size, trial.to_tune(), None, weights))
        self.steps, self.step_count, self.n_epochs, self.notes = got["steps"], 0, 0, []
        self.where_ = {Tag.DEVICE: got["device"], Tag.COHORT: str(self.cid),
                       **({Tag.GPU_IDS: got["gpu_ids"]} if got["gpu_ids"] else {})}
        self.first_step_at = self.first_step_wall = None
        self.model = self  # run_trial reads fit.model.state_dict() / load_state_dict()

    def _call(self, method: str, *args):
        return self.ray.get(self.worker.call.remote(self.trial_id, method, *args))

    def restore(self, state: dict) -> None:
        self._call("restore", state)
        self.step_count, self.n_epochs = state["step_count"], state["n_epochs"]

    def epoch(self, after_step=None, at_steps=None) -> dict[str, float]:
        """:meth:`tl_sweep.train.Fit.epoch`, trained in the cohort's worker: ``after_step(step, accuracy)`` is called
        for each of ``at_steps`` inside the epoch once the epoch is over (the worker measured them at the step)."""
        if self.first_step_at is None:
            self.first_step_at, self.first_step_wall = time.perf_counter(), time.time()
        got = self.ray.get(self.worker.epoch.remote(self.trial_id, set(at_steps or ())))
        if "error" in got:
            raise got["error"]
        self.step_count, self.n_epochs, self.notes = got["step_count"], got["n_epochs"], got["notes"]
        if after_step is not None:  # the rungs inside the epoch, reported now in order
            for step, acc in got["rungs"]:
                after_step(step, acc)
        return got["metrics"]

    def evaluate(self, split: str) -> tuple[float, float]:
        return self._call("evaluate", split)

    def predictions(self, split: str) -> dict[str, list]:
        return self._call("predictions", split)

    def state(self) -> dict:
        return self._call("state")

    def state_dict(self) -> dict:
        return self._call("weights")

    def weights(self, copy: bool = True) -> dict:
        """The member's weights, copied out of its worker (always a copy)."""
        return self._call("weights")

    def where(self) -> dict[str, str]:
        """The device, GPUs and cohort its worker trains it on (the trial run's tags)."""
        return self.where_

    def load_state_dict(self, state: dict) -> None:
        self._call("load", state)

    def leave(self) -> None:
        try:
            self.worker.leave.remote(self.trial_id)
            self.registry.leave.remote(self.cid)
        except Exception:  # noqa: BLE001 - the sweep is ending; the registry takes its cohorts with it
            pass
