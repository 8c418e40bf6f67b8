"""ImageFolder data as users bring it: odd image modes, broken files, bad layouts, and the real ants/bees set."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HYMENOPTERA, SPEC, tl
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
    ("empty_class", "has no images"),
    ("linked_out_class", "(1 entries there were left out: links outside the data root"),
    ("class_mismatch", "differ from train/"),
    ("no_images", "no readable images"),
    ("no_classes", "has no class folders"),
])
def test_bad_layouts_are_one_line(tmp_path, case, expected):
    root = tmp_path / "d"
    if case != "missing_root":
        root.mkdir()
    if case in ("missing_val", "class_mismatch", "empty_class", "linked_out_class"):
        for split in ("train",) + (("val",) if case != "missing_val" else ()):
            for cls in ("a", "b"):
                (root / split / cls).mkdir(parents=True)
                rgb(0).save(root / split / cls / "x.jpg")
        if case == "class_mismatch":
            (root / "val" / "b").rename(root / "val" / "c")
        if case in ("empty_class", "linked_out_class"):
            (root / "train" / "a" / "x.jpg").unlink()
        if case == "linked_out_class":  # its one image is a link out of the data root: left out, and said
            rgb(1).save(tmp_path / "outside.jpg")
            (root / "train" / "a" / "x.jpg").symlink_to(tmp_path / "outside.jpg")
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
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a folder on this machine" in err
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


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="../shared/data/hymenoptera_data is not here")
def test_real_imagefolder_sweep_on_ants_and_bees(tmp_path):

    from mlflow.tracking import MlflowClient

    spec = SPEC.parent / "hymenoptera.yaml"
    sets = ["study=null", "search.num_trials=2", "search.space.epochs=1", "search.space.unfrozen_blocks=[0, 5]",
            "data.image_size=32", "model.weights=none", "scheduler.kind=fifo", "data.holdout=0",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    proc = tl("run", spec=spec, sets_=tuple(sets), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 classes (ants, bees): train 245, val 153, no test split" in proc.stderr  # progress
    runs = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").search_runs(["1"])
    trials = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    parent = next(r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep")
    assert parent.data.tags["tl_sweep.data.test_split"].startswith("none")


# --------------------------------------------------------------------------------------- hostile images


def png_bomb(path, width: int, height: int, rows: int | None = None) -> None:
    """A valid greyscale PNG of ``width``×``height`` black pixels: a few hundred KB that decode to ``w·h`` bytes
    (and three times that as RGB); with ``rows``, only that many rows of data follow the header."""
    path.write_bytes(_png_bomb(width, height, rows or height))


@functools.lru_cache(maxsize=None)
def _png_bomb(width: int, height: int, rows: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(z.compress(row) for _ in range(rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def exif_rotated_jpeg(path) -> None:
    """A 40×20 landscape JPEG (left red, right blue) tagged 'rotate 90° clockwise to display' (orientation 6),
    as a phone stores a portrait photo: shown upright it is 20×40, red on top, blue below."""
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif, quality=95)


def hostile_tree(root, outside):
    """Two clean classes plus every hostile thing a shared dataset can hold."""
    import os

    for c, cls in enumerate(("cats", "dogs")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            rgb(10 * c + i).save(root / cls / f"ok{i}.jpg")
    outside.mkdir()
    rgb(99).save(outside / "private.jpg")
    d = root / "cats"
    png_bomb(d / "bomb.png", 16_000, 11_000)  # 176 Mpx: under PIL's own error threshold, over its warning
    png_bomb(d / "huge_header.png", 100_000, 100_000, rows=1)  # 10 Gpx in its header: PIL refuses it at open
    png_bomb(d / "strip.png", 4_000, 2)  # 2000:1
    exif_rotated_jpeg(d / "portrait.jpg")
    os.symlink("../cats", d / "loop")  # a folder link back to itself
    os.symlink("self.jpg", d / "self.jpg")  # a file link to itself
    os.symlink(outside / "private.jpg", d / "escape.jpg")
    os.symlink(outside, root / "horses")  # a class folder that lives elsewhere
    os.mkfifo(d / "pipe.jpg")  # reading it would block forever


HOSTILE_SKIPS = {
    "cats/bomb.png": "over the 89 Mpx limit",
    "cats/huge_header.png": "a decompression bomb",
    "cats/strip.png": "longer than 20:1",
    "cats/loop": "a link back to a folder already read",
    "cats/self.jpg": "a broken link or a link loop",
    "cats/escape.jpg": "outside the data root",
    "horses": "outside the data root",
    "cats/pipe.jpg": "not a regular file",
}


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated_jpeg(tmp_path / "p.jpg")
    x = data.decode(tmp_path / "p.jpg", 20).astype(int)  # the centre square of the upright 20×40 image
    top, bottom = x[:, :8].mean(axis=(1, 2)), x[:, -8:].mean(axis=(1, 2))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red above blue


def test_hostile_files_are_skipped_listed_and_memory_stays_bounded(tmp_path):
    """Each hostile entry is left out with its reason, the clean images (and the rotated one) are kept, and
    preparing the tree costs no more memory than preparing it without the bomb (measured in a child)."""
    import subprocess
    import sys

    hostile_tree(tmp_path / "d", tmp_path / "elsewhere")
    p = prep(tmp_path / "d")
    assert p.classes == ("cats", "dogs") and len(p.labels) == 25  # 24 clean + the EXIF-rotated portrait
    reasons = dict(s.split(": ", 1) for s in p.skipped)
    assert set(reasons) == set(HOSTILE_SKIPS), p.skipped
    for name, why in HOSTILE_SKIPS.items():
        assert why in reasons[name], (name, reasons[name])

    def peak_mb(folder) -> float:
        code = ("import resource, sys; from tl_sweep import data; "
                f"data.prepare('imagefolder:{folder}', size=24, seed=0, split=(0.5, 0.25, 0.25), log=print); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        env = {**__import__("os").environ, "TL_SWEEP_CACHE": str(tmp_path / f"cache-{folder.name}")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    clean = tmp_path / "clean"
    (clean / "cats").mkdir(parents=True)
    (clean / "dogs").mkdir()
    for c in ("cats", "dogs"):
        for f in (tmp_path / "d" / c).glob("ok*.jpg"):
            (clean / c / f.name).write_bytes(f.read_bytes())
    with_bomb, without = peak_mb(tmp_path / "d"), peak_mb(clean)
    assert with_bomb < without + 100, (with_bomb, without)  # decoding the bomb alone would need > 700 MB


@pytest.mark.slow
def test_a_sweep_on_a_hostile_tree_runs_and_lists_what_it_skipped(tmp_path):
    from mlflow.tracking import MlflowClient

    hostile_tree(tmp_path / "d", tmp_path / "elsewhere")
    sets = ["study=null", "search.num_trials=1", "search.space.epochs=1", "search.space.unfrozen_blocks=[1]",
            "search.space.batch_size=[8]", f"data.dataset=imagefolder:{tmp_path / 'd'}", "data.classes=null",
            "data.image_size=16", "data.train_per_class=null", "model.weights=none", "scheduler.kind=fifo",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    proc = tl("run", spec=SPEC, sets_=tuple(sets), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"skipped {len(HOSTILE_SKIPS)} unreadable files" in proc.stderr
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    parent = next(r for r in c.search_runs(["1"]) if r.data.tags.get("tl_sweep.role") == "sweep")
    listed = Path(c.download_artifacts(parent.info.run_id, "skipped_files.txt", str(tmp_path))).read_text()
    assert all(name in listed for name in HOSTILE_SKIPS), listed
