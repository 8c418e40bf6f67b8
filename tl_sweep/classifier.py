"""A trained model as a classifier anyone can call: images in, class names and probabilities out.

:class:`Classifier` wraps a tl-sweep checkpoint (``tl_sweep.checkpoint``: weights, arch, classes, head, input
spec) with the training preprocessing: any PIL mode → RGB, shorter side resized to the input's resize size,
centre crop, the weights' normalisation. It is what ``tl-sweep predict`` runs and what the logged MLflow Model
serves (:mod:`tl_sweep.mlflow_model`); the checkpoint is loaded with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tl_sweep import checkpoint
from tl_sweep.errors import UserError


def check_image(path: str | Path) -> None:
    """A one-line error unless ``path`` is an image PIL can read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); give image files (JPEG, PNG, ...)") \
            from None


class Classifier:
    """A checkpoint with its preprocessing. ``predict(images)``: file paths or uint8 H×W×C arrays."""

    def __init__(self, ckpt: dict[str, Any]):
        self.ckpt = ckpt
        self.model = checkpoint.build_model(ckpt)
        self.classes = list(ckpt["classes"])
        self.input = ckpt["input"]
        self.binary = ckpt["head"].get("kind") == "binary"

    @classmethod
    def from_file(cls, path: str | Path) -> Classifier:
        try:
            ckpt = checkpoint.load(path)
        except FileNotFoundError:
            raise UserError(f"MODEL: no checkpoint at {path}; give models:/m-… (as tl-sweep run prints it), "
                            f"runs:/<run id>/<model name>, models:/<name>@<alias> or a tl-sweep checkpoint file"
                            ) from None
        except Exception as e:  # noqa: BLE001 - any unpickling error means "not a checkpoint"
            raise UserError(f"MODEL: {path} is not a loadable checkpoint ({type(e).__name__}); give a best.pt "
                            f"that tl-sweep wrote") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != checkpoint.FORMAT:
            raise UserError(f"MODEL: {path} is not a tl-sweep checkpoint (no arch, classes and input spec); give a "
                            f"best.pt that tl-sweep wrote, or an MLflow model URI")
        return cls(ckpt)

    def tensor(self, images: Sequence[Any]) -> torch.Tensor:
        """Images → the normalised N×3×crop×crop batch the model was trained on."""
        from PIL import Image

        from tl_sweep import data

        size, crop = int(self.input["resize"]), int(self.input["crop"])
        out = []
        for i, img in enumerate(images):
            if isinstance(img, (str, Path)):
                try:
                    arr = data.decode(Path(img), size)
                except data.Unusable as e:
                    raise UserError(f"{img}: {e}") from None
                except (OSError, ValueError) as e:
                    raise UserError(f"{img}: not a readable image ({type(e).__name__}); give image files "
                                    f"(JPEG, PNG, ...)") from None
            else:
                a = np.asarray(img)
                # uint8; or integers in 0..255, as an array comes back from JSON (MLflow's serving input)
                ok = a.dtype == np.uint8 or (a.dtype.kind in "iu" and a.size and 0 <= a.min() and a.max() <= 255)
                if not ok or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
                    raise UserError(f"image {i}: expected a uint8 H×W or H×W×C array, got {a.dtype} {a.shape}")
                a = a.astype(np.uint8)
                arr = data.square(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a), size)
            o = (size - crop) // 2
            out.append(arr[:, o:o + crop, o:o + crop])
        x = torch.from_numpy(np.stack(out)).float()
        mean = torch.tensor(self.input["mean"]).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.input["std"]).view(1, 3, 1, 1) * 255
        return (x - mean) / std

    @torch.no_grad()
    def probabilities(self, images: Sequence[Any]) -> np.ndarray:
        logits = self.model(self.tensor(images))
        if self.binary:
            p = torch.sigmoid(logits.float().squeeze(1))
            return torch.stack([1 - p, p], 1).numpy()
        return torch.softmax(logits.float(), 1).numpy()

    def predict(self, images: Sequence[Any], top: int = 1) -> list[dict[str, Any]]:
        """One dict per image: ``label`` (the most probable class), ``probability`` and the ``top`` classes."""
        probs = self.probabilities(images)
        rows = []
        for p in probs:
            order = np.argsort(-p)[:max(1, top)]
            rows.append({"label": self.classes[order[0]], "probability": float(p[order[0]]),
                         "top": [(self.classes[j], float(p[j])) for j in order],
                         "probabilities": {c: float(v) for c, v in zip(self.classes, p)}})
        return rows


def images_of(model_input) -> list:
    """What pyfunc hands ``predict``: a DataFrame (column ``image``: paths), a list, or an array of images."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[col])
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim == 4:
        return list(model_input)
    return list(model_input)
