"""The epoch loop, in the shape of torchvision's reference ``train.py``: ``train_one_epoch`` and ``evaluate``,
plus :class:`Fit`, a model being fine-tuned at a depth (no Ray, no MLflow: :mod:`tl_sweep.trainable` wraps it
for Ray Tune, :mod:`tl_sweep.sources` uses it to pretrain source models).

Learning rate: ``contract.learning_rate`` (``REFERENCE_LR[optimizer] × lr_mult × batch_size / 256``) for the
unfrozen blocks, times ``head_lr_mult`` for the new head (times ``layer_decay**distance`` per block below the head
when layer decay is on). The schedule is a per-step cosine from ``lr`` to 0 over the trial's *own* epochs.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Collection, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_sweep import features, models
from tl_sweep.contract import TrialConfig, TrialContext, learning_rate
from tl_sweep.data import Augmenter, Prepared, to_device



class TrialError(RuntimeError):
    """A trial that cannot go on (e.g. its loss became NaN); it ends FAILED with this reason."""


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


def precision_of(device: torch.device, precision: str = "auto") -> str:
    """``bf16`` or ``fp32``: ``auto`` is bf16 on a GPU and fp32 on a CPU.

    Not bf16 on a CPU by default, even one with AVX512-BF16 where 64 px steps are 1.6× faster: with torch
    2.14.1 on this project's CPU, a stride-2 conv's bf16 weight gradient on a 1×1 map is garbage on the taps
    that see only padding (17 of 30 runs; ResNets at 16 px), and at 32 px bf16 was no faster (BENCHMARKS.md)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where :func:`precision_of` says bf16; else fp32 (no autocast)."""
    if precision_of(device, precision) == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def depth_at(regime: dict[str, Any], final: int, epoch: int) -> int:
    """Unfrozen blocks during ``epoch`` (1-based) under a regime; ``final`` is ``unfrozen_blocks``."""
    kind = regime.get("kind", "fixed")
    if kind == "progressive":
        return min(final, regime["start"] + (epoch - 1) // regime["every"])
    if kind == "lp_ft":
        return 0 if epoch <= regime["probe_epochs"] else final
    return final


def device_for(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


_ON_DEVICE: dict[tuple, torch.Tensor] = {}  # per process: (file, rows, device) -> a split's inputs on the GPU
ON_DEVICE_KEEP = 2 << 30  # bytes kept for the worker's next trials (least recently used go first)


def on_device(x: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """``x[rows]`` on ``device``, kept for the worker's next trials when ``x`` is a file (the image cache or
    stored features): a reused worker's trials on the same split copy it to the GPU once."""
    name = getattr(x, "filename", None)
    if name is None:
        return features.to_tensor(x[rows]).to(device)
    import hashlib

    key = (str(name), hashlib.sha1(np.ascontiguousarray(rows).tobytes()).hexdigest(), str(device))
    if key in _ON_DEVICE:
        _ON_DEVICE[key] = _ON_DEVICE.pop(key)  # most recently used last
    else:
        _ON_DEVICE[key] = features.to_tensor(x[rows]).to(device)
        while len(_ON_DEVICE) > 1 and kept_bytes() > ON_DEVICE_KEEP:
            _ON_DEVICE.pop(next(iter(_ON_DEVICE)))
    return _ON_DEVICE[key]


def kept_bytes() -> int:
    """Bytes of the splits this process keeps on its GPU (:func:`on_device`)."""
    return sum(t.nbytes for t in _ON_DEVICE.values())


