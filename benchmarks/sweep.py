"""Sweep throughput: tl-sweep vs the tutorial-style trainable a user would otherwise write, on the same trials.

    python benchmarks/sweep.py [--data ../shared/data/hymenoptera_data] [--size 64] [--trials 8]
                               [--augment both|on|off] [--precision auto|bf16|fp32] [--cohort 1]

1. **tl-sweep**: ``runner.run`` on a small spec (ResNet18 from a checkpoint file, ants/bees ImageFolder,
   depths 0/1/all, two learning rates), end to end: Ray start, decode-once cache, Optuna, MLflow on sqlite,
   the leading trial's best weights kept for publishing.
2. **Tutorial-style trainable**: the PyTorch transfer-learning tutorial as a Ray Tune function: an
   ``ImageFolder`` + ``DataLoader`` that decodes every JPEG with PIL every epoch, torchvision transforms,
   fp32, ``model.train()`` on the whole model (frozen BatchNorm keeps updating its statistics), the frozen
   prefix recomputed every step; no tracking. It runs exactly the configurations tl-sweep's search chose
   (``tune.grid_search`` over them), with the same concurrency and CPUs per trial.

``--precision``: tl-sweep's ``resources.precision`` (``auto``: bf16 where the CPU has it natively);
``--cohort N``: its ``resources.cohort`` (trials sharing a frozen prefix train together).

Both are timed from the start to the end of the sweep (Ray start-up included in both). Prints wall time,
trials/hour and the ratio, first without augmentation (the tutorials' "fixed feature extractor" setting, where
tl-sweep trains frozen-prefix trials on cached features), then with random resized crop + flip (no feature
cache possible), unless ``--augment`` picks one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPEC = """
name: bench-sweep
model: {{arch: resnet18, weights: {ckpt}}}
data: {{dataset: "imagefolder:{root}", image_size: {size}{augment}}}
search:
  num_trials: {trials}
  max_concurrent: 2
  space: {{unfrozen_blocks: [0, 1, 5], optimizer: sgd, lr_mult: [0.5, 2.0], batch_size: 32, epochs: {epochs}}}
scheduler: {{kind: fifo}}
resources: {{precision: {precision}, cohort: {cohort}, gpu: {gpu}}}
tracking: {{uri: "sqlite:///{tmp}/bench.db"}}
storage: {tmp}/ray_results
"""


def tutorial_trainable(config: dict) -> None:
    """The PyTorch transfer-learning tutorial's loop (finetuning_torchvision_models), one trial."""
    config = config["cfg"]
    import torch
    import torchvision
    from ray import tune
    from torch import nn
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the tutorial: its GPU, if given one
    size, root = config["size"], Path(config["root"])
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    val_tf = transforms.Compose([transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), norm])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm]) if config["augment"] else val_tf
    train_set = datasets.ImageFolder(str(root / "train"), train_tf)
    val_set = datasets.ImageFolder(str(root / "val"), val_tf)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=config["batch_size"], shuffle=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=config["batch_size"])

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(config["ckpt"], weights_only=True))
    blocks = [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3], [model.layer4]]
    for block in blocks[:len(blocks) - config["unfrozen_blocks"]]:
        for m in block:
            for p in m.parameters():
                p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(train_set.classes))
    model.to(device)
    lr = 0.1 * config["lr_mult"] * config["batch_size"] / 256
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config["epochs"]):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        tune.report({"val_acc": correct / len(val_set)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/hymenoptera_data"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--augment", choices=["both", "on", "off"], default="both",
                    help="train with random resized crop + flip (on), without (off), or each in turn (both)")
    ap.add_argument("--cohort", type=int, default=1, help="tl-sweep's resources.cohort")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="tl-sweep's resources.precision (the tutorial trainable is fp32 either way)")
    args = ap.parse_args()

    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"
    print(f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}")
    for augment in ([False, True] if args.augment == "both" else [args.augment == "on"]):
        compare(args, augment)


