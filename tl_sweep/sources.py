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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_sweep import data, models
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


def checkpoint(name: str, arch: str, inp: dict, seed: int, use_gpu: bool = False, log=print) -> Path:
    """The cached checkpoint of source ``name`` for ``arch`` at the input size; pretrain it if missing."""
    from tl_sweep import train

    t = task(name)
    key = json.dumps({"v": VERSION, "task": dataclasses.asdict(t), "arch": arch, "crop": inp["crop"],
                      "resize": inp["resize"], "seed": seed}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = data.cache_root() / "sources" / f"{name}-{arch}-{inp['crop']}px-{digest}.pt"
    if path.exists():
        log(f"source:{name}: reusing the pretrained {arch} at {path}")
        return path
    log(f"source:{name}: pretraining {arch} on {t.description} ({t.epochs} epochs, once; cached)")
    t0 = time.perf_counter()
    prepared = data.prepare(t.dataset, size=inp["resize"], seed=seed, split=(0.9, 0.1, 0.0),
                            classes=list(t.classes), log=log)
    ctx = train.TrialContext(
        arch=arch, arms={"scratch": ("none", None)}, head="linear", head_hidden=1, head_dropout=0.0, regime={},
        input=inp, augment={"scale": (0.7, 1.0), "hflip": False}, data=prepared, seed=seed, min_epochs=t.epochs,
        tracking_uri="", experiment_id="", parent_run_id="", use_gpu=use_gpu)
    params = {"batch_size": t.batch_size, "optimizer": t.optimizer, "lr_mult": t.lr_mult, "head_lr_mult": 1.0,
              "weight_decay": 5e-4, "layer_decay": 1.0, "unfrozen_blocks": models.num_blocks(arch, inp["crop"]), "epochs": t.epochs}
    model, acc = train.fit_plain(ctx, params, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"model": model.cpu().state_dict(), "arch": arch, "source": name, "val_acc": acc,
                "classes": list(prepared.classes)}, tmp)
    os.replace(tmp, path)
    log(f"source:{name}: val_acc {acc:.3f} on held-out source images, {time.perf_counter() - t0:.0f}s; saved {path}")
    return path
