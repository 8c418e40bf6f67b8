"""The epoch loop: regimes (fixed, progressive, LP-FT), learning rates, resume state, bf16, a NaN loss."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from tl_sweep import data, train
from tl_sweep.contract import TrialConfig, TrialContext


def ctx(regime: dict, classes=(5, 6, 7, 8, 9)) -> TrialContext:
    prepared = data.prepare("builtin:digits", size=18, seed=0, split=(0.6, 0.2, 0.2), classes=list(classes),
                            train_per_class=8, log=lambda m: None)
    return TrialContext(
        arch="resnet18", arms={"scratch": ("none", None)}, head="linear", head_hidden=8, head_dropout=0.0,
        regime=regime, input={"crop": 16, "resize": 18, "mean": (0.5,) * 3, "std": (0.25,) * 3},
        augment={"scale": (0.7, 1.0), "ratio": (0.9, 1.1), "hflip": False}, data=prepared, seed=0, min_epochs=1,
        tracking_uri="", experiment_id="", parent_run_id="", use_gpu=False)


PARAMS = TrialConfig.of(batch_size=20, optimizer="sgd", lr_mult=1.0, head_lr_mult=10.0, weight_decay=0.0,
                        layer_decay=1.0, unfrozen_blocks=3, epochs=4, arm="scratch", seed=0)


def test_depth_at():
    assert [train.depth_at({"kind": "fixed"}, 3, e) for e in (1, 2, 3)] == [3, 3, 3]
    prog = {"kind": "progressive", "start": 0, "every": 2}
    assert [train.depth_at(prog, 2, e) for e in range(1, 8)] == [0, 0, 1, 1, 2, 2, 2]
    lpft = {"kind": "lp_ft", "probe_epochs": 2}
    assert [train.depth_at(lpft, 5, e) for e in range(1, 5)] == [0, 0, 5, 5]


def test_lp_ft_probes_then_fine_tunes_at_a_lower_lr():
    fit = train.Fit(ctx({"kind": "lp_ft", "probe_epochs": 2, "ft_lr_mult": 0.1}), PARAMS, torch.device("cpu"))
    seen = []
    for _ in range(4):
        m = fit.epoch()
        trainable = {n.split(".")[0] for n, p in fit.model.named_parameters() if p.requires_grad}
        seen.append((m["trainable_blocks"], trainable, fit.optimizer.param_groups[0]["initial_lr"]))
    assert seen[0][:2] == (0.0, {"fc"}) and seen[1][:2] == (0.0, {"fc"})
    assert seen[2][:2] == (3.0, {"fc", "layer2", "layer3", "layer4"})
    head_lr = train.learning_rate("sgd", 1.0, 20) * 10
    assert {g["name"]: g["initial_lr"] for g in fit.optimizer.param_groups}["head"] == pytest.approx(head_lr * 0.1)
    assert fit.step_count == 4 * 2  # 40 images / batch 20, the cosine continued across the switch
    assert fit.schedule.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # annealed to 0 at the last step


def test_reference_learning_rates_scale_with_batch():
    assert train.learning_rate("sgd", 2.0, 128) == pytest.approx(0.1)
    assert train.learning_rate("adam", 1.0, 256) == pytest.approx(1e-3)


def test_nan_loss_stops_the_trial():
    params = dataclasses.replace(PARAMS, lr_mult=1e12, head_lr_mult=1e12)
    fit = train.Fit(ctx({"kind": "fixed"}), params, torch.device("cpu"))
    with pytest.raises(train.TrialError, match="loss became"):
        for _ in range(4):
            fit.epoch()


def test_checkpoint_state_restores_the_fit_exactly():
    c = ctx({"kind": "lp_ft", "probe_epochs": 1, "ft_lr_mult": 0.5})
    params = dataclasses.replace(PARAMS, unfrozen_blocks=2)
    a = train.Fit(c, params, torch.device("cpu"))
    a.epoch()
    a.epoch()  # now fine-tuning the last 2 blocks
    state = a.state()
    assert not any(k.startswith(("conv1.", "layer1.", "layer2.")) for k in state["model"])  # frozen: not saved
    assert any(k.startswith("layer4.") for k in state["model"]) and "fc.weight" in state["model"]
    buf = io.BytesIO()  # through bytes, as a Tune checkpoint does (and no tensor shared with `a`)
    torch.save(state, buf)
    buf.seek(0)
    b = train.Fit(c, params, torch.device("cpu"))
    b.restore(torch.load(buf, weights_only=True))
    a.epoch()
    b.epoch()
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka  # same data order, same steps, same weights


def test_bf16_precision_on_cpu_trains_under_autocast():
    c = dataclasses.replace(ctx({"kind": "fixed"}), precision="bf16")
    fit = train.Fit(c, dataclasses.replace(PARAMS, epochs=1), torch.device("cpu"))
    m = fit.epoch()
    assert math.isfinite(m["train_loss"]) and fit.model.fc.weight.dtype == torch.float32  # master weights
    with train.autocast(torch.device("cpu"), "bf16"):
        assert fit.model(torch.zeros(2, 3, 16, 16)).dtype == torch.bfloat16
    with train.autocast(torch.device("cpu"), "fp32"):
        assert fit.model(torch.zeros(2, 3, 16, 16)).dtype == torch.float32
    with train.autocast(torch.device("cpu"), "auto"):  # auto is fp32 on a CPU
        assert fit.model(torch.zeros(2, 3, 16, 16)).dtype == torch.float32


def test_auto_precision_is_bf16_on_a_gpu_and_fp32_stays_one_key_away():
    assert train.precision_of(torch.device("cuda"), "auto") == "bf16"
    assert train.precision_of(torch.device("cpu"), "fp32") == "fp32"
    assert train.precision_of(torch.device("cpu"), "bf16") == "bf16"
    assert train.precision_of(torch.device("cpu"), "auto") == "fp32"


@pytest.mark.parametrize("arch,batch_size", [("resnet18", b) for b in (2, 3, 4, 6, 8, 12, 24)]
                         + [("mobilenet_v3_small", 8), ("densenet121", 8)])
def test_a_trailing_batch_of_one_image_is_dropped_in_training(arch, batch_size):
    """25 training images = k × batch_size + 1: the last training batch would hold one image, which a
    BatchNorm in train mode cannot normalise ("Expected more than 1 value per channel")."""
    prepared = data.prepare("builtin:digits", size=36, seed=0, split=(0.6, 0.2, 0.2), classes=[5, 6, 7, 8, 9],
                            train_per_class=5, log=lambda m: None)
    c = dataclasses.replace(ctx({"kind": "fixed"}), arch=arch, data=prepared,
                            input={"crop": 32, "resize": 36, "mean": (0.5,) * 3, "std": (0.25,) * 3})
    trial = dataclasses.replace(PARAMS, batch_size=batch_size, unfrozen_blocks=5, epochs=1)
    fit = train.Fit(c, trial, torch.device("cpu"))
    m = fit.epoch()
    assert math.isfinite(m["train_loss"]) and fit.step_count == fit.steps == 24 // batch_size
    _, acc = fit.evaluate("val")  # evaluation keeps every image
    assert 0 <= acc <= 1
