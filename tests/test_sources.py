"""Built-in source models: pretrained once, cached, reused, loadable like any user checkpoint."""

from __future__ import annotations

import pytest

from tl_sweep import checkpoint, models, sources
from tl_sweep.errors import UserError


def test_a_source_is_pretrained_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path))
    monkeypatch.setitem(sources.SOURCES, "tiny", sources.SourceTask("digits 0-2, one epoch", "builtin:digits",
                                                                    (0, 1, 2), epochs=1))
    inp = models.input_spec("resnet18", "none") | {"crop": 16, "resize": 18}
    lines = []
    path = sources.checkpoint("tiny", "resnet18", inp, seed=0, log=lines.append)
    assert any("pretraining" in line for line in lines)
    ckpt = checkpoint.load(path)
    assert ckpt["classes"] == ["0", "1", "2"] and ckpt["trial"]["epochs"] == 1 and 0 <= ckpt["val_acc"] <= 1
    model = models.build("resnet18", 5, weights_file=str(path), image_size=16)  # as model.weights: <file>
    assert model.fc.out_features == 5
    lines.clear()
    assert sources.checkpoint("tiny", "resnet18", inp, seed=0, log=lines.append) == path
    assert any("reusing" in line for line in lines)


def test_an_unknown_source_is_one_line():
    with pytest.raises(UserError, match="did you mean source:digits-0-4"):
        sources.task("digits-0-5")
