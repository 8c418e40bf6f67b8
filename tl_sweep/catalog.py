"""torchvision's classification models as data, read without importing torch: every model's name, family, block
count, weights names and the input each weights expects.

``tl_sweep/catalog.json`` holds the table for the torchvision it was written from; with that torchvision
installed, checking a spec (``tl-sweep validate``, a spec error before any work) and ``tl-sweep models`` never
import torch or torchvision (2-3 s here). With another torchvision the table is built live from
:mod:`tl_sweep.models` instead. ``python -m tl_sweep.catalog`` writes the file again; ``tests/test_models.py``
checks it against the live registry, model by model.
"""

from __future__ import annotations

import difflib
import functools
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tl_sweep.errors import UserError

FILE = Path(__file__).with_name("catalog.json")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of a model without weights (as models.IMAGENET_MEAN)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=1)
def table() -> dict[str, dict[str, Any]]:
    """arch -> {family, blocks, input_size, size_kwarg, weights: {name: {crop, resize, mean, std}}}."""
    try:
        installed = version("torchvision")
    except PackageNotFoundError:
        installed = None
    if FILE.is_file():
        stored = json.loads(FILE.read_text())
        if stored.get("torchvision") == installed:
            return stored["archs"]
    return live()["archs"]


def live() -> dict[str, Any]:
    """The table built from the installed torchvision (imports torch and torchvision)."""
    import torchvision

    from tl_sweep import models

    archs = {}
    for arch in models.list_archs():
        fam = models.family(arch)
        archs[arch] = {"family": fam.name, "blocks": models.num_blocks(arch), "input_size": fam.input_size,
                       "size_kwarg": fam.size_kwarg,
                       "weights": {name: {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in models.input_spec(arch, name).items()}
                                   for name in models.weight_names(arch)}}
    return {"torchvision": torchvision.__version__.split("+")[0], "archs": archs}


def entry(arch: str) -> dict[str, Any]:
    """``arch``'s row; an unknown name is one line with the closest names."""
    rows = table()
    if arch not in rows:
        close = difflib.get_close_matches(arch, list(rows), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "`tl-sweep models` lists them"
        raise UserError(f"unknown torchvision model {arch!r}: {hint}")
    return rows[arch]


def archs() -> list[str]:
    return sorted(table())


def num_blocks(arch: str) -> int:
    """How many blocks ``arch`` has (the ``max`` of ``unfrozen_blocks``)."""
    return entry(arch)["blocks"]


def weight_names(arch: str) -> list[str]:
    """``arch``'s torchvision weights names (``IMAGENET1K_V1``, ..., ``DEFAULT``)."""
    return list(entry(arch)["weights"])


def is_weights(arch: str, name: str) -> bool:
    """Whether ``name`` is one of ``arch``'s torchvision weights names."""
    return name in entry(arch)["weights"]


def input_spec(arch: str, weights: str) -> dict[str, Any]:
    """Crop size, resize size and normalisation from the weights' metadata, else the family default."""
    row = entry(arch)
    spec = row["weights"].get(weights)
    if spec is None:
        size = row["input_size"]
        return {"crop": size, "resize": round(size / 0.875), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def size_kwarg(arch: str) -> str | None:
    """The builder argument that sets ``arch``'s input size (ViT, MaxViT), if any."""
    return entry(arch)["size_kwarg"]


def write(path: Path = FILE) -> None:
    """The live table as ``catalog.json``: one line per model, in torchvision's order (its weights' order kept)."""
    t = live()
    rows = ",\n".join(f"  {json.dumps(arch)}: {json.dumps(row)}" for arch, row in t["archs"].items())
    path.write_text(f'{{"torchvision": {json.dumps(t["torchvision"])}, "archs": {{\n{rows}\n}}}}\n')


if __name__ == "__main__":
    write()
    print(f"wrote {FILE}")
