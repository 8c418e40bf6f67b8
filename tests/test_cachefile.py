"""Cache files prove they are whole: a truncated, altered or unrecorded cache is detected and rebuilt, never
used - for the decoded images (on the driver and on a node), their labels, stored features and sources."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_sweep import cachefile, data, features, train
from test_train import PARAMS, ctx


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_problem_names_each_kind_of_damage(tmp_path):
    p = tmp_path / "x.bin"
    assert cachefile.problem(p) == "missing"
    cachefile.write(p, lambda tmp: Path(tmp).write_bytes(b"0123456789" * 1000))
    assert cachefile.problem(p) is None
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.bin", "x.bin.sum"]  # no temporary left over
    flip_byte(p, 5000)
    assert "CRC-32 differs" in cachefile.problem(p)
    p.write_bytes(b"0123")
    assert "4 bytes where 10000 were written" in cachefile.problem(p)
    cachefile.discard(p)
    p.write_bytes(b"no record")
    assert "no size and checksum recorded" in cachefile.problem(p)


def test_a_writer_killed_mid_write_leaves_no_cache(tmp_path):
    """Another process dies (SIGKILL) while writing: nothing under the cache's name, so nothing is used."""
    target = tmp_path / "big.npy"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tl_sweep import cachefile
        def fill(tmp):
            with open(tmp, "wb") as f:
                f.write(b"x" * 1_000_000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
        cachefile.write(Path({str(target)!r}), fill)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert cachefile.problem(target) == "missing"
    assert all(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # only the dead writer's temporaries


def digits(log, size=22):
    return data.prepare("builtin:digits", size=size, seed=0, split=(0.6, 0.2, 0.2), log=log)


def test_a_damaged_image_cache_is_rebuilt_on_the_driver_and_on_a_node():
    first = digits(lambda m: None)
    x0 = np.array(np.load(first.cache))
    flip_byte(Path(first.cache), os.path.getsize(first.cache) - 100)  # a disk error in the last image
    lines = []
    again = digits(lines.append)
    assert not again.reused and any("is damaged" in m and "CRC-32" in m and "rebuilding" in m for m in lines)
    assert np.array_equal(np.load(again.cache), x0)
    # a node (a trial) finding its copy truncated builds its own, once, before memory-mapping it
    with open(again.cache, "r+b") as f:
        f.truncate(os.path.getsize(again.cache) // 2)
    x, y, rows = again.split("train")
    assert x.shape == x0.shape and np.array_equal(np.asarray(x[rows]), x0[rows])
    assert cachefile.problem(Path(again.cache)) is None


def test_a_damaged_label_file_of_an_image_folder_is_rebuilt(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (20, 16), (40 * i, 200 if c == "a" else 10, 90)).save(tmp_path / c / f"{i}.png")
    first = data.prepare(f"imagefolder:{tmp_path}", size=16, seed=0, split=(0.5, 0.25, 0.25), log=lambda m: None)
    meta = Path(first.cache).with_suffix(".json")
    meta.write_text(meta.read_text()[:-20])  # cut short: as written by a process that died
    lines = []
    again = data.prepare(f"imagefolder:{tmp_path}", size=16, seed=0, split=(0.5, 0.25, 0.25), log=lines.append)
    assert not again.reused and any(".json is damaged" in m for m in lines)
    assert again.labels == first.labels and again.index == first.index


def test_a_damaged_feature_file_is_recomputed_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path))  # its own store: only its own feature files get damaged
    base = dataclasses.replace(ctx({"kind": "fixed"}), augment={"enabled": False})
    params = dataclasses.replace(PARAMS, unfrozen_blocks=0, epochs=1, seed=5)
    fit = train.Fit(base, params, torch.device("cpu"))
    fit.epoch()
    stored = sorted(features.folder(base.data).glob("*.npy"))
    assert stored
    for p in stored:
        flip_byte(p, os.path.getsize(p) - 3)
    again = train.Fit(base, params, torch.device("cpu"))
    again.epoch()
    assert any("was damaged" in n and "recomputed" in n for n in again.notes), again.notes
    assert all(cachefile.problem(p) is None for p in stored)
    for (name, a), b in zip(fit.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # the same training as with the intact features


@pytest.mark.parametrize("damage", ["truncate", "unrecorded"])
def test_a_damaged_source_checkpoint_is_pretrained_again(damage, monkeypatch):
    from tl_sweep import sources

    monkeypatch.setitem(sources.SOURCES, "tiny", dataclasses.replace(sources.SOURCES["digits-0-4"], epochs=1))
    inp = {"crop": 16, "resize": 18, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    path = sources.checkpoint("tiny", "resnet18", inp, seed=0, log=lambda m: None)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(1000)
    else:
        Path(str(path) + ".sum").unlink()
    lines = []
    again = sources.checkpoint("tiny", "resnet18", inp, seed=0, log=lines.append)
    assert again == path and any("is damaged" in m and "pretraining it again" in m for m in lines), lines
    assert cachefile.problem(path) is None