class Batches:
    """Mini-batches of one split: rows of an array (the memory-mapped uint8 image cache, or stored features).

    ``x[rows]`` are the split's inputs; on a GPU they are copied to the device once and batches are sliced
    there. Batches are drawn by position in the sorted row order, so images and their cached features
    come in the same order for the same generator.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device, rows: np.ndarray | None = None):
        self.device, self.x = device, x
        self.rows = np.arange(len(y)) if rows is None else rows
        self.ids = self.rows  # which image each position is (its row of the image cache), wherever x lives
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        if device.type == "cuda":  # uint8 images and features are small: keep the split on the GPU
            self.x = on_device(x, self.rows, device)
            self.rows = np.arange(len(self.rows))
            self.y = self.y.to(device)

    @classmethod
    def of(cls, data: Prepared, split: str, device: torch.device) -> Batches:
        x, y, rows = data.split(split)
        order = np.argsort(rows)  # sorted rows read the memmap sequentially
        return cls(x, y[order], device, rows[order])

    def __len__(self) -> int:
        return len(self.rows)

    def _end(self, batch_size: int, shuffle: bool) -> int:
        """Where batches stop: a shuffled (training) pass drops a trailing batch of one image, which a
        BatchNorm in train mode cannot normalise (it is a different image each epoch)."""
        n = len(self.rows)
        return n - 1 if shuffle and n > 1 and n % batch_size == 1 else n

    def steps(self, batch_size: int) -> int:
        """Optimizer steps in one training pass."""
        return math.ceil(self._end(batch_size, True) / batch_size)

    def __call__(self, batch_size: int, shuffle: bool, gen: torch.Generator | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.rows)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        end = self._end(batch_size, shuffle)
        if self.device.type == "cuda":  # the epoch's order copied once; batches are cut on the device
            order = to_device(order, self.device)
            for start in range(0, end, batch_size):
                idx = order[start:start + batch_size].sort().values
                yield self.x[idx], self.y[idx]
            return
        order = order.numpy()
        for start in range(0, end, batch_size):
            idx = np.sort(order[start:start + batch_size])
            yield features.to_tensor(self.x[self.rows[idx]]), self.y[idx]


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor, binary: bool, label_smoothing: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (cross-entropy, or BCE for a binary head; with ``label_smoothing`` the targets move that share
    towards uniform) and the number right."""
    if binary:
        logits = logits.squeeze(1)
        target = y.float() * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else y.float()
        return F.binary_cross_entropy_with_logits(logits.float(), target), ((logits > 0).long() == y).sum()
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), (logits.argmax(1) == y).sum()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A GPU batch of images in channels-last order, as the model is (cuDNN's fastest convolutions); else ``x``."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_cuda else x


class LossSum:
    """An epoch's summed training loss, kept on the device: reading it makes the host wait for the GPU, so it
    is read only where a decision needs it (the epoch's end, a rung), not after every step."""

    def __init__(self, device: torch.device):
        self.total, self.seen = torch.zeros((), dtype=torch.float64, device=device), 0

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.total += loss.detach().double() * n
        self.seen += n

    def check(self, epoch: int) -> float:
        """The mean loss so far; a non-finite one raises :class:`TrialError` (a retry would diverge the same way)."""
        total = self.total.item()
        if not math.isfinite(total):
            raise TrialError(f"loss became {total} at epoch {epoch} (lower lr_mult)")
        return total / max(1, self.seen)


def train_step(forward: Callable, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, schedule, *,
               binary: bool, precision: str = "auto", label_smoothing: float = 0.0) -> torch.Tensor:
    """One optimizer step, the only one there is (a trial alone and a cohort's members take it alike): the forward
    under the precision rule's autocast, the loss, backward, the optimizer's and the schedule's step. Returns the
    batch's loss (on the device: reading it would make the host wait)."""
    with autocast(x.device, precision):
        loss, _ = loss_and_correct(forward(x), y, binary, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss


def train_one_epoch(forward: Callable, batches: Batches, transform: Callable, optimizer: torch.optim.Optimizer,
                    schedule, *, batch_size: int, gen: torch.Generator, binary: bool, precision: str = "auto",
                    label_smoothing: float = 0.0,
                    epoch: int = 0, after_step: Callable[[int], None] | None = None,
                    at_steps: Collection[int] | None = None) -> tuple[float, int, float]:
    """One pass over ``batches`` (the caller sets train mode); returns (mean loss, steps, seconds).

    ``after_step(n)`` runs after the epoch's n-th step: after every step, or only at ``at_steps`` (a scheduler's
    rung inside the epoch), once the loss so far is known to be finite. A non-finite loss raises
    :class:`TrialError` at the epoch's end (or at the next of ``at_steps``).
    """
    dev = batches.device
    losses, steps, t0 = LossSum(dev), 0, time.perf_counter()
    for x, y in batches(batch_size, shuffle=True, gen=gen):
        x, y = transform(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True)
        loss = train_step(forward, x, y, optimizer, schedule, binary=binary, precision=precision,
                          label_smoothing=label_smoothing)
        steps += 1
        losses.add(loss, len(y))
        if after_step is not None and (at_steps is None or steps in at_steps):
            if at_steps is not None:
                losses.check(epoch)
            after_step(steps)
    return losses.check(epoch), steps, time.perf_counter() - t0


@torch.no_grad()
def evaluate(forward: Callable, batches: Batches, transform: Callable, binary: bool, batch_size: int = 256,
             precision: str = "auto") -> tuple[float, float]:
    """Mean loss and accuracy of ``forward(transform(x))`` over a split (the caller sets eval mode)."""
    dev = batches.device
    total_loss, correct = torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.int64,
                                                                                       device=dev)
    for x, y in batches(batch_size, shuffle=False):  # summed on the device: one wait for the GPU, at the end
        with autocast(dev, precision):
            logits = forward(transform(x.to(dev, non_blocking=True)))
        loss, c = loss_and_correct(logits, y.to(dev), binary)
        total_loss += loss.double() * len(y)
        correct += c
    return total_loss.item() / len(batches), int(correct.item()) / len(batches)


@torch.no_grad()
def predict(forward: Callable, batches: Batches, transform: Callable, binary: bool, batch_size: int = 256,
            precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Per image of a split, in ``batches``' order: the predicted class and its probability (the caller sets eval
    mode)."""
    dev, labels, probs = batches.device, [], []
    for x, _ in batches(batch_size, shuffle=False):
        with autocast(dev, precision):
            logits = forward(transform(x.to(dev, non_blocking=True))).float()
        if binary:
            p1 = torch.sigmoid(logits.squeeze(1))
            labels.append((p1 > 0.5).long())
            probs.append(torch.where(p1 > 0.5, p1, 1 - p1))
        else:
            p, label = logits.softmax(1).max(1)
            labels.append(label)
            probs.append(p)
    return torch.cat(labels).cpu().numpy(), torch.cat(probs).cpu().numpy()


class Fit:
    """A model being fine-tuned: :meth:`epoch` trains one epoch at the regime's depth for that epoch.

    ``weights_file`` may be a path or a file-like object (a checkpoint shipped through Ray's object store).
    """

    def __init__(self, ctx: TrialContext, trial: TrialConfig, device: torch.device, weights_file=None):
        self.ctx, self.trial, self.device = ctx, trial, device
        self.data = ctx.data_for(trial.search)
        weights, file = ctx.weights_of(trial.arm)
        weights_file = weights_file if weights_file is not None else file
        self.model = models.build_seeded(ctx.arch, len(self.data.classes), trial.seed, weights=weights,
                                         weights_file=weights_file, head=ctx.head, image_size=ctx.input["crop"],
                                         hidden=ctx.head_hidden, dropout=ctx.head_dropout).to(device)
        if device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest kernels (torchvision's recipe)
            self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        # the global generator where this trial's own stream starts (dropout draws from it): a cohort keeps one
        # per member and puts it back around the member's steps, as if the member had the process to itself
        self.rng_state = torch.random.get_rng_state()
        self.cuda_rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.part = models.partition(self.model, ctx.arch)
        self.lr = learning_rate(trial.optimizer, trial.lr_mult, trial.batch_size)
        self.batches = {"train": Batches.of(self.data, "train", device)}
        self.steps = self.batches["train"].steps(trial.batch_size) * trial.epochs
        self.step_count, self.depth, self.n_epochs, self.first_step_at = 0, None, 0, None
        self.gen = torch.Generator().manual_seed(trial.seed)
        self.aug = Augmenter(crop=ctx.input["crop"], mean=ctx.input["mean"], std=ctx.input["std"], device=device,
                             generator=self.gen, **ctx.augment)
        self.binary = ctx.head == "binary"
        self.deterministic = not ctx.augment.get("enabled", True)  # training sees the eval transform
        self.start_weights = (weights, weights_file, trial.seed)  # what identifies the frozen weights (feature cache)
        self.split: features.Split | None = None
        self.cached: dict[str, Batches | None] = {}
        self.notes: list[str] = []  # what the feature cache did, per depth (a tag of the MLflow run)
        self.store_features = True  # False: prefix features are computed for this fit and not stored

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
        t = self.trial
        lr = self.lr * scale
        groups = models.param_groups(self.model, self.part, self.frozen, lr=lr, weight_decay=t.weight_decay,
                                     head_lr_mult=t.head_lr_mult, layer_decay=t.layer_decay)
        self.optimizer = make_optimizer(t.optimizer, groups, lr)
        offset, curve = self.offset, cosine(self.steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: curve(s + offset))

    def state(self) -> dict[str, Any]:
        """Everything needed to continue this fit exactly where it is (a resume checkpoint's content).

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
            self.batches[split] = Batches.of(self.data, split, self.device)
        return self.batches[split]

    def view(self, split: str) -> tuple[Batches, Callable, Callable]:
        """``(batches, transform, forward)`` for ``split`` under the deterministic (eval) transform.

        With a frozen prefix that can be cut off (:mod:`tl_sweep.features`), the batches are the prefix's
        stored features and ``forward`` is the suffix alone; otherwise images, centre crop, the whole model.
        """
        if self.split is not None:
            if split not in self.cached:
                self.cached[split] = self.prefix_features(split)
            if self.cached[split] is not None:
                return self.cached[split], channels_last, self.split.suffix
        return self._batches(split), lambda x: channels_last(self.aug.eval(x)), self.model

    def prefix_features(self, split: str) -> Batches | None:
        """The frozen prefix's output for every image of ``split`` (eval transform): from the node's store, or
        computed now (and stored unless ``store_features`` is off). What training at this depth reads, and what
        the transferability estimates score (:func:`tl_sweep.transferability.estimate`): one call for both.
        ``None`` when it would not fit the store (:data:`tl_sweep.features.MAX_BYTES`)."""
        src, dev, c = self._batches(split), self.device, self.ctx
        self.model.eval()
        name = None if not self.store_features else features.key_for(
            c.arch, features.weights_id(*self.start_weights, arch=c.arch), len(self.part) - self.depth, self.split.cut,
            self.data, split, c.input, dev.type, precision_of(dev, c.precision))
        arr = features.of_split(self.split.prefix, src, lambda x: channels_last(self.aug.eval(x)),
                                lambda: autocast(dev, c.precision), notes=self.notes, label=split,
                                folder=features.folder(self.data) if name else None, name=name)
        return None if arr is None else Batches(arr, src.y.cpu().numpy(), dev)

    def weights(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The model's weights to keep (the best epoch's): a detached copy on the CPU, or, with ``copy=False`` on a
        CPU (no later step will change them), the model's own tensors."""
        if not copy and self.device.type == "cpu":
            return self.model.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def where(self) -> dict[str, str]:
        """Where this fit trains, as the trial run's tags, when it is not the trial's own process (a cohort's)."""
        return {}

    def leave(self) -> None:
        """The trial ends (a cohort's member leaves its worker; a fit alone has nothing to give back)."""

    def evaluate(self, split: str) -> tuple[float, float]:
        """Loss and accuracy on ``split`` (eval mode, deterministic transform, stored features when cut)."""
        batches, transform, forward = self.view(split)
        self.model.eval()
        return evaluate(forward, batches, transform, self.binary, precision=self.ctx.precision)

    def predictions(self, split: str) -> dict[str, list]:
        """Per image of ``split``: its row of the image cache (the same image in every arm and seed of a search
        repeat), true label, predicted class and that class's probability (eval mode, deterministic transform)."""
        batches, transform, forward = self.view(split)
        self.model.eval()
        label, prob = predict(forward, batches, transform, self.binary, precision=self.ctx.precision)
        images = self._batches(split)
        return {"row": [int(r) for r in images.ids], "label": images.y.cpu().tolist(), "predicted": label.tolist(),
                "probability": [round(float(p), 6) for p in prob]}

    def evaluate_mid_epoch(self, split: str) -> tuple[float, float]:
        """:meth:`evaluate` between two steps of an epoch: train mode (frozen blocks in eval) comes back."""
        try:
            return self.evaluate(split)
        finally:
            self.frozen.train_mode(self.model)

    def epoch(self, after_step: Callable[[int], None] | None = None,
              at_steps: Collection[int] | None = None) -> dict[str, float]:
        """Train one epoch; returns its metrics (``train_loss``, ``train_img_per_s``, ``epoch_seconds``...).

        ``after_step(n)`` runs after the fit's n-th optimizer step (counted over the whole fit): after every
        step, or only at ``at_steps`` once the loss is known to be finite (see :func:`train_one_epoch`).
        """
        self.n_epochs += 1
        k = depth_at(self.ctx.regime, self.trial.unfrozen_blocks, self.n_epochs)
        if k != self.depth:
            self.set_depth(k)
        if self.first_step_at is None:  # start-up ends where training work begins (features included)
            self.first_step_at, self.first_step_wall = time.perf_counter(), time.time()
        if self.deterministic:
            batches, transform, forward = self.view("train")
        else:
            batches, forward = self.batches["train"], self.model
            transform = lambda x: channels_last(self.aug.train(x))  # noqa: E731
        self.frozen.train_mode(self.model)
        start = self.step_count
        hook = None if after_step is None else (lambda i: after_step(start + i))
        local = None if at_steps is None else {s - start for s in at_steps if s > start}
        loss, steps, secs = train_one_epoch(forward, batches, transform, self.optimizer, self.schedule,
                                            batch_size=self.trial.batch_size, gen=self.gen, binary=self.binary,
                                            precision=self.ctx.precision, epoch=self.n_epochs, after_step=hook,
                                            at_steps=local, label_smoothing=self.trial.label_smoothing)
        self.step_count += steps
        return {"train_loss": loss, "train_img_per_s": len(batches) / secs, "epoch_seconds": secs,
                "trainable_blocks": float(k)}


def epoch_together(fits: list[Fit], after_step: list[Callable[[int], None] | None],
                   at_steps: list[Collection[int] | None] | None = None) -> list[dict[str, float] | BaseException]:
    """One epoch of several fits that see the same batches, the frozen prefix's forward computed once per batch.

    ``fits`` share arch, frozen weights, depth, data, batch size, and the state of their data generator (so a
    trial trained alone would have drawn these very batches and augmentations: each member's epoch is bit for
    bit its solo epoch). Each member steps its own trainable suffix on the shared prefix output; a member whose
    loss is not finite (checked at the epoch's end and before its hook at ``at_steps[i]``) gets its exception back
    and the others go on. ``after_step[i]`` and ``at_steps[i]`` are member i's :meth:`Fit.epoch` hook. Fits that cannot share (augmentation off: they read stored features; no cut) run
    their own epoch one after another.
    """
    lead = fits[0]
    for f in fits:
        f.n_epochs += 1
        k = depth_at(f.ctx.regime, f.trial.unfrozen_blocks, f.n_epochs)
        if k != f.depth:
            f.set_depth(k)
        if f.first_step_at is None:
            f.first_step_at, f.first_step_wall = time.perf_counter(), time.time()
        f.frozen.train_mode(f.model)
    at_steps = at_steps or [None] * len(fits)
    if len(fits) == 1 or lead.deterministic or any(f.split is None for f in fits):
        out: list[dict[str, float] | BaseException] = []
        for f, hook, at in zip(fits, after_step, at_steps):
            f.n_epochs -= 1  # Fit.epoch counts it again
            try:
                with _own_stream(f):
                    out.append(f.epoch(after_step=hook, at_steps=at))
            except Exception as e:  # noqa: BLE001 - this member's failure, handed back to it
                out.append(e)
        return out
    dev, bs, precision = lead.device, lead.trial.batch_size, lead.ctx.precision
    state = [dict(losses=LossSum(dev), steps=0, error=None) for _ in fits]
    t0 = time.perf_counter()
    for x, y in lead.batches["train"](bs, shuffle=True, gen=lead.gen):
        x, y = channels_last(lead.aug.train(x.to(dev, non_blocking=True))), y.to(dev, non_blocking=True)
        with torch.no_grad(), autocast(dev, precision):
            feats = lead.split.prefix(x)
        for f, st, hook, at in zip(fits, state, after_step, at_steps):
            if st["error"] is not None:
                continue
            try:
                with _own_stream(f):
                    loss = train_step(f.split.suffix, feats, y, f.optimizer, f.schedule, binary=f.binary,
                                      precision=precision, label_smoothing=f.trial.label_smoothing)
                st["steps"] += 1
                st["losses"].add(loss, len(y))
                step = f.step_count + st["steps"]
                if hook is not None and (at is None or step in at):
                    if at is not None:
                        st["losses"].check(f.n_epochs)
                    hook(step)
            except Exception as e:  # noqa: BLE001 - this member's failure, handed back to it
                st["error"] = e
    secs = time.perf_counter() - t0
    out = []
    for f, st in zip(fits, state):
        f.gen.set_state(lead.gen.get_state())  # where its own epoch would have left it
        f.step_count += st["steps"]
        if st["error"] is None:
            try:
                loss = st["losses"].check(f.n_epochs)
            except TrialError as e:
                st["error"] = e
        out.append(st["error"] or {"train_loss": loss, "train_img_per_s": st["losses"].seen / secs,
                                   "epoch_seconds": secs, "trainable_blocks": float(f.depth)})
    return out


@contextmanager
def _own_stream(fit: Fit):
    """The global random generator (dropout, stochastic depth) as ``fit`` left it, for ``fit``'s forward."""
    torch.random.set_rng_state(fit.rng_state)
    if fit.cuda_rng_state is not None:
        torch.cuda.set_rng_state(fit.cuda_rng_state, fit.device)
    try:
        yield
    finally:
        fit.rng_state = torch.random.get_rng_state()
        if fit.cuda_rng_state is not None:
            fit.cuda_rng_state = torch.cuda.get_rng_state(fit.device)


def step_memory(arch: str, num_classes: int, crop: int, batch_size: int, precision: str,
                device: torch.device) -> int:
    """Peak GPU memory of one full fine-tuning step at ``batch_size`` (every block trains, Adam's two moments):
    the most a trial of this model and input needs (``resources.gpu: auto``)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model = models.build(arch, num_classes, image_size=crop).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    with autocast(device, precision):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, opt, x, y, loss
    torch.cuda.empty_cache()
    return peak


def fit_plain(ctx: TrialContext, trial: TrialConfig, log=print, step=None) -> tuple[nn.Module, float]:
    """The epoch loop without Ray or MLflow (pretraining the built-in source models): a line per epoch with its
    loss, validation accuracy, the time so far and an ETA; ``step(done, total)`` after each optimizer step (a live
    bar)."""
    fit = Fit(ctx, trial, device_for(ctx.use_gpu))
    acc, t0 = 0.0, time.perf_counter()
    hook = None if step is None else (lambda n: step(n, fit.steps))
    for epoch in range(1, trial.epochs + 1):
        m = fit.epoch(after_step=hook)
        _, acc = fit.evaluate("val")
        spent = time.perf_counter() - t0
        left = spent / epoch * (trial.epochs - epoch)
        log(f"  epoch {epoch}/{trial.epochs}: train_loss {m['train_loss']:.3f}  val {100 * acc:.1f}%  "
            f"({m['train_img_per_s']:.0f} img/s) · {spent:.0f}s" + (f" · eta ~{left:.0f}s" if left else ""))
    return fit.model, acc
