"""The trial: build, freeze, fine-tune for ``epochs`` epochs, report each epoch, keep the best checkpoint.

``run_trial(config, ctx)`` is the Ray Tune trainable. ``config`` is the flat trial config that Optuna
sampled (the search-space dimensions: ``batch_size, optimizer, lr_mult, head_lr_mult, weight_decay,
layer_decay, unfrozen_blocks, epochs``); ``ctx`` is the sweep's :class:`TrialContext`, shipped once through
the object store. The same :func:`fit` loop pretrains the built-in source models.

Learning rate: ``lr = REFERENCE_LR[optimizer] × lr_mult × batch_size / 256`` for the unfrozen blocks, times
``head_lr_mult`` for the new head (times ``layer_decay**distance`` per block below the head when layer
decay is on). The schedule is a per-step cosine from ``lr`` to 0 over the trial's *own* epochs.

Each epoch reports ``progress = epoch × min_epochs / epochs`` (the fraction of the trial's own schedule,
in epochs of the shortest schedule): ASHA compares trials at equal schedule phase, not at equal epoch
count (see docs/search.md).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_sweep import features, models, tracking
from tl_sweep.data import Augmenter, Prepared

# Reference learning rates at batch size 256 (lr_mult = 1): the torchvision ImageNet recipe for SGD,
# the usual 1e-3 for the adaptive methods.
REFERENCE_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}
METRIC = "val_acc"  # maximised; reported every epoch


class TrialError(RuntimeError):
    """A trial that cannot go on (e.g. its loss became NaN); it ends FAILED with this reason."""


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled config, resolved once on the driver."""

    arch: str
    arms: dict[str, tuple[str, str | None]]  # arm name -> (model.weights, resolved checkpoint file or None)
    head: str
    head_hidden: int
    head_dropout: float
    regime: dict[str, Any]
    input: dict[str, Any]
    augment: dict[str, Any]
    data: Prepared
    seed: int
    min_epochs: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    use_gpu: bool
    feature_cache: bool = True  # reuse a frozen prefix's output (tl_sweep.features)
    memory_limit: int | None = None  # bytes a CPU trial's process may hold (resources.memory_gb)
    precision: str = "auto"  # resources.precision: auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32
    gpu_share: float = 0.0  # resources.gpu: a fraction < 1 also caps the trial's share of GPU memory
    checkpoint_every: int = 0  # epochs between Tune checkpoints (0: none)
    blobs: dict[str, bytes] = field(default_factory=dict)  # arm -> checkpoint bytes, for nodes without the file


def learning_rate(optimizer: str, lr_mult: float, batch_size: int) -> float:
    return REFERENCE_LR[optimizer] * lr_mult * batch_size / 256


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.RMSprop(groups, lr=lr, momentum=0.9, alpha=0.9, eps=1e-3)