def compare(args, augment: bool) -> None:
    """tl-sweep's sweep, then the tutorial-style trainable on the configurations it ran; prints both."""
    import ray
    import torch
    import torchvision
    from ray import tune

    from tl_sweep import runner, spec, tracking

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TL_SWEEP_CACHE"] = f"{tmp}/cache"  # nothing decoded or cached before the clock starts
        os.chdir(tmp)
        ckpt = Path(tmp) / "resnet18-source.pt"
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), ckpt)
        share = 0.5 if torch.cuda.is_available() else 0  # 2 trials at a time, each half the GPU, in both sweeps
        Path("spec.yaml").write_text(SPEC.format(
            ckpt=ckpt, root=Path(args.data).resolve(), size=args.size, trials=args.trials, epochs=args.epochs,
            tmp=tmp, augment="" if augment else ", augment: none", precision=args.precision, cohort=args.cohort,
            gpu=share))
        cfg = spec.load(Path("spec.yaml"))

        t0 = time.perf_counter()
        summary = runner.run(cfg, log=lambda m: None)
        ours = time.perf_counter() - t0
        ray.shutdown()
        kids = tracking.children(cfg.spec.tracking.uri, summary.experiment_id, summary.parent_run_id)
        configs = [{k: type(v)(kid.data.params[k]) for k, v in
                    (("unfrozen_blocks", 0), ("lr_mult", 0.0), ("batch_size", 0), ("epochs", 0))} for kid in kids]
        ours_acc = sorted(kid.data.metrics["best_val_acc"] for kid in kids)
        order = sorted(kids, key=lambda k: k.info.start_time)
        startup = [k.data.metrics.get("system/scheduled_to_first_step_seconds", float("nan")) for k in order]
        members = sorted(int(k.data.metrics.get("system/cohort_members", 1)) for k in kids)

        t0 = time.perf_counter()
        ray.init(logging_level="WARNING", include_dashboard=False)
        fixed = {"size": args.size, "root": str(Path(args.data).resolve()), "ckpt": str(ckpt), "augment": augment}
        tuner = tune.Tuner(
            tune.with_resources(tutorial_trainable, {"cpu": 1, "gpu": share}),
            param_space={"cfg": tune.grid_search([{**c, **fixed} for c in configs])},
            tune_config=tune.TuneConfig(max_concurrent_trials=2),
            run_config=tune.RunConfig(storage_path=f"{tmp}/peer", verbose=0))
        results = tuner.fit()
        peer = time.perf_counter() - t0
        ray.shutdown()
        peer_acc = sorted(max(r.metrics_dataframe["val_acc"]) for r in results)

    n = len(configs)
    mode = "random resized crop + flip" if augment else "no augmentation (fixed feature extractor)"
    trials = ", ".join(f"k={c['unfrozen_blocks']} lr×{c['lr_mult']:g}" for c in configs)
    each = "1 CPU and half the GPU" if torch.cuda.is_available() else "1 CPU"
    print(f"\n{n} trials ({trials}), {args.epochs} epochs each, {args.size}px, {mode}, 2 concurrent, {each} per "
          f"trial; tl-sweep precision {args.precision}, cohort {args.cohort} (members per batch: {members})")
    print(f"{'':32s} {'wall s':>8s} {'trials/hour':>12s}")
    print(f"{'tl-sweep (Ray Tune+Optuna+MLflow)':32s} {ours:8.1f} {n / ours * 3600:12.0f}")
    print(f"{'tutorial-style trainable':32s} {peer:8.1f} {n / peer * 3600:12.0f}")
    print(f"tl-sweep / tutorial throughput: {peer / ours:.2f}x  (target >= 3 on a CPU, >= 5 on a GPU)")
    first, later = ", ".join(f"{s:.2f}s" for s in startup[:2]), sorted(startup[2:])
    print(f"tl-sweep start-up, trial scheduled to first step: first two {first}; " + (
        f"later median {later[len(later) // 2]:.2f}s, max {later[-1]:.2f}s (target <= 2s)" if later
        else "no later trial (--trials 2 or fewer)"))
    print(f"best val_acc per trial, sorted: tl-sweep {[round(a, 3) for a in ours_acc]}; "
          f"tutorial {[round(a, 3) for a in peer_acc]}")


if __name__ == "__main__":
    main()
