"""Splits (disjoint, stratified, deterministic, few-shot), the decode-once cache, and augmentation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from tl_sweep import data


def digits(**kw):
    args = dict(size=16, seed=0, split=(0.6, 0.2, 0.2), classes=[5, 6, 7, 8, 9], train_per_class=20)
    args.update(kw)
    return data.prepare("builtin:digits", **args, log=lambda m: None)


def test_splits_are_disjoint_stratified_and_few_shot():
    p = digits()
    tr, va, te = (set(p.index[s]) for s in data.SPLITS)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr) == 100 and Counter(p.labels[r] for r in tr) == {c: 20 for c in range(5)}
    val_counts = Counter(p.labels[r] for r in va)
    assert set(val_counts) == set(range(5)) and max(val_counts.values()) - min(val_counts.values()) <= 2
    assert p.classes == ("5", "6", "7", "8", "9")
    assert all(p.labels[r] >= 0 for r in tr | va | te)  # only the selected classes, remapped to 0..4


def test_splits_are_deterministic_and_seeded():
    assert digits().index == digits().index
    assert digits(seed=1).index["train"] != digits().index["train"]


def test_cache_is_memory_mapped_and_reused():
    first = digits(size=20)
    again = digits(size=20)
    assert again.reused and again.cache == first.cache
    x, y, rows = again.split("val")
    assert isinstance(x, np.memmap) and x.dtype == np.uint8 and x.shape[1:] == (3, 20, 20)
    assert len(y) == len(rows)


def test_a_builtin_dataset_already_cached_is_not_loaded_again(tmp_path, monkeypatch):
    """The cache's note keeps labels and fingerprint beside the package version: a new process with the cache
    whole never imports the dataset's package (scikit-learn's datasets: ~1 s of every sweep's start), and gets
    the same splits; a damaged note costs one load and is written again."""
    import json
    import os
    import subprocess
    import sys

    from tl_sweep import cachefile

    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path))
    args = dict(size=18, seed=3, split=(0.6, 0.2, 0.2), log=lambda m: None)
    first = data.prepare("builtin:digits", **args)
    assert not first.reused
    code = ("import json, sys; from tl_sweep import data; "
            "p = data.prepare('builtin:digits', size=18, seed=3, split=(0.6, 0.2, 0.2), log=print); "
            "print(json.dumps([p.reused, p.fingerprint, p.index, 'sklearn.datasets' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    reused, fingerprint, index, loaded = json.loads(out.stdout.splitlines()[-1])
    assert reused and not loaded, out.stdout  # nothing imported or read but the cache and its note
    assert fingerprint == first.fingerprint and {k: tuple(v) for k, v in index.items()} == first.index
    note = tmp_path / "images" / "builtin-digits-18.json"
    note.write_text(note.read_text().replace('"labels": [0', '"labels": [1'))  # altered: its CRC-32 differs
    assert cachefile.problem(note) is not None
    again = data.prepare("builtin:digits", **args)  # loaded once more: the same data, the note written again
    assert again.index == first.index and again.labels == first.labels and again.reused
    assert cachefile.problem(note) is None and json.loads(note.read_text())["labels"][0] == 0


def test_augmenter_shapes_and_normalisation():
    x = torch.full((4, 3, 37, 37), 128, dtype=torch.uint8)
    aug = data.Augmenter(crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(0.5, 1.0), hflip=True,
                         generator=torch.Generator().manual_seed(0))
    t = aug.train(x)
    assert t.shape == (4, 3, 32, 32)
    assert torch.allclose(t, torch.full_like(t, (128 - 127.5) / 63.75), atol=1e-4)  # constant image stays constant
    e = aug.eval(x)
    assert e.shape == (4, 3, 32, 32)


def test_random_resized_crop_differs_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).expand(8, 3, 32, 32).to(torch.uint8)
    out = data.Augmenter(crop=16, mean=(0, 0, 0), std=(1, 1, 1), generator=g).train(x)
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) == 8


def test_idx_files_are_read_as_they_are(tmp_path):
    """torchvision:MNIST / FashionMNIST from gzipped IDX files (torchvision's raw/ layout, or Debian's flat
    folder), without torchvision's download logic; truncated files are one line."""
    import gzip

    import numpy as np
    import pytest

    from tl_sweep.errors import UserError

    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(name, arr):
        head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (raw / f"{name}.gz").write_bytes(gzip.compress(head + arr.astype(np.uint8).tobytes()))

    test_labels = np.array([0] * 6 + [1] * 3 + list(range(2, 10)) + [2, 3, 4])  # 6 of 20 are class 0
    for split, n, labels in (("train", 60, np.arange(60) % 10), ("t10k", 20, test_labels)):
        idx(f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        idx(f"{split}-labels-idx1-ubyte", labels)
    p = data.prepare("torchvision:FashionMNIST", size=32, seed=0, split=(0.5, 0.5, 0.0), root=str(tmp_path),
                     log=lambda m: None)
    assert p.classes[0] == "T-shirt/top" and p.counts() == {"train": 30, "val": 30, "test": 20}
    x, y, _ = p.split("test")
    assert x.shape[1:] == (3, 32, 32) and sorted(y.tolist()) == sorted(test_labels.tolist())
    assert data.chance(p) == 0.3 and data.chance(p, "val") == 0.1  # the majority class's share, not 1/classes
    assert p.fixed == ("test",)  # the official test set in every search repeat; val carved from train by seed
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 50]) + b"\0" * 20))
    with pytest.raises(UserError, match="is truncated"):
        data.read_idx(raw / "t10k-labels-idx1-ubyte.gz")


def test_real_mnist_from_shared_data_when_present():
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip("../shared/data/MNIST is not on this machine")
    p = data.prepare("torchvision:MNIST", size=28, seed=0, split=(0.9, 0.1, 0.0), root=str(root), train_per_class=5,
                     log=lambda m: None)
    assert p.counts() == {"train": 50, "val": 6000, "test": 10000} and len(p.labels) == 70000
