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
