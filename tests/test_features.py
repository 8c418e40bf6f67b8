"""The frozen-prefix feature cache: the cut is exact for every family, and training on stored features is
the same training as recomputing them (same losses, same weights), only faster after the first epoch."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from tl_sweep import features, models, train
from tl_sweep.contract import TrialConfig, TrialContext
from test_train import PARAMS, ctx

# one model per family, with the input size its forward needs
FAMILY_EXAMPLES = [
    ("resnet18", 64), ("regnet_x_400mf", 64), ("alexnet", 64), ("vgg11_bn", 64), ("squeezenet1_1", 64),
    ("densenet121", 64), ("efficientnet_b0", 64), ("mobilenet_v2", 64), ("mobilenet_v3_small", 64),
    ("mobilenet_v3_large", 64), ("mnasnet0_5", 64), ("shufflenet_v2_x0_5", 64), ("googlenet", 64),
    ("inception_v3", 80), ("convnext_tiny", 64), ("swin_t", 64),
    # the two families whose forward needs 224 px take 9 s each: in the full suite, out of the quick subset
    pytest.param("maxvit_t", 224, marks=pytest.mark.slow), pytest.param("vit_b_32", 224, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch,size", FAMILY_EXAMPLES)
def test_suffix_of_prefix_is_the_model_at_every_depth(arch, size):
    torch.manual_seed(0)
    model = models.build(arch, 3, image_size=size, head="mlp", hidden=16, dropout=0.5)
    part = models.partition(model, arch)
    x = torch.randn(2, 3, size, size)
    cuts = {}
    for k in range(len(part)):
        frozen = models.freeze(model, part, k)
        got = features.split(model, frozen)
        assert isinstance(got, features.Split), (k, got)
        model.eval()
        with torch.no_grad():
            feats = got.prefix(x)
            assert torch.equal(got.suffix(feats), model(x)), k
        # the head's dropout stays on the trained side: it must keep regularising the head
        assert any(n.op == "call_module" and isinstance(m := model.get_submodule(n.target), torch.nn.Dropout)
                   and m.p == 0.5 for n in got.suffix.graph.nodes)
        assert all(p.requires_grad is False for p in got.prefix.parameters())
        cuts[k] = tuple(feats.shape[1:])
    if arch != "squeezenet1_1":  # its head is a 1x1 conv on the last feature map
        assert math.prod(cuts[0]) == max(cuts[0])  # a linear probe caches pooled features
    assert isinstance(features.split(model, models.freeze(model, part, len(part))), str)  # nothing frozen


def fit_epochs(c: TrialContext, params: TrialConfig, n: int) -> tuple[train.Fit, list[dict]]:
    fit = train.Fit(c, params, torch.device("cpu"))
    out = []
    for _ in range(n):
        m = fit.epoch()
        m["val_loss"], m["val_acc"] = fit.evaluate("val")
        out.append(m)
    return fit, out


@pytest.mark.parametrize("k", [0, 2])
def test_training_on_stored_features_is_the_same_training(k):
    base = dataclasses.replace(ctx({"kind": "fixed"}), augment={"enabled": False})
    params = dataclasses.replace(PARAMS, unfrozen_blocks=k, epochs=3, seed=k + 11)
    plain, a = fit_epochs(dataclasses.replace(base, feature_cache=False), params, 3)
    cached, b = fit_epochs(base, params, 3)
    assert plain.split is None and cached.split is not None
    assert "train (" in cached.notes[-2] and "computed" in cached.notes[-2]
    for ma, mb in zip(a, b):
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-4)
        assert mb["val_loss"] == pytest.approx(ma["val_loss"], rel=1e-4)
        assert mb["val_acc"] == ma["val_acc"]
    for (name, va), vb in zip(plain.model.state_dict().items(), cached.model.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), name
    again, _ = fit_epochs(base, params, 1)  # same arch, weights, depth, data, transform: the stored features
    assert any("train (" in n and "reused" in n for n in again.notes)


def test_random_augmentation_still_caches_evaluation_only():
    c = ctx({"kind": "fixed"})  # random resized crops for training
    fit, _ = fit_epochs(c, dataclasses.replace(PARAMS, unfrozen_blocks=1, epochs=1), 1)
    assert fit.split is not None and "train" not in fit.cached and fit.cached["val"] is not None


def test_progressive_unfreezing_cuts_again_at_each_depth():
    c = dataclasses.replace(ctx({"kind": "progressive", "start": 0, "every": 1}), augment={"enabled": False})
    fit, _ = fit_epochs(c, dataclasses.replace(PARAMS, unfrozen_blocks=2, epochs=3), 3)
    cuts = [n for n in fit.notes if n.startswith("k=")]
    assert [n.split(":")[0] for n in cuts] == ["k=0", "k=1", "k=2"]
    assert len({n.split("after ")[1] for n in cuts}) == 3  # three different cut points


def test_a_full_disk_keeps_the_features_in_memory_and_stores_nothing(tmp_path):
    import resource
    import signal

    def compute():
        return torch.ones(64, 1024, 1024)  # 256 MiB: more than the file size limit below

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old[1]))
    try:
        prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        notes = []
        arr, reused = features.load_or_compute(tmp_path, "big", compute, log=notes.append)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, prev)
    assert not reused and arr.shape == (64, 1024, 1024) and "not stored" in notes[0]
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.tmp"))


def test_the_store_key_tells_apart_resize_sizes_and_weight_files(tmp_path, monkeypatch):
    c = ctx({"kind": "fixed"})
    inp = dict(c.input)
    a = features.key_for("resnet18", "w", 4, "layer3", c.data, "val", inp, "cpu", "fp32")
    b = features.key_for("resnet18", "w", 4, "layer3", c.data, "val", dict(inp, resize=inp["resize"] + 4), "cpu",
                         "fp32")
    assert a != b  # same crop, another resize: other pixels, other features
    # a torchvision weights name is identified by the content of the file torchvision loads it from
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = models.hub_file(models.torchvision_weights("resnet18", "IMAGENET1K_V1"))
    path.parent.mkdir(parents=True)
    torch.save(models.build("resnet18", 1000, head="linear").state_dict(), path)
    first = features.weights_id("IMAGENET1K_V1", None, 0, arch="resnet18")
    torch.save({"other": torch.zeros(1)}, path)
    os.utime(path, (1, 1))  # another file under the same name
    assert first.startswith("IMAGENET1K_V1:")
    assert features.weights_id("IMAGENET1K_V1", None, 0, arch="resnet18") != first
