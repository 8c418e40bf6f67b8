"""Cohorts: one cell's search with augmentation on, trials alone vs in cohorts (``resources.cohort``).

    python benchmarks/cohort.py [--depths 0 1] [--trials 16] [--cohort 8] [--size 64] [--precision auto]

For each depth k, the same search runs twice on this machine, one after the other: every trial alone
(``resources.cohort: 1``, 2 at a time, 1 CPU each) and in cohorts of up to ``--cohort`` (2 cohort workers of
1 CPU). The cell: ResNet18 pretrained on 5,000 real MNIST digits (``source:mnist-5k``, pretrained once and
cached), scikit-learn's digits 5-9 at ``--size`` px with 100 training images per class, random resized crop
on (so no stored features: the frozen prefix runs on every batch), batch size 32, 4 epochs, TPE over
optimizer and learning rate, no early stopping (every trial costs its full schedule in both runs).

Prints, per depth: wall time of the whole sweep (Ray start to report), trials/hour, the ratio, and whether the
two runs trained the same configurations to the same results (members train bit for bit as alone; TPE may
propose other configurations when more trials are pending at once).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sweep(k: int, cohort: int, args, tmp: str) -> tuple[float, list]:
    from tl_sweep import runner, spec, tracking

    name = f"k{k}-cohort{cohort}"
    cfg = spec.load(Path(__file__).resolve().parents[1] / "search_spaces" / "freeze_depth.yaml", [
        "study=null", f"name={name}", f"search.num_trials={args.trials}", "search.max_concurrent=2",
        f"search.space.unfrozen_blocks={k}", "search.space.batch_size=32", "search.space.epochs=4",
        "data.train_per_class=100", f"data.image_size={args.size}", "scheduler.kind=fifo",
        f"resources.cohort={cohort}", f"resources.precision={args.precision}", "tracking.log_models=false",
        "tracking.system_metrics=false", f"tracking.uri=sqlite:///{tmp}/bench.db", f"storage={tmp}/ray_results"])
    t0 = time.perf_counter()
    summary = runner.run(cfg, log=lambda m: None)
    wall = time.perf_counter() - t0
    import ray

    ray.shutdown()
    kids = tracking.children(cfg.spec.tracking.uri, summary.experiment_id, summary.parent_run_id)
    return wall, kids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--cohort", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for k in args.depths:
            alone, kids_alone = sweep(k, 1, args, tmp)
            together, kids = sweep(k, args.cohort, args, tmp)
            sizes = sorted(int(r.data.metrics.get("system/cohort_members", 1)) for r in kids)
            done = sum(r.info.status == "FINISHED" for r in kids)
            key = lambda r: (r.data.params["optimizer"], r.data.params["lr_mult"])  # noqa: E731
            before = {key(r): r.data.metrics.get("val_acc") for r in kids_alone}
            both = [r for r in kids if key(r) in before]
            equal = sum(before[key(r)] == r.data.metrics.get("val_acc") for r in both)
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            solo_epoch = med([r.data.metrics["system/epoch_seconds"] for r in kids_alone])
            shared_epoch = med([r.data.metrics["system/epoch_seconds"] / r.data.metrics.get("system/cohort_members", 1)
                                for r in kids])
            start_alone = med([r.data.metrics["system/startup_seconds"] for r in kids_alone])
            start = med([r.data.metrics["system/startup_seconds"] for r in kids])
            print(f"k={k}, {args.trials} trials, {args.size}px, precision {args.precision}, augmentation on:")
            print(f"  wall: alone {alone:.1f}s ({args.trials * 3600 / alone:.0f} trials/h), cohorts of up to "
                  f"{args.cohort} {together:.1f}s ({args.trials * 3600 / together:.0f} trials/h): "
                  f"**{alone / together:.2f}×**")
            print(f"  training compute per trial-epoch (median): alone {solo_epoch:.3f}s, in a cohort "
                  f"{shared_epoch:.3f}s (its epoch's seconds / members): {solo_epoch / shared_epoch:.1f}× less")
            print(f"  start-up, trial entry to first step (median): alone {start_alone:.2f}s, in cohorts {start:.2f}s")
            print(f"  {done} of {len(kids)} FINISHED; members per batch at the last epoch {sizes}; {len(both)} trials "
                  f"ran a configuration also run alone, {equal} of them with the same final val_acc")

if __name__ == "__main__":
    main()
