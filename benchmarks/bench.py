"""Data-path and training-path throughput, measured in one run on one device; prints figures and ratios.

    python benchmarks/bench.py [--data ../shared/data/hymenoptera_data] [--size 64] [--arch resnet18]

1. **PIL + torchvision transforms**: what a tutorial trainable does every epoch: decode each JPEG, then
   RandomResizedCrop + flip + ToTensor + Normalize (torchvision.transforms), through a DataLoader.
2. **Cached loader**: tl-sweep's path: uint8 batches read from the memory-mapped decode-once cache, then the
   batched random-resized-crop + flip + normalise on tensors (``data.Augmenter``).
3. **Training step ceiling per depth**: forward + backward + SGD step of the model on synthetic data already
   on the device, for 0 … all unfrozen blocks (frozen blocks: no grad, BatchNorm in eval).
4. **Trial pipeline per depth**: cache → augmentation → the same step, as ``train.Fit.epoch`` runs it.
5. **Frozen-prefix feature cache per depth** (``data.augment: none``): seconds per epoch of ``train.Fit``
   after the first, recomputing the frozen prefix vs training the suffix on its stored features.
6. ``--compile``: torch.compile of the full model, its compile time and step rate vs eager.

Ratios: cached loader / training step at full fine-tuning (target ≥ 3: data never what a trial waits on),
PIL path / cached loader, pipeline / ceiling per depth (target ≥ 0.8), recomputed / cached epoch per depth
(target ≥ 5 where the prefix is most of the work). No Ray, no MLflow: the same script runs on a GPU machine
with only torch and torchvision.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tl_sweep import data, models, train  # noqa: E402


def timed(fn, n_items: int, min_seconds: float = 2.0, warmup: int = 1) -> float:
    """Items per second of ``fn`` (which processes ``n_items``), repeated for at least ``min_seconds``."""
    for _ in range(warmup):
        fn()
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return reps * n_items / dt


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pil_epoch(root: Path, size: int, batch: int) -> tuple[callable, int]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD)])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    return (lambda: [None for _ in loader]), len(ds)


def cached_epoch(p: data.Prepared, size: int, batch: int, device) -> tuple[callable, int]:
    batches = train.Batches.of(p, "train", device)
    aug = data.Augmenter(crop=size, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=device)
    return (lambda: [aug.train(x.to(device)) for x, _ in batches(batch, shuffle=True)]), len(batches)


PRECISION = "auto"


def step_fn(model, frozen, x, y, opt):
    def step():
        frozen.train_mode(model)
        with train.autocast(x.device, PRECISION):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/hymenoptera_data"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=4,
                    help="epochs per feature-cache measurement (at least 2: the first builds the cache)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile on CPU)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 autocast on a GPU, fp32 on a CPU (as resources.precision)")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: the first epoch builds the feature cache, the others are timed")
    global PRECISION
    PRECISION = args.precision
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, " \
                                                                        f"{torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {args.arch} at {args.size}px, batch {args.batch}, "
          f"precision {args.precision}")
    root = Path(args.data)
    resize = round(args.size / 0.875)
    t0 = time.perf_counter()
    p = data.prepare(f"imagefolder:{root}", size=resize, seed=0, split=(0.6, 0.2, 0.2), log=lambda m: None)
    print(f"decode-once cache: {len(p.labels)} images at {resize}px in {time.perf_counter() - t0:.1f}s "
          f"({'reused' if p.reused else 'built'})")

    fn, n = pil_epoch(root, args.size, args.batch)
    pil = timed(fn, n, args.seconds)
    fn, n = cached_epoch(p, args.size, args.batch, device)
    cached = timed(fn, n, args.seconds)

    classes = len(p.classes)
    model = models.build(args.arch, classes, image_size=args.size).to(device)
    part = models.partition(model, args.arch)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)
    batches = train.Batches.of(p, "train", device)
    aug = data.Augmenter(crop=args.size, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=device)
    rows = []
    for k in range(len(part) + 1):
        frozen = models.freeze(model, part, k)
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
        ceiling = timed(step_fn(model, frozen, x, y, opt), args.batch, args.seconds)

        def pipeline():
            for xb, yb in batches(args.batch, shuffle=True):
                step_fn(model, frozen, aug.train(xb.to(device)), yb.to(device), opt)()

        real = timed(pipeline, len(batches), args.seconds)
        rows.append((k, ceiling, real))

    cache_rows = feature_cache(p, args, device, len(part))
    compiled = compile_rates(args, device, classes) if args.compile else None

    full = rows[-1][1]
    print(f"\n{'path':44s} {'img/s':>9s}")
    print(f"{'1. PIL decode + torchvision transforms':44s} {pil:9.0f}")
    print(f"{'2. cached loader (memmap + tensor augment)':44s} {cached:9.0f}")
    print(f"{'3. training step, all blocks unfrozen':44s} {full:9.0f}")
    print(f"\ncached loader / training step:   {cached / full:6.1f}x  (target >= 3)")
    print(f"cached loader / PIL transforms:  {cached / pil:6.1f}x")
    print(f"\n{'unfrozen blocks':>15s} {'ceiling img/s':>14s} {'trial img/s':>12s} {'trial/ceiling':>14s} "
          f"{'vs full FT':>10s}")
    for k, ceiling, real in rows:
        print(f"{k:15d} {ceiling:14.0f} {real:12.0f} {real / ceiling:14.2f} {ceiling / full:9.2f}x")
    print(f"\nfrozen-prefix feature cache (augment: none), seconds per epoch after the first, "
          f"{len(batches)} training images:")
    print(f"{'unfrozen blocks':>15s} {'recompute s':>12s} {'cached s':>9s} {'speed-up':>9s} {'first epoch':>12s}  cut")
    for k, plain, cached, first, cut in cache_rows:
        print(f"{k:15d} {plain:12.3f} {cached:9.3f} {plain / cached:8.1f}x {first:11.3f}s  {cut}")
    if compiled:
        eager, rate, secs = compiled
        gain = len(batches) / eager - len(batches) / rate  # seconds saved per epoch
        pays = f"pays back after {secs / gain:.0f} epochs" if gain > 0 else "never pays back (slower)"
        print(f"\ntorch.compile (all blocks): eager {eager:.0f} img/s, compiled {rate:.0f} img/s, "
              f"compile {secs:.1f}s: {pays}")


def feature_cache(p: data.Prepared, args, device, n_blocks: int) -> list[tuple]:
    """Per depth: median epoch seconds (epochs 2..) recomputing the prefix vs on stored features."""
    import dataclasses
    import statistics
    import tempfile

    from tl_sweep.contract import TrialConfig, TrialContext

    ctx = TrialContext(
        arch=args.arch, arms={"bench": ("none", None)}, head="linear", head_hidden=0, head_dropout=0.0,
        regime={"kind": "fixed"}, input={"crop": args.size, "resize": round(args.size / 0.875),
                                         "mean": models.IMAGENET_MEAN, "std": models.IMAGENET_STD},
        augment={"enabled": False}, data=p, seed=0, min_epochs=1, use_gpu=device.type == "cuda",
        precision=args.precision)
    params = TrialConfig.of(batch_size=args.batch, optimizer="sgd", lr_mult=1.0, head_lr_mult=1.0, weight_decay=0.0,
                            unfrozen_blocks=0, epochs=args.epochs, arm="bench", seed=0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:  # a fresh store: the first epoch computes the features
        ctx = dataclasses.replace(ctx, data=dataclasses.replace(p, cache=str(Path(tmp) / "data" / "x.npy")))
        os.makedirs(Path(tmp) / "data")
        os.symlink(p.cache, ctx.data.cache)
        for k in range(n_blocks):
            times = {}
            for on in (False, True):
                fit = train.Fit(dataclasses.replace(ctx, feature_cache=on),
                                dataclasses.replace(params, unfrozen_blocks=k),
                                device)
                secs = []
                for _ in range(args.epochs):
                    t0 = time.perf_counter()
                    fit.epoch()
                    sync()
                    secs.append(time.perf_counter() - t0)
                times[on] = (statistics.median(secs[1:]), secs[0], fit.split.cut if fit.split else "-")
            out.append((k, times[False][0], times[True][0], times[True][1], times[True][2]))
    return out


def compile_rates(args, device, classes: int) -> tuple[float, float, float]:
    """Eager vs torch.compile img/s of the full training step, and the seconds the first compiled step took."""
    model = models.build(args.arch, classes, image_size=args.size).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)
    frozen = models.freeze(model, models.partition(model, args.arch), len(models.partition(model, args.arch)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    eager = timed(step_fn(model, frozen, x, y, opt), args.batch, args.seconds)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    step_fn(compiled, frozen, x, y, opt)()
    sync()
    secs = time.perf_counter() - t0
    return eager, timed(step_fn(compiled, frozen, x, y, opt), args.batch, args.seconds), secs


if __name__ == "__main__":
    main()
