"""The frozen-prefix feature cache: a frozen prefix's output is computed once and reused.

With ``k`` unfrozen blocks, everything before the last ``k`` blocks is frozen: its output for an image
never changes during a trial. When that image's transform is deterministic too (evaluation always;
training when ``data.augment: none``), tl-sweep computes the prefix once per image and trains only the
suffix (the last ``k`` blocks and the head) on the stored features. Epochs after the first then skip the
frozen prefix's forward pass entirely; a linear probe trains only its head.

How the model is cut (:func:`split`), for any torchvision family and without per-family code: the model
is traced with torch.fx (torchvision's own ``NodePathTracer``, as ``create_feature_extractor`` uses), each
graph node is marked *trainable-side* when it calls a module with trainable parameters, reads one, calls a
module that is random in training mode (Dropout with p > 0, StochasticDepth... unless frozen into eval),
or takes a trainable-side input. The *cut* is the set of input-dependent nodes feeding the trainable side:
when it is one tensor, the prefix graph computes it and the suffix graph starts from it. Both graphs share
the model's parameters (``GraphModule`` holds references, not copies), so training the suffix trains the
model, and checkpoints stay whole models.

Features are stored per (arch, weights, frozen blocks, data fingerprint, split rows, transform, dtype) as
one ``.npy`` next to the decode-once image cache, written atomically under a file lock: trials with the
same key (on the same node) reuse them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from tl_sweep import cachefile, internals, models

MAX_BYTES = 2 << 30  # per split: larger features (early cuts at high resolution) are recomputed instead


@dataclass
class Split:
    """A model cut after its frozen prefix: ``suffix(prefix(x)) == model(x)``."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    cut: str  # the graph node whose output is cached, e.g. ``layer3`` or ``flatten``


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d)  # each normalises with batch statistics in training mode (when it tracks them)


def _random_in_training(m: nn.Module) -> bool:
    if isinstance(m, _DROPOUT):
        return m.p > 0
    if isinstance(m, _NORMS):
        return True
    return type(m).__name__ == "StochasticDepth" and getattr(m, "p", 0) > 0


_TRACED: dict[tuple, fx.Graph | str] = {}  # per process: a model's structure -> its graph (read, never changed)


def _trace(model: nn.Module) -> fx.Graph | str:
    """``model``'s fx graph, traced once per structure in a process (a reused worker's trials build the same
    model: tracing a ResNet18 again cost each trial ~20 ms); a reason when fx cannot trace it."""
    key = (type(model), tuple((n, type(m)) for n, m in model.named_modules()),
           tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))
    if key not in _TRACED:
        try:  # torchvision's tracer settings (its ops as leaf modules), as create_feature_extractor uses them
            from torchvision.models.feature_extraction import NodePathTracer

            _TRACED[key] = NodePathTracer(**internals.fx_tracer_settings()).trace(model)
        except Exception as e:  # noqa: BLE001 - a model fx cannot trace simply runs without the cache
            _TRACED[key] = f"torch.fx cannot trace it ({type(e).__name__})"
        while len(_TRACED) > 8:
            _TRACED.pop(next(iter(_TRACED)))
    return _TRACED[key]


def split(model: nn.Module, frozen: models.Frozen) -> Split | str:
    """Cut ``model`` after its frozen prefix (as :func:`models.freeze` left it); a reason when it can't be."""
    graph = _trace(model)
    if isinstance(graph, str):
        return graph
    kept_eval = {id(m) for m in frozen.eval_modules}
    params = dict(model.named_parameters())

    def trainable_module(target: str) -> bool:
        m = model.get_submodule(target)
        if any(p.requires_grad for p in m.parameters()):
            return True
        return any(_random_in_training(s) and id(s) not in kept_eval for s in m.modules())

    side: dict[fx.Node, bool] = {}  # node -> trainable side
    dep: dict[fx.Node, bool] = {}  # node -> depends on the input image
    for n in graph.nodes:
        ins = n.all_input_nodes
        dep[n] = n.op == "placeholder" or any(dep[a] for a in ins)
        own = (n.op == "call_module" and trainable_module(n.target)) or (
            n.op == "get_attr" and n.target in params and params[n.target].requires_grad)
        side[n] = own or any(side[a] for a in ins)
    c = _articulation(graph, dep, side)
    if c is None:
        return "nothing is frozen"
    if not any(n.op == "call_module" for n in _ancestors(c) | {c}):
        return "the frozen prefix does no work"

    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:  # everything up to the cut but the trainable side's own constants
        if not side[n]:
            env[n] = prefix.node_copy(n, lambda a: env[a])
        if n is c:
            break
    prefix.output(env[c])

    suffix = fx.Graph()
    env = {c: suffix.placeholder("features")}
    after = False
    for n in graph.nodes:
        if n is c:
            after = True
        elif n.op != "placeholder" and (after or not dep[n]):
            env[n] = suffix.node_copy(n, lambda a: env[a])
    return Split(_module(model, prefix), _module(model, suffix), str(c.name))


