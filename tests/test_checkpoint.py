"""One checkpoint format: a trial's best model rebuilds from the file alone, with weights_only loading."""

from __future__ import annotations

import torch

from tl_sweep import checkpoint, models


def test_a_checkpoint_rebuilds_its_model_without_the_spec(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet18", 3, head="mlp", hidden=16, dropout=0.1, image_size=32)
    inp = {"crop": 32, "resize": 37, "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}
    ckpt = checkpoint.make(model.state_dict(), arch="resnet18", classes=["a", "b", "c"], input=inp,
                           head={"kind": "mlp", "hidden": 16, "dropout": 0.1}, trial={"unfrozen_blocks": 2},
                           epoch=3, val_acc=0.5)
    path = checkpoint.save(ckpt, tmp_path / "best.pt")
    back = checkpoint.load(path)  # weights_only=True
    assert back["format"] == checkpoint.FORMAT and back["classes"] == ["a", "b", "c"] and back["epoch"] == 3
    rebuilt = checkpoint.build_model(back)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(rebuilt(x), model(x))
    assert checkpoint.load(path.read_bytes())["val_acc"] == 0.5  # bytes, as shipped through Ray's object store


def test_a_checkpoint_is_also_a_user_checkpoint(tmp_path):
    model = models.build("resnet18", 2, image_size=32)
    ckpt = checkpoint.make(model.state_dict(), arch="resnet18", classes=["x", "y"], head={"kind": "linear"},
                           input={"crop": 32, "resize": 37, "mean": (0,) * 3, "std": (1,) * 3})
    path = checkpoint.save(ckpt, tmp_path / "c.pt")
    assert set(models.read_checkpoint(path)) == set(model.state_dict())  # model.weights: path/to/best.pt
