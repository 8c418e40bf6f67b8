"""ImageFolder data as users bring it: odd image modes, broken files, bad layouts, and the real ants/bees set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import HYMENOPTERA, SPEC
from tl_sweep import data
from tl_sweep.errors import UserError


def rgb(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def messy_tree(root):
    """Two classes with every PIL mode a user meets, a truncated JPEG, a text file and hidden files."""
    for c, cls in enumerate(("cats", "dogs")):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(6):
            rgb(10 * c + i).save(d / f"ok{i}.jpg")
        rgb(1).convert("RGBA").save(d / "rgba.png")
        rgb(2).convert("LA").save(d / "la.png")
        p = rgb(3).convert("P")
        p.info["transparency"] = 0
        p.save(d / "palette.png", transparency=0)
        rgb(4).convert("CMYK").save(d / "cmyk.jpg")
        rgb(5).convert("L").save(d / "gray.png")
        Image.fromarray((np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)).save(d / "sixteen.png")
        (d / "notes.txt").write_text("not an image")
        good = d / "ok0.jpg"
        (d / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
        (d / ".DS_Store").write_bytes(b"\0\1junk")
        (d / ".hidden").mkdir()
        rgb(9).save(d / ".hidden" / "x.jpg")


def prep(path, **kw):
    args = dict(size=24, seed=0, split=(0.5, 0.25, 0.25), log=lambda m: None)
    args.update(kw)
    return data.prepare(f"imagefolder:{path}", **args)


def test_modes_converted_broken_files_skipped_hidden_ignored(tmp_path):
    messy_tree(tmp_path / "imgs")
    p = prep(tmp_path / "imgs")
    assert p.classes == ("cats", "dogs")
    assert len(p.labels) == 2 * 12  # 6 JPEGs + RGBA, LA, P, CMYK, L, I;16 per class
    assert sorted(p.skipped) == sorted(f"{c}/{f}" for c in ("cats", "dogs") for f in
                                       ("notes.txt: UnidentifiedImageError", "truncated.jpg: OSError"))
    x = np.load(p.cache, mmap_mode="r")
    assert x.shape == (24, 3, 24, 24) and x.dtype == np.uint8
    assert x.max() > 0  # 16-bit image scaled, not clipped to black/white


def test_strict_refuses_broken_files(tmp_path):
    messy_tree(tmp_path / "imgs")
    with pytest.raises(UserError, match="unreadable files .* data.strict"):
        prep(tmp_path / "imgs", strict=True)


def test_rerun_reuses_the_cache_and_says_so(tmp_path):
    messy_tree(tmp_path / "imgs")
    prep(tmp_path / "imgs")
    said = []
    again = prep(tmp_path / "imgs", log=said.append)
    assert again.reused and any("reusing the decoded cache" in s for s in said)
    (tmp_path / "imgs" / "cats" / "ok1.jpg").write_bytes((tmp_path / "imgs" / "cats" / "ok2.jpg").read_bytes())
    assert not prep(tmp_path / "imgs").reused  # content changed: new fingerprint, new cache


@pytest.mark.parametrize("case, expected", [
    ("missing_root", "no such folder"),
    ("missing_val", "no val/ folder"),
    ("empty_class", "is empty"),
    ("class_mismatch", "differ from train/"),
    ("no_images", "no readable images"),
    ("no_classes", "has no class folders"),
])
def test_bad_layouts_are_one_line(tmp_path, case, expected):
    root = tmp_path / "d"
    if case != "missing_root":
        root.mkdir()
    if case in ("missing_val", "class_mismatch", "empty_class"):
        for split in ("train",) + (("val",) if case != "missing_val" else ()):
            for cls in ("a", "b"):
                (root / split / cls).mkdir(parents=True)
                rgb(0).save(root / split / cls / "x.jpg")
        if case == "class_mismatch":
            (root / "val" / "b").rename(root / "val" / "c")
        if case == "empty_class":
            (root / "train" / "a" / "x.jpg").unlink()
    if case == "no_images":
        for cls in ("a", "b"):
            (root / cls).mkdir()
            (root / cls / "readme.txt").write_text("x")
    with pytest.raises(UserError) as e:
        prep(root)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_data_error_from_the_cli_is_one_line_before_any_trial(cli, tmp_path):
    code, out, err = cli("run", SPEC, "--set", f"data.dataset=imagefolder:{tmp_path / 'nowhere'}",
                         "--set", "data.classes=null", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such folder" in err
    assert "ray:" not in out


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="../shared/data/hymenoptera_data is not here")
def test_hymenoptera_train_val_layout():
    p = prep(HYMENOPTERA, size=40, seed=0)
    assert p.classes == ("ants", "bees")
    assert p.counts() == {"train": 245, "val": 153} and not p.skipped  # 398 JPEGs; no test/: none invented
    assert data.describe(p)["test_split"].startswith("none")
    few = prep(HYMENOPTERA, size=40, seed=0, train_per_class=10)
    assert few.counts()["train"] == 20 and set(few.index["val"]) == set(p.index["val"])
    held = prep(HYMENOPTERA, size=40, seed=0, holdout=0.5)
    assert set(held.index["val"]) | set(held.index["test"]) == set(p.index["val"])
    assert not set(held.index["val"]) & set(held.index["test"]) and abs(held.counts()["test"] - 76) <= 1


def write_mnist(root, n_train=60, n_test=20):
    """MNIST's real on-disk format (big-endian idx files), small, for torchvision's own loader."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())


def test_torchvision_dataset_official_splits_and_carved_val(tmp_path):
    write_mnist(tmp_path)
    p = data.prepare("torchvision:MNIST", size=20, seed=0, split=(0.75, 0.25, 0.0), root=str(tmp_path),
                     log=lambda m: None)
    c = p.counts()
    assert c["test"] == 20 and c["train"] + c["val"] == 60  # official test kept, val carved from train
    assert {p.labels[r] for r in p.index["val"]} == set(range(10))  # stratified: 6 per class → 4 train + 2 val
    assert p.classes[0].startswith("0")
    assert np.load(p.cache, mmap_mode="r").shape == (80, 3, 20, 20)  # grayscale → 3 channels


def test_torchvision_dataset_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError) as e:
        data.prepare("torchvision:CIFAR10", size=20, seed=0, split=(0.6, 0.2, 0.2), root=str(tmp_path),
                     log=lambda m: None)
    msg = str(e.value)
    assert f"is not under {tmp_path}" in msg and "download=True" in msg and "\n" not in msg
    with pytest.raises(UserError, match="did you mean CIFAR10"):
        data.prepare("torchvision:CIFAR11", size=20, seed=0, split=(0.6, 0.2, 0.2), root=str(tmp_path))


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="../shared/data/hymenoptera_data is not here")
def test_real_imagefolder_sweep_on_ants_and_bees(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    spec = SPEC.parent / "hymenoptera.yaml"
    sets = ["study=null", "search.num_trials=2", "search.space.epochs=1", "search.space.unfrozen_blocks=[0, 5]",
            "data.image_size=32", "model.weights=none", "scheduler.kind=fifo", "data.holdout=0",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    cmd = [sys.executable, "-m", "tl_sweep.cli", "run", str(spec)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 classes (ants, bees): train 245, val 153, no test split" in proc.stderr  # progress
    runs = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").search_runs(["1"])
    trials = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    parent = next(r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep")
    assert parent.data.tags["tl_sweep.data.test_split"].startswith("none")