def _articulation(graph: fx.Graph, dep: dict, side: dict) -> fx.Node | None:
    """The last image-dependent node, before the trainable side begins, that every later node goes through.

    Walking the graph in order while counting the image-dependent values still needed later: a node after
    which it alone is live is a valid single-tensor cut (a DenseNet block's concatenations or an Inception
    module's pooling branch are not: other values are still live there).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=-1) for n in graph.nodes}
    live: set[fx.Node] = set()
    best = None
    for i, n in enumerate(graph.nodes):
        if not dep[n]:
            continue
        if side[n] or n.op == "output":
            return best
        live -= {a for a in n.all_input_nodes if last_use[a] == i}
        if last_use[n] > i:
            live.add(n)
        if live == {n} and n.op != "placeholder":
            best = n
    return best


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(model, graph)  # submodules and parameters by reference: shared with ``model``
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# ------------------------------------------------------------------------------------------ the store


def weights_id(weights: str, weights_file, seed: int, arch: str = "") -> str:
    """What identifies the frozen weights: the checkpoint's content (a file, bytes, or the file torchvision
    loads an enum name from), or the init seed. Two files under one name never share features."""
    if weights == "none":
        return f"random-init-seed{seed}"
    if weights_file is None:
        enum = models.torchvision_weights(arch, weights) if arch else None
        path = models.hub_file(enum) if enum is not None else None
        if path is None or not path.exists():
            return weights
        return f"{weights}:{_file_hash(str(path), os.path.getmtime(path), os.path.getsize(path))}"
    if hasattr(weights_file, "getbuffer"):
        return hashlib.sha1(weights_file.getbuffer()).hexdigest()
    return _file_hash(str(weights_file), os.path.getmtime(weights_file), os.path.getsize(weights_file))


_HASHES: dict[tuple, str] = {}


def _file_hash(path: str, mtime: float, size: int) -> str:
    key = (path, mtime, size)
    if key not in _HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def key_for(arch: str, weights_id: str, frozen_blocks: int, cut: str, data, split: str, inp: dict, device: str,
            precision: str) -> str:
    """The store's name for one split's features: everything that changes them is in it."""
    rows = hashlib.sha1(np.asarray(data.index[split]).tobytes()).hexdigest()
    parts = (arch, weights_id, frozen_blocks, cut, data.fingerprint, split, rows, inp["resize"], inp["crop"],
             tuple(inp["mean"]), tuple(inp["std"]), device, precision, torch.__version__)
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:20]


def folder(data) -> Path:
    """Where a dataset's stored features live: beside its decoded image cache."""
    return Path(data.cache).parent / "features"


def load_or_compute(folder: Path, name: str, compute: Callable[[], torch.Tensor], log=lambda m: None
                    ) -> tuple[np.ndarray, bool]:
    """Features ``name`` from ``folder`` (memory-mapped), or ``compute()`` them once and store them.

    One writer per key and node (file lock); the file appears atomically (temp + rename) with its size and
    CRC-32 recorded, so a crash or a full disk never leaves half a cache behind, and a file damaged later is
    detected and recomputed, never used (``cachefile``). bfloat16 features (GPU autocast) are stored as their int16
    bits (numpy has no bfloat16): see :func:`to_tensor`. Returns the features and whether they were reused.
    """
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npy"
    with FileLock(str(path) + ".lock"):
        why = cachefile.problem(path)
        if why is None:
            return np.load(path, mmap_mode="r"), True
        if why != "missing":
            log(f"feature cache {path.name} was damaged ({why}); recomputed")
            cachefile.discard(path)
        arr = as_array(compute())
        try:
            cachefile.write(path, lambda tmp: _save(tmp, arr))
        except OSError as e:  # no room: train on the in-memory copy, store nothing
            log(f"feature cache not stored ({e.strerror or e}); this trial keeps its copy in memory")
        return arr, False


def of_split(prefix: fx.GraphModule, images, transform: Callable, autocast: Callable, *, notes: list[str],
             label: str, folder: Path | None = None, name: str | None = None) -> np.ndarray | None:
    """The frozen prefix's output for every image of a split, in the split's row order: from ``folder`` (the
    store) when ``name`` is there, else computed now (and stored when ``folder`` and ``name`` are given).

    ``images`` yields the split's uint8 batches (a ``train.Batches``: ``images(batch_size, shuffle=False)``, its
    ``device``, its length), ``transform`` is the evaluation transform, ``autocast()`` the trial's precision.
    ``None`` where the split's features would be larger than :data:`MAX_BYTES` (they are recomputed instead).
    What happened goes to ``notes`` (``label`` names the split there).
    """
    dev = images.device
    with torch.no_grad(), autocast():
        one = prefix(transform(next(images(1, shuffle=False))[0].to(dev)))
    size = one.element_size() * one.numel() * len(images)
    if size > MAX_BYTES:
        notes.append(f"{label} not cached ({size / 2**30:.1f} GiB > {MAX_BYTES / 2**30:.0f} GiB)")
        return None

    @torch.no_grad()
    def compute() -> torch.Tensor:
        with autocast():
            return torch.cat([prefix(transform(x.to(dev, non_blocking=True))) for x, _ in images(256, shuffle=False)])

    if folder is None or name is None:
        notes.append(f"{label} {tuple(one.shape[1:])} computed, not stored")
        return as_array(compute())
    arr, reused = load_or_compute(folder, name, compute, log=notes.append)
    notes.append(f"{label} {tuple(one.shape[1:])} {'reused' if reused else 'computed'}")
    return arr


def as_array(t: torch.Tensor) -> np.ndarray:
    """Features as stored (and as :class:`train.Batches` takes them): bfloat16 as its int16 bits."""
    t = t.contiguous().cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _save(tmp: str, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save given a name would append ".npy" to it
        np.save(f, arr)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A batch of stored features as a tensor (int16 storage is bfloat16 bits)."""
    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # a memory-mapped store is read-only
    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t