def cosine(total_steps: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


class Batches:
    """Mini-batches of one split: rows of an array (the memory-mapped uint8 image cache, or stored features).

    ``x[rows]`` are the split's inputs; on a GPU they are copied to the device once and batches are sliced
    there. Batches are drawn by position in the sorted row order, so images and their cached features
    come in the same order for the same generator.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device, rows: np.ndarray | None = None):
        self.device, self.x = device, x
        self.rows = np.arange(len(y)) if rows is None else rows
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        if device.type == "cuda":  # uint8 images and features are small: keep the split on the GPU
            self.x = features.to_tensor(x[self.rows]).to(device)
            self.rows = np.arange(len(self.rows))
            self.y = self.y.to(device)

    @classmethod
    def of(cls, data: Prepared, split: str, device: torch.device) -> Batches:
        x, y, rows = data.split(split)
        order = np.argsort(rows)  # sorted rows read the memmap sequentially
        return cls(x, y[order], device, rows[order])

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, batch_size: int, shuffle: bool, gen: torch.Generator | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.rows)
        order = torch.randperm(n, generator=gen).numpy() if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = np.sort(order[start:start + batch_size])
            if self.device.type == "cuda":
                t = torch.from_numpy(idx).to(self.device)
                yield self.x[t], self.y[t]
            else:
                yield features.to_tensor(self.x[self.rows[idx]]), self.y[idx]


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if binary:
        logits = logits.squeeze(1)
        return F.binary_cross_entropy_with_logits(logits.float(), y.float()), ((logits > 0).long() == y).sum()
    return F.cross_entropy(logits.float(), y), (logits.argmax(1) == y).sum()


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on a GPU (``auto``), or wherever ``precision: bf16`` asks for it; else fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(forward: Callable, batches: Batches, transform: Callable, binary: bool, batch_size: int = 256,
             precision: str = "auto") -> tuple[float, float]:
    """Mean loss and accuracy of ``forward(transform(x))`` over a split (the caller sets eval mode)."""
    total_loss, correct = 0.0, 0
    for x, y in batches(batch_size, shuffle=False):
        with autocast(batches.device, precision):
            logits = forward(transform(x.to(batches.device, non_blocking=True)))
        loss, c = loss_and_correct(logits, y.to(batches.device), binary)
        total_loss += loss.item() * len(y)
        correct += int(c)
    return total_loss / len(batches), correct / len(batches)


def depth_at(regime: dict[str, Any], final: int, epoch: int) -> int:
    """Unfrozen blocks during ``epoch`` (1-based) under a regime; ``final`` is ``unfrozen_blocks``."""
    kind = regime.get("kind", "fixed")
    if kind == "progressive":
        return min(final, regime["start"] + (epoch - 1) // regime["every"])
    if kind == "lp_ft":
        return 0 if epoch <= regime["probe_epochs"] else final
    return final


class Fit:
    """A model being fine-tuned: :meth:`epoch` trains one epoch at the regime's depth for that epoch."""

    def __init__(self, ctx: TrialContext, params: dict[str, Any], device: torch.device):
        seed = int(params.get("seed", ctx.seed))
        torch.manual_seed(seed)
        self.ctx, self.params, self.device = ctx, params, device
        arm = params.get("arm", next(iter(ctx.arms)))
        weights, weights_file = ctx.arms[arm]
        if arm in ctx.blobs:  # another node of a cluster: the checkpoint came through the object store
            weights_file = io.BytesIO(ctx.blobs[arm])
        self.model = models.build(ctx.arch, len(ctx.data.classes), weights=weights,
                                  weights_file=weights_file, head=ctx.head, image_size=ctx.input["crop"],
                                  hidden=ctx.head_hidden, dropout=ctx.head_dropout).to(device)
        if device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest kernels (torchvision's recipe)
            self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.part = models.partition(self.model, ctx.arch)
        self.batch_size = int(params["batch_size"])
        self.lr = learning_rate(params["optimizer"], float(params["lr_mult"]), self.batch_size)
        self.batches = {"train": Batches.of(ctx.data, "train", device)}
        self.steps = math.ceil(len(self.batches["train"]) / self.batch_size) * int(params["epochs"])
        self.step_count, self.depth, self.n_epochs, self.first_step_at = 0, None, 0, None
        self.gen = torch.Generator().manual_seed(seed)
        self.aug = Augmenter(crop=ctx.input["crop"], mean=ctx.input["mean"], std=ctx.input["std"], device=device,
                             generator=self.gen, **ctx.augment)
        self.binary = ctx.head == "binary"
        self.deterministic = not ctx.augment.get("enabled", True)  # training sees the eval transform
        self.weights = (weights, weights_file, seed)
        self.split: features.Split | None = None
        self.cached: dict[str, Batches | None] = {}
        self.notes: list[str] = []  # what the feature cache did, per depth (a tag of the MLflow run)

    def set_depth(self, k: int, scale: float | None = None) -> None:
        """Freeze all but the head and the last ``k`` blocks; a new optimizer continues the cosine schedule.

        After the first change of depth (progressive unfreezing, LP-FT) the LR is ``ft_lr_mult`` × lr.
        """
        if scale is None:
            scale = 1.0 if self.depth is None else float(self.ctx.regime.get("ft_lr_mult", 1.0))
        self.depth, self.scale, self.offset = k, scale, self.step_count
        self.frozen = models.freeze(self.model, self.part, k)
        self.split, self.cached = None, {}
        if self.ctx.feature_cache and k < len(self.part):
            got = features.split(self.model, self.frozen)
            self.split = got if isinstance(got, features.Split) else None
            self.notes.append(f"k={k}: " + (f"cut after {got.cut}" if self.split else f"off, {got}"))
        p = self.params
        lr = self.lr * scale
        groups = models.param_groups(self.model, self.part, self.frozen, lr=lr,
                                     weight_decay=float(p["weight_decay"]), head_lr_mult=float(p["head_lr_mult"]),
                                     layer_decay=float(p["layer_decay"]))
        self.optimizer = make_optimizer(p["optimizer"], groups, lr)
        offset, curve = self.offset, cosine(self.steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: curve(s + offset))

    def state(self) -> dict[str, Any]:
        """Everything needed to continue this fit exactly where it is (a Tune checkpoint's content).

        Only tensors of blocks trained so far (and the head) are saved: frozen blocks still hold the weights
        the trial started from, which a restore rebuilds anyway. A linear probe's checkpoint is tiny.
        """
        first = len(self.part) - self.depth
        changed = {k: v for k, v in self.model.state_dict().items()
                   if (b := self.part.block_of(k)) is None or b >= first}
        return {"model": changed, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "depth": self.depth, "scale": self.scale,
                "offset": self.offset, "step_count": self.step_count, "n_epochs": self.n_epochs,
                "gen": self.gen.get_state()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.step_count = state["offset"]
        self.set_depth(state["depth"], state["scale"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step_count, self.n_epochs = state["step_count"], state["n_epochs"]
        self.gen.set_state(state["gen"])

    def _batches(self, split: str) -> Batches:
        if split not in self.batches:
            self.batches[split] = Batches.of(self.ctx.data, split, self.device)
        return self.batches[split]

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_cuda else x

    def view(self, split: str) -> tuple[Batches, Callable, Callable]:
        """``(batches, transform, forward)`` for ``split`` under the deterministic (eval) transform.

        With a frozen prefix that can be cut off (:mod:`tl_sweep.features`), the batches are the prefix's
        stored features and ``forward`` is the suffix alone; otherwise images, centre crop, the whole model.
        """
        if self.split is not None:
            if split not in self.cached:
                self.cached[split] = self._features(split)
            if self.cached[split] is not None:
                return self.cached[split], self._channels_last, self.split.suffix
        return self._batches(split), lambda x: self._channels_last(self.aug.eval(x)), self.model

    def _features(self, split: str) -> Batches | None:
        """The frozen prefix's output for every image of ``split``: from the node's store, or computed now."""
        src, dev, prefix, c = self._batches(split), self.device, self.split.prefix, self.ctx
        self.model.eval()
        with torch.no_grad(), autocast(dev, c.precision):
            one = prefix(self.aug.eval(next(src(1, shuffle=False))[0].to(dev)))
        size = one.element_size() * one.numel() * len(src)
        if size > features.MAX_BYTES:
            self.notes.append(f"{split} not cached ({size / 2**30:.1f} GiB > {features.MAX_BYTES / 2**30:.0f} GiB)")
            return None

        @torch.no_grad()
        def compute() -> torch.Tensor:
            with autocast(dev, c.precision):
                return torch.cat([prefix(self._channels_last(self.aug.eval(x.to(dev, non_blocking=True))))
                                  for x, _ in src(256, shuffle=False)])

        inp = c.input
        rows = self.ctx.data.index[split]
        name = features.key(c.arch, features.weights_id(*self.weights), len(self.part) - self.depth, self.split.cut,
                            c.data.fingerprint, split, hashlib.sha1(np.asarray(rows).tobytes()).hexdigest(),
                            inp["crop"], tuple(inp["mean"]), tuple(inp["std"]), dev.type, c.precision,
                            torch.__version__)
        arr, reused = features.load_or_compute(Path(c.data.cache).parent / "features", name, compute,
                                               log=self.notes.append)
        self.notes.append(f"{split} {tuple(one.shape[1:])} {'reused' if reused else 'computed'}")
        return Batches(arr, src.y.cpu().numpy(), dev)

    def evaluate(self, split: str) -> tuple[float, float]:
        """Loss and accuracy on ``split`` (eval mode, deterministic transform, stored features when cut)."""
        batches, transform, forward = self.view(split)
        self.model.eval()
        return evaluate(forward, batches, transform, self.binary, precision=self.ctx.precision)

    def epoch(self) -> dict[str, float]:
        self.n_epochs += 1
        k = depth_at(self.ctx.regime, int(self.params["unfrozen_blocks"]), self.n_epochs)
        if k != self.depth:
            self.set_depth(k)
        dev = self.device
        if self.first_step_at is None:  # start-up ends where training work begins (features included)
            self.first_step_at, self.first_step_wall = time.perf_counter(), time.time()
        if self.deterministic:
            batches, transform, forward = self.view("train")
        else:
            batches, forward = self.batches["train"], self.model
            transform = lambda x: self._channels_last(self.aug.train(x))
        self.frozen.train_mode(self.model)
        total, seen, t0 = 0.0, 0, time.perf_counter()
        for x, y in batches(self.batch_size, shuffle=True, gen=self.gen):
            x, y = transform(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True)
            with autocast(dev, self.ctx.precision):
                loss, _ = loss_and_correct(forward(x), y, self.binary)
            if not torch.isfinite(loss):
                raise TrialError(f"loss became {loss.item()} at epoch {self.n_epochs} (lower lr_mult)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            self.step_count += 1
            total += loss.item() * len(y)
            seen += len(y)
        secs = time.perf_counter() - t0
        return {"train_loss": total / seen, "train_img_per_s": seen / secs, "epoch_seconds": secs,
                "trainable_blocks": float(k)}


def trial_name(arch: str, params: dict[str, Any]) -> str:
    """A readable run name: ``resnet18·k=2·sgd·bs32``."""
    return f"{arch}·k={params['unfrozen_blocks']}·{params['optimizer']}·bs{params['batch_size']}"


def device_for(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune trainable: one fine-tuning trial, one nested MLflow run.

    ``config`` holds the search dimensions plus ``arm`` (which weights), and for the final evaluation of a
    study ``seed`` and ``final: True``: only then is the test split read, once, with the best-epoch model.

    Everything is written before ``tune.report``: a scheduler's stop arrives inside ``tune.report`` and the
    actor is killed right after, so nothing may depend on code after it. The best checkpoint is logged when
    it improves; the driver (``runner.Progress``) closes the run with its final status from ``mlflow_run_id``.

    Resume: every ``checkpoint_every`` epochs the whole fit state goes into a Tune checkpoint with the MLflow
    run id. A restarted trial (``--resume``, a lost worker) continues from it in the same MLflow run and does
    not log an epoch twice.
    """
    import logging

    import ray
    from ray import tune

    entered = time.perf_counter()
    # one "Checkpoint successfully created" INFO line per epoch per trial would bury the progress lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    params = dict(config.get("cfg", config))  # a study's final re-trainings come as a grid of whole configs
    arm = params.setdefault("arm", next(iter(ctx.arms)))
    params.setdefault("seed", ctx.seed)
    final = bool(params.pop("final", False))
    device = device_for(ctx.use_gpu)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if device.type == "cuda" and 0 < ctx.gpu_share < 1:  # trials sharing a GPU: one that outgrows its share
        torch.cuda.set_per_process_memory_fraction(ctx.gpu_share)  # fails out of memory, not its neighbours
    weights = ctx.arms[arm][0]
    trial_id = tune.get_context().get_trial_id()
    resumed = _read_checkpoint(tune.get_checkpoint())
    run = tracking.TrialRun.start(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id,
        name=trial_name(ctx.arch, params) + (f"·{arm}" if len(ctx.arms) > 1 else "") + (
            f"·seed{params['seed']}" if final else ""),
        params={**params, "arch": ctx.arch, "weights": weights},
        tags={"tl_sweep.trial_id": trial_id, "tl_sweep.role": "final" if final else "trial",
              "tl_sweep.node": ray.get_runtime_context().get_node_id(),
              "tl_sweep.arm": arm, "tl_sweep.source": weights, "tl_sweep.depth": str(params["unfrozen_blocks"])},
        run_id=resumed["run_id"] if resumed else None)
    epochs = int(params["epochs"])
    logged = run.last_step()
    if run.previous == "FINISHED" and logged >= epochs:  # done before a killed driver could record it
        tune.report({**run.metrics, "epoch": logged, "progress": ctx.min_epochs, "mlflow_run_id": run.run_id})
        return
    fit, best = None, -1.0
    limit = MemoryLimit(ctx.memory_limit if device.type == "cpu" else None)
    try:
        fit = Fit(ctx, params, device)
        best_state, first = None, 1
        if resumed:
            fit.restore(resumed["fit"])
            best, best_state, first = resumed["best"], resumed["best_state"], resumed["epoch"] + 1
        with tempfile.TemporaryDirectory() as tmp:
            for epoch in range(first, epochs + 1):
                metrics = fit.epoch()
                if epoch == first:  # model build, weights, MLflow run, data: what a trial pays before training
                    metrics["startup_seconds"] = fit.first_step_at - entered
                metrics["val_loss"], metrics["val_acc"] = fit.evaluate("val")
                if metrics["val_acc"] > best:
                    best = metrics["val_acc"]
                    if final:  # only a final re-training needs the best weights again (for the test split)
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in fit.model.state_dict().items()}
                    path = Path(tmp) / "best.pt"
                    torch.save({"model": fit.model.state_dict(), "arch": ctx.arch, "classes": list(ctx.data.classes),
                                "params": params, "epoch": epoch, "val_acc": best, "head": ctx.head}, path)
                    run.log_artifact(path)
                metrics["best_val_acc"] = best
                if final and epoch == epochs:  # the held-out test split, once, with the best-val checkpoint
                    fit.model.load_state_dict(best_state)
                    metrics["test_loss"], metrics["test_acc"] = fit.evaluate("test")
                if epoch > logged:
                    run.log_epoch(epoch, metrics, {"tl_sweep.feature_cache": "; ".join(fit.notes)[:5000]}
                                  if fit.notes else None)
                checkpoint = None
                every = ctx.checkpoint_every
                if every and epoch < epochs and epoch % every == 0:
                    checkpoint = _write_checkpoint(Path(tmp) / "resume", {
                        "fit": fit.state(), "best": best, "best_state": best_state,
                        "epoch": epoch, "run_id": run.run_id})
                # first_step_unix: the driver measures scheduling -> first step (runner.Progress)
                tune.report({**metrics, "epoch": epoch, "progress": epoch * ctx.min_epochs / epochs,
                             "mlflow_run_id": run.run_id,
                             **({"first_step_unix": fit.first_step_wall} if epoch == first else {})},
                            checkpoint=checkpoint)
    except SystemExit:  # the scheduler stopped this trial; the driver records it
        raise
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised for Tune to mark (and maybe retry) it
        limit.restore()
        failure = deterministic_failure(e, params, ctx)
        if failure is None:
            run.end("FAILED", tags={"tl_sweep.error": f"{type(e).__name__}: {e}"[:500]})
            raise
        # a NaN loss, out of memory: a retry would fail the same way, so the trial ends here
        kind, reason = failure
        traceback.clear_frames(e.__traceback__)  # the failed step's tensors go now, not with the exception
        epochs_done, fit = (fit.n_epochs if fit else 0), None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        limit.give_back()
        if isinstance(e, TrialOutOfMemory):
            cause = f" [held {limit.held / 2**30:.2f} GiB, past resources.memory_gb {limit.limit / 2**30:g}]"
        else:
            cause = "" if kind == "TrialError" else f" [{type(e).__name__}: {str(e).strip()[:200]}]"
        run.end("FAILED", tags={"tl_sweep.error": f"{kind}: {reason}{cause}"[:700], "tl_sweep.failure": kind})
        # the metric must be there for the searcher; 0 at the end of the schedule ranks it worst
        tune.report({"trial_error": reason, "val_acc": 0.0, "best_val_acc": max(best, 0.0), "epoch": epochs_done,
                     "progress": ctx.min_epochs, "mlflow_run_id": run.run_id})
    finally:
        limit.restore()


def deterministic_failure(e: BaseException, params: dict[str, Any], ctx: TrialContext) -> tuple[str, str] | None:
    """``(kind, reason)`` for failures a retry would repeat (NaN loss, out of memory); ``None`` otherwise."""
    if isinstance(e, TrialError):
        return "TrialError", str(e)
    oom = isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
    if not oom:
        return None
    return "OutOfMemory", (f"out of memory (batch_size {params['batch_size']}, {ctx.input['crop']}px, "
                           f"{params['unfrozen_blocks']} unfrozen blocks): lower batch_size or data.image_size, "
                           f"or give trials more memory (resources.memory_gb, fewer trials per GPU)")


class TrialOutOfMemory(MemoryError):
    """A CPU trial grew past ``resources.memory_gb`` (raised in the trial's thread by :class:`MemoryLimit`)."""


class MemoryLimit:
    """``resources.memory_gb`` on a CPU trial: the most memory its worker process may hold.

    A watcher thread reads the process's anonymous resident memory (``RssAnon``: tensors, not the
    memory-mapped image cache) every 10 ms; past the budget it raises :class:`TrialOutOfMemory` in the trial's
    thread (``PyThreadState_SetAsyncExc``: delivered as soon as the running operation returns), so the trial
    ends FAILED as out of memory and frees what it held, instead of the kernel's OOM killer ending a worker
    that other trials share. A soft limit: one operation may overshoot before it is stopped. (A hard
    ``RLIMIT_DATA`` was tried first: Ray's own threads then failed their allocations too and aborted.)
    """

    def __init__(self, nbytes: int | None):
        import threading

        self.stop, self.thread, self.held, self.limit = threading.Event(), None, 0, nbytes or 0
        if nbytes and os.path.exists("/proc/self/status"):
            self.target = threading.get_ident()
            self.thread = threading.Thread(target=self._watch, name="tl-sweep-memory", daemon=True)
            self.thread.start()

    @staticmethod
    def rss_anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def _watch(self) -> None:
        import ctypes

        while not self.stop.wait(0.01):
            self.held = self.rss_anon()
            if self.held > self.limit:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target),
                                                           ctypes.py_object(TrialOutOfMemory))
                return

    def restore(self) -> None:
        import ctypes

        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None  # and drop an exception not delivered yet
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target), None)

    @staticmethod
    def give_back() -> None:
        """Return freed heap to the OS (glibc), so a reused worker starts its next trial small."""
        import ctypes
        import ctypes.util

        try:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        except (OSError, AttributeError, TypeError):
            pass


def _write_checkpoint(folder: Path, state: dict[str, Any]):
    from ray.tune import Checkpoint

    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "trial.pt")
    return Checkpoint.from_directory(str(folder))


def _read_checkpoint(checkpoint) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / "trial.pt", map_location="cpu", weights_only=True)


def fit_plain(ctx: TrialContext, params: dict[str, Any], log=print) -> tuple[nn.Module, float]:
    """The same epoch loop without Ray or MLflow: used to pretrain the built-in source models."""
    device = device_for(ctx.use_gpu)
    fit = Fit(ctx, params, device)
    acc = 0.0
    for epoch in range(1, int(params["epochs"]) + 1):
        m = fit.epoch()
        _, acc = fit.evaluate("val")
        log(f"  epoch {epoch}: train_loss {m['train_loss']:.3f}  val_acc {acc:.3f}  "
            f"({m['train_img_per_s']:.0f} img/s)")
    return fit.model, acc
