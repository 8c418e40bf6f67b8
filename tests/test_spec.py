"""Spec errors: one line on stderr, exit code 2, no traceback; overrides; resolution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import SPEC


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(text))
    return p


BASE = """\
name: t
model: {arch: resnet18, weights: none}
data: {dataset: builtin:digits, image_size: 32}
search:
  num_trials: 2
  space:
    lr_mult: {low: 0.1, high: 10, log: true}
    unfrozen_blocks: {low: 0, high: max}
"""


def one_error_line(code, out, err) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("text, expected", [
    ("name: t\nmodel: {arch: resnet18\n", ["line 3", "column 1"]),
    ("name: t\nmodle: {arch: resnet18}\n", ["modle: unknown key", "did you mean model?"]),
    (BASE.replace("num_trials: 2", "num_trails: 2"), ["search.num_trails: unknown key", "num_trials"]),
    (BASE.replace("log: true}", "log: true, hgih: 3}"), ["search.space.lr_mult.hgih", "high"]),
    (BASE.replace("low: 0.1, high: 10, log: true", "low: -1, high: 10"), ["search.space.lr_mult", "> 0"]),
    (BASE.replace("lr_mult: {low: 0.1, high: 10, log: true}", "lr_mult: 0"), ["search.space.lr_mult", "> 0"]),
    (BASE.replace("{low: 0, high: max}", "{low: 0, high: 9}"), ["unfrozen_blocks", "9 is above the 5 blocks"]),
    (BASE.replace("unfrozen_blocks: {low: 0, high: max}", "optimizer: []"), ["search.space.optimizer", "empty"]),
    (BASE.replace("unfrozen_blocks: {low: 0, high: max}", "optimizer: [sgd, adma]"), ["did you mean adam?"]),
    (BASE.replace("arch: resnet18", "arch: resnet19"), ["model.arch", "resnet18"]),
    (BASE.replace("arch: resnet18", "arch: vitb16"), ["model.arch", "vit_b_16"]),
    (BASE.replace("weights: none", "weights: IMAGENET1K_V9"), ["model.weights", "IMAGENET1K_V1"]),
    (BASE.replace("builtin:digits", "builtin:mnist"), ["data.dataset", "builtin:digits"]),
    (BASE.replace("arch: resnet18, weights: none", "arch: vit_b_16, weights: IMAGENET1K_V1").replace(
        "{low: 0, high: max}", "0"), ["data.image_size", "exactly 224 px"]),
    (BASE.replace("builtin:digits", "torchvision:CIFAR10"), ["data.root", "needs data.root"]),
    (BASE.replace("name: t\n", ""), ["name: required key is missing"]),
    ("- a\n- b\n", ["a spec is a mapping"]),
    ("", ["the spec is empty"]),
    (BASE + "scheduler: {kind: hyperband}\n", ["scheduler.kind", "asha"]),
    (BASE + "study: {baseline: scratch}\n", ["study.sources", "scratch baseline", "pretrained"]),
    (BASE + "study: {sources: [source:digits-0-4], depths: [0, 9]}\n", ["study.depths", "[9]", "0..5"]),
    (BASE.replace("num_trials: 2", "num_trials: 12") + "study: {sources: [source:digits-5-9]}\n",
     ["unknown source model", "digits-0-4"]),
    (BASE.replace("log: true}", "log: true}\n    epochs: {low: 5, high: 2}"), ["epochs", "swap"]),
    (BASE + "data: {augment: flips}\n", ["data.augment", "use none, or a mapping"]),
    (BASE + "resources: {precision: fp16}\n", ["resources.precision", "bf16"]),
    (BASE + "resources: {memory_gb: 0}\n", ["resources.memory_gb", "greater than 0"]),
    (BASE + "resources: {memory_gb: 4, cohort: 4}\n", ["resources.memory_gb limits one trial's worker",
                                                       "set resources.cohort: 1 or drop memory_gb"]),
    (BASE + "resources: {cohort: 0}\n", ["resources.cohort", "greater than or equal to 1"]),
])
def test_spec_errors_are_one_line(cli, tmp_path, text, expected):
    line = one_error_line(*cli("validate", write(tmp_path, text)))
    assert str(tmp_path / "spec.yaml") in line or "spec.yaml" in line
    for piece in expected:
        assert piece in line, line


def test_augment_none_trains_on_the_eval_transform(cli, tmp_path):
    code, out, err = cli("validate", write(tmp_path, BASE + "data: {augment: none}\n"))
    assert code == 0, err
    assert yaml.safe_load(out)["data"]["augment"]["enabled"] is False


def test_missing_spec_file(cli, tmp_path):
    line = one_error_line(*cli("validate", tmp_path / "nope.yaml"))
    assert "no such spec file" in line


def test_bad_override_syntax(cli):
    line = one_error_line(*cli("validate", SPEC, "--set", "search.num_trials"))
    assert "--set key.path=value" in line


@pytest.mark.parametrize("item, expected", [
    ("search.num_trails=3", ["--set search.num_trails=3: search.num_trails: unknown key", "num_trials"]),
    ("search.space.lr_mult=-1", ["--set search.space.lr_mult=-1: search.space.lr_mult", "> 0"]),
    ("search.space.epochs={low: 1, high: 3", ["--set search.space.epochs={low: 1, high: 3: the value is not valid "
                                              "YAML", "e.g. --set search.space.epochs='{low: 1, high: 3}'"]),
    ("study.trials_per_cell=0", ["--set study.trials_per_cell=0: study.trials_per_cell"]),
])
def test_a_set_error_blames_the_set_not_the_spec_file(cli, item, expected):
    line = one_error_line(*cli("validate", SPEC, "--set", item))
    assert str(SPEC) not in line, line
    for piece in expected:
        assert piece in line, line


def test_data_paths_read_the_environment_and_validate_says_when_the_data_is_not_there(cli, tmp_path, monkeypatch):
    hym = SPEC.parent / "hymenoptera.yaml"
    monkeypatch.setenv("TL_SWEEP_DATA", str(tmp_path))  # this machine keeps its datasets elsewhere
    line = one_error_line(*cli("validate", hym))
    assert f"{tmp_path / 'hymenoptera_data'} is not a folder on this machine" in line
    assert "set TL_SWEEP_DATA to where your datasets are" in line
    (tmp_path / "hymenoptera_data").mkdir()
    code, out, err = cli("validate", hym)
    assert code == 0 and f"imagefolder:{tmp_path / 'hymenoptera_data'}" in out, err


def test_a_checkpoint_arm_is_named_by_its_file_or_by_the_spec(cli, tmp_path):
    import torch
    import torchvision

    ckpt = tmp_path / "weights" / "resnet18-mine.pt"
    ckpt.parent.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    code, out, err = cli("validate", SPEC, "--set", f"study.sources=[{ckpt}]")
    assert code == 0, err
    resolved = yaml.safe_load(out)["resolved"]
    assert resolved["arms"] == {"resnet18-mine.pt": str(ckpt), "scratch": "none"}  # the whole path stays there
    assert "resnet18-mine.pt@k=0" in resolved["cells"]
    code, out, err = cli("validate", SPEC, "--set", f"study.sources=[{{name: mine, weights: {ckpt}}}, "
                                                     f"source:mnist-5k]")
    assert code == 0 and set(yaml.safe_load(out)["resolved"]["arms"]) == {"mine", "source:mnist-5k", "scratch"}
    line = one_error_line(*cli("validate", SPEC, "--set", f"study.sources=[{ckpt}, {ckpt}]"))
    assert "two arms would be called 'resnet18-mine.pt'; give each a name" in line


def test_validate_prints_resolved_config(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("validate", SPEC, "--set", "search.num_trials=18",
                         "--set", "tracking.uri=sqlite:///sub.db", "--set", "search.space.epochs=3")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["search"]["num_trials"] == 18
    assert cfg["search"]["space"]["epochs"] == 3
    assert cfg["search"]["space"]["unfrozen_blocks"] == {"low": 0, "high": 5, "log": False}  # max resolved
    assert cfg["search"]["space"]["head_lr_mult"] == 1.0  # defaults filled in
    assert cfg["tracking"]["uri"] == f"sqlite:///{tmp_path / 'sub.db'}"  # absolute: trials run elsewhere
    assert cfg["resolved"]["experiment"] == "freeze-depth"
    assert cfg["resolved"]["input"]["crop"] == 32
    assert cfg["data"]["augment"]["hflip"] is False  # digits are not mirror-symmetric


def test_paths_are_relative_to_the_spec(cli, tmp_path):
    sub = tmp_path / "specs"
    sub.mkdir()
    (tmp_path / "imgs").mkdir()
    p = sub / "s.yaml"
    p.write_text(BASE.replace("builtin:digits", "imagefolder:../imgs").replace("weights: none", "weights: ../w.pt")
                 + "storage: ../results\n")
    code, out, err = cli("validate", p)
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["data"]["dataset"] == f"imagefolder:{tmp_path / 'imgs'}"
    assert cfg["resolved"]["arms"] == {"w.pt": str(tmp_path / "w.pt")}  # an arm named by its file
    assert cfg["storage"] == str(tmp_path / "results")


def test_every_spec_in_search_spaces_validates(cli):
    for p in sorted(SPEC.parent.glob("*.yaml")):
        code, out, err = cli("validate", p)
        assert code == 0, f"{p.name}: {err}"


def test_models_lists_every_torchvision_model(cli):
    code, out, err = cli("models")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 80 and lines[0].split()[:4] == ["arch", "family", "blocks", "input"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["resnet18"][1:4] == ["resnet", "5", "224"] and "IMAGENET1K_V1" in rows["resnet18"][4]
    assert rows["inception_v3"][3] == "299" and rows["vit_h_14"][2] == "33"
