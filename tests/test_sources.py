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


SPEC_WITH_OWN_SOURCE = """
name: own-source
model: {arch: resnet18, weights: source:digits-low}
data: {dataset: builtin:digits, classes: [5, 6, 7], train_per_class: 10, image_size: 16}
sources:
  - {name: digits-low, dataset: builtin:digits, classes: [0, 1, 2], epochs: 1, batch_size: 32}
"""


def test_a_spec_defines_its_own_source_pretrained_once_and_keyed_by_its_recipe(tmp_path, monkeypatch, cli):
    """"Pretrain on A, fine-tune on B" with no code: a source the spec defines is pretrained from its block, cached
    by a hash of it (the same block reuses the file, another recipe pretrains again), and loads as weights."""
    from tl_sweep import spec

    monkeypatch.setenv("TL_SWEEP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "own.yaml").write_text(SPEC_WITH_OWN_SOURCE)
    code, out, err = cli("validate", tmp_path / "own.yaml")
    assert code == 0, err
    cfg = spec.load(tmp_path / "own.yaml")
    sources.check(cfg)
    own = sources.defined(cfg.spec)
    assert own["digits-low"].classes == (0, 1, 2) and "defined in the spec" in own["digits-low"].description
    lines = []
    path = sources.checkpoint("digits-low", "resnet18", cfg.input, 0, log=lines.append, own=own)
    assert any("pretraining resnet18 on builtin:digits, classes [0, 1, 2]" in line for line in lines), lines
    assert checkpoint.load(path)["classes"] == ["0", "1", "2"]
    assert models.build("resnet18", 3, weights_file=str(path), image_size=16).fc.out_features == 3
    lines.clear()
    assert sources.checkpoint("digits-low", "resnet18", cfg.input, 0, log=lines.append, own=own) == path
    assert any("reusing" in line for line in lines)
    longer = spec.load(tmp_path / "own.yaml", ["sources=[{name: digits-low, dataset: builtin:digits, "
                                               "classes: [0, 1, 2], epochs: 2, batch_size: 32}]"])
    assert sources.checkpoint("digits-low", "resnet18", cfg.input, 0, log=lambda m: None,
                              own=sources.defined(longer.spec)) != path  # another recipe, another file


def test_a_defined_sources_mistakes_are_one_line(tmp_path, cli):
    def validate(text: str) -> tuple[int, str]:
        (tmp_path / "s.yaml").write_text(text)
        code, _, err = cli("validate", tmp_path / "s.yaml")
        return code, err.strip()

    code, err = validate(SPEC_WITH_OWN_SOURCE.replace("weights: source:digits-low", "weights: source:digits-lo"))
    assert code == 2 and "did you mean source:digits-low?" in err and len(err.splitlines()) == 1
    code, err = validate(SPEC_WITH_OWN_SOURCE.replace("{name: digits-low", "{name: mnist-5k").replace(
        "source:digits-low", "source:mnist-5k"))
    assert code == 2 and "'mnist-5k' is a built-in source" in err and len(err.splitlines()) == 1
    code, err = validate(SPEC_WITH_OWN_SOURCE.replace("{name: digits-low", "{name: Digits Low"))
    assert code == 2 and "sources" in err and len(err.splitlines()) == 1
    code, err = validate(SPEC_WITH_OWN_SOURCE + "  - {name: digits-low, dataset: builtin:digits}\n")
    assert code == 2 and "defined twice" in err
