"""One checkpoint format for a trial's best model, its resume state and a pretrained source model.

A checkpoint is one dict of plain data and tensors (torchvision's reference ``train.py`` style), loadable with
``weights_only=True`` and enough to rebuild the model without the spec (nanoGPT's "the model's shape travels
with its checkpoint")::

    {"format": "tl-sweep/1", "model": state dict, "arch": "resnet18", "classes": [...],
     "head": {"kind", "hidden", "dropout"}, "input": {"crop", "resize", "mean", "std"},
     "trial": TrialConfig as a dict (or None for a source), "epoch": int, "val_acc": float,
     "resume": {optimizer, schedule, generator... } or None}

A resume checkpoint's ``model`` holds only the blocks trained so far (frozen ones are rebuilt from the
trial's start weights). Any checkpoint is also a user checkpoint: ``model.weights: path/to/best.pt`` works.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "tl-sweep/1"
TUNE_FILE = "trial.pt"  # the file a trial's Tune checkpoint folder holds (a resume state or the best weights)


def make(model_state: dict[str, torch.Tensor], *, arch: str, classes: list[str], head: dict[str, Any],
         input: dict[str, Any], trial: dict[str, Any] | None = None, epoch: int = 0, val_acc: float | None = None,
         resume: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "model": model_state, "arch": arch, "classes": list(classes), "head": dict(head),
            "input": {k: list(v) if isinstance(v, tuple) else v for k, v in input.items()}, "trial": trial,
            "epoch": epoch, "val_acc": val_acc, "resume": resume}


def save(ckpt: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    torch.save(ckpt, path)
    return path


def load(source: str | Path | bytes) -> dict[str, Any]:
    """A checkpoint from a file or bytes, with ``weights_only=True`` (no code in it runs)."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    return torch.load(f, map_location="cpu", weights_only=True)


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """The model a (whole-model) checkpoint holds, rebuilt from the checkpoint alone."""
    from tl_sweep import models

    head = ckpt["head"]
    model = models.build(ckpt["arch"], len(ckpt["classes"]), head=head["kind"], image_size=ckpt["input"]["crop"],
                         hidden=head.get("hidden", 1024), dropout=head.get("dropout", 0.5))
    model.load_state_dict(ckpt["model"])
    return model.eval()
