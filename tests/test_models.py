"""The block table over every torchvision model; freezing; heads; parameter groups; weights loading."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
from torch import nn

from tl_sweep import models
from tl_sweep.errors import UserError

ARCHS = models.list_archs()


def bare(arch: str, num_classes: int = 5, device: str = "meta", head: str = "linear") -> nn.Module:
    try:
        with torch.device(device):
            m = models._build_bare(arch, num_classes, None)
    except NotImplementedError:  # regnet computes its widths with tensor ops that meta cannot run
        m = models._build_bare(arch, num_classes, None)
    return models.replace_head(m, arch, num_classes, head)


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_cover_every_parameter_once(arch):
    m = bare(arch)
    part = models.partition(m, arch)
    assert len(part) == models.num_blocks(arch) >= 4
    head = set(models.head_parameters(m, arch))
    assert head, "the head has parameters"
    for name, _ in m.named_parameters():
        hits = [i for i, b in enumerate(part.blocks) if any(p.match(name) for p in b)]
        assert (hits == []) if name in head else (len(hits) == 1), (name, hits)
    for k in (0, 1, len(part)):
        frozen = models.freeze(m, part, k)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        blocks = {n: part.block_of(n) for n, _ in m.named_parameters()}
        expected = head | {n for n, b in blocks.items() if b is not None and b >= len(part) - k}
        assert trainable == expected
        assert frozen.trainable_blocks == list(range(len(part) - k, len(part)))


def test_resnet18_blocks_are_stem_and_four_stages():
    m = bare("resnet18")
    part = models.partition(m, "resnet18")
    firsts = [next(n for n, _ in m.named_parameters() if part.block_of(n) == i) for i in range(len(part))]
    assert firsts == ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight",
                      "layer3.0.conv1.weight", "layer4.0.conv1.weight"]


# one model per family, with an input size that fits it; forward + backward on CPU
SMALL = {"resnet18": 32, "regnet_x_400mf": 32, "alexnet": 64, "vgg11_bn": 32, "squeezenet1_1": 48,
         "densenet121": 32, "efficientnet_b0": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
         "mobilenet_v3_large": 32, "mnasnet0_5": 32, "shufflenet_v2_x0_5": 32, "googlenet": 64,
         "inception_v3": 80, "convnext_tiny": 32, "swin_t": 64, "maxvit_t": 224, "vit_b_32": 32}


def test_small_set_covers_every_family():
    assert {models.family(a).name for a in SMALL} == {f.name for f in models.FAMILIES}


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_forward_backward_trains_only_unfrozen(arch):
    torch.manual_seed(0)
    size = SMALL[arch]
    m = models.build(arch, 3, image_size=size)
    part = models.partition(m, arch)
    frozen = models.freeze(m, part, 1)
    frozen.train_mode(m)
    out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)
    out.sum().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, f"gradient reached frozen {name}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters()
               if n in models.head_parameters(m, arch))


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "mobilenet_v2", "vgg11_bn", "efficientnet_b0"])
def test_frozen_batchnorm_keeps_its_statistics(arch):
    torch.manual_seed(0)
    m = models.build(arch, 4)
    part = models.partition(m, arch)
    frozen = models.freeze(m, part, 2)
    first_trained = len(part) - 2
    bns = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    before = {n: (b.running_mean.clone(), b.num_batches_tracked.clone()) for n, b in bns.items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        frozen.train_mode(m)
        loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32) * 3 + 1), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, b in bns.items() if not torch.equal(b.running_mean, before[n][0])}
    for n in bns:
        block = part.block_of(n + ".")
        if block is not None and block < first_trained:
            assert n not in changed, f"frozen BatchNorm {n} updated its running statistics"
            assert torch.equal(bns[n].num_batches_tracked, before[n][1])
        elif block is not None:
            assert n in changed, f"trained BatchNorm {n} did not update"


def test_frozen_prefix_records_no_autograd_graph():
    m = models.build("resnet18", 5)
    frozen = models.freeze(m, models.partition(m, "resnet18"), 2)  # layer3, layer4 + fc train
    seen = {}
    for name in ("layer2", "layer3"):
        m.get_submodule(name).register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o))
    frozen.train_mode(m)
    m(torch.randn(2, 3, 32, 32))
    assert seen["layer2"].grad_fn is None and not seen["layer2"].requires_grad  # no graph, no saved activations
    assert seen["layer3"].requires_grad


def test_dropout_in_frozen_block_stays_eval():
    m = models.build("vgg11", 3)
    part = models.partition(m, "vgg11")
    frozen = models.freeze(m, part, 0)
    frozen.train_mode(m)
    assert not m.classifier[2].training  # dropout of the frozen fc6 block
    assert m.classifier[6].training  # the new head trains


def test_heads():
    m = models.build("resnet18", 7, head="mlp")
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert isinstance(m.fc, nn.Sequential) and isinstance(m.fc[2], nn.Dropout)
    b = models.build("squeezenet1_1", 2, head="binary")
    assert b(torch.randn(2, 3, 48, 48)).shape == (2, 1)
    assert isinstance(b.classifier[2], nn.Identity)  # no ReLU clipping the logit
    lin = models.build("resnet18", 3)
    assert torch.count_nonzero(lin.fc.bias) == 0  # xavier weights, zero bias


def test_param_groups_head_multiplier_layer_decay_and_no_decay_on_norms():
    m = models.build("resnet18", 5)
    part = models.partition(m, "resnet18")
    frozen = models.freeze(m, part, 2)
    groups = models.param_groups(m, part, frozen, lr=0.1, weight_decay=1e-4, head_lr_mult=10, layer_decay=0.5)
    by = {(g["name"], g["weight_decay"] > 0): g for g in groups}
    assert by[("head", True)]["lr"] == pytest.approx(1.0)
    assert by[("block4", True)]["lr"] == pytest.approx(0.05)  # one below the head
    assert by[("block3", True)]["lr"] == pytest.approx(0.025)
    assert {n for n, _ in by} == {"head", "block3", "block4"}
    for g in groups:
        assert all((p.ndim <= 1) == (g["weight_decay"] == 0) for p in g["params"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in m.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no download, ever, even where there is a network
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    return tmp_path


def test_torchvision_weights_load_from_the_hub_cache(torch_home):
    ref = bare("resnet18", 1000, device="cpu")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    w = models.torchvision_weights("resnet18", "IMAGENET1K_V1")
    path = models.hub_file(w)
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    m = models.build("resnet18", 5, weights="DEFAULT")
    assert torch.equal(m.conv1.weight, state["conv1.weight"])
    assert torch.equal(m.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert m.fc.out_features == 5


def test_missing_weights_name_the_file_and_url(torch_home):
    with pytest.raises(UserError) as e:
        models.build("resnet18", 5, weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "\n" not in msg


def test_checkpoint_wrapped_and_prefixed(tmp_path):
    src = models.build("resnet18", 10)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    m = models.build("resnet18", 5, weights=str(path), weights_file=str(path))
    assert torch.equal(m.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert m.fc.out_features == 5  # a new head, whatever the checkpoint's head was


@pytest.mark.parametrize("kind, expected", [
    ("other_arch", "is not a resnet18 checkpoint: missing"),
    ("variant", "unexpected"),
    ("corrupt", "is not a loadable PyTorch checkpoint"),
    ("not_state", "holds no state dict"),
])
def test_bad_checkpoints_are_one_line(tmp_path, kind, expected):
    path = tmp_path / f"{kind}.pt"
    if kind == "other_arch":
        torch.save(models.build("mobilenet_v2", 3).state_dict(), path)
    elif kind == "variant":
        torch.save(models.build("resnet34", 3).state_dict(), path)
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 definitely not a zip")
    else:
        torch.save({"model": "resnet18"}, path)
    with pytest.raises(UserError) as e:
        models.build("resnet18", 5, weights=str(path), weights_file=str(path))
    assert expected in str(e.value) and "\n" not in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/tl-sweep-evil')}",))


def test_malicious_checkpoint_does_not_execute(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        models.read_checkpoint(path)
    assert not mark.exists()


def test_unknown_arch_suggests_close_names():
    with pytest.raises(UserError, match=re.escape("did you mean resnet18")):
        models.family("resnet-18")


def test_the_shipped_catalog_is_the_installed_torchvisions():
    """tl_sweep/catalog.json (what a spec is checked against without importing torch) says what the installed
    torchvision says, model by model; `python -m tl_sweep.catalog` writes it again after an upgrade."""
    import json

    import torchvision

    from tl_sweep import catalog

    stored = json.loads(catalog.FILE.read_text())
    assert stored["torchvision"] == torchvision.__version__.split("+")[0], "python -m tl_sweep.catalog"
    live = catalog.live()["archs"]
    assert list(stored["archs"]) == list(live)
    for arch, row in live.items():
        assert stored["archs"][arch] == row, arch
        assert list(stored["archs"][arch]["weights"]) == list(row["weights"])  # torchvision's order
    assert catalog.input_spec("resnet18", "none") == models.input_spec("resnet18", "none")
    assert catalog.num_blocks("vit_b_16") == models.num_blocks("vit_b_16", 224) == models.num_blocks("vit_b_16", 384)
