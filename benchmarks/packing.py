"""Fractional GPU packing: 1 trial per GPU vs 4 (``resources.gpu: 0.25``), aggregate training img/s.

    python benchmarks/packing.py [--trials 8] [--size 32] [--epochs 8]

The same plain sweep twice on one GPU, one after the other: ``resources.gpu: 1`` (one trial at a time) and
``resources.gpu: 0.25`` (four at a time), small trials that cannot fill a large GPU alone (ResNet18 on
scikit-learn's digits 5-9 at ``--size`` px, 100 training images per class (the most every class has once the
test split is held out), batch 64, all blocks trained, no early stopping). Aggregate img/s =
images trained by all trials / the Tuner phase's wall time. Target: ≥ 1.5× with packing. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("packing.py measures GPU packing and needs a CUDA GPU; none is visible here")
    from tl_sweep import runner, spec, tracking

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        rates = {}
        for share, at_once in ((1.0, 1), (0.25, 4)):
            cfg = spec.load(Path(__file__).resolve().parents[1] / "search_spaces" / "freeze_depth.yaml", [
                "study=null", "model.weights=none", f"name=pack-{at_once}", f"search.num_trials={args.trials}",
                f"search.max_concurrent={at_once}", f"search.space.epochs={args.epochs}",
                "search.space.batch_size=64", "search.space.unfrozen_blocks=max", "data.train_per_class=100",
                f"data.image_size={args.size}", "scheduler.kind=fifo", f"resources.gpu={share}", "resources.cpu=1",
                "tracking.log_models=false", f"tracking.uri=sqlite:///{tmp}/pack.db"])
            phase = {}
            search = runner.search

            def timed(*a, **k):
                t0 = time.perf_counter()
                try:
                    return search(*a, **k)
                finally:
                    phase["s"] = time.perf_counter() - t0

            runner.search = timed
            summary = runner.run(cfg, log=lambda m: None)
            runner.search = search
            kids = tracking.children(cfg.spec.tracking.uri, summary.experiment_id, summary.parent_run_id)
            images = sum(k.data.metrics.get("system/train_img_per_s", 0) * k.data.metrics.get("system/epoch_seconds", 0)
                         * int(k.data.tags.get("tl_sweep.epochs_run", 0)) for k in kids)
            rates[at_once] = images / phase["s"]
            print(f"{at_once} trial(s) per GPU (resources.gpu {share:g}): {len(kids)} trials, Tuner phase "
                  f"{phase['s']:.1f}s, aggregate {rates[at_once]:.0f} img/s")
        print(f"packing 4 per GPU / 1 per GPU: **{rates[4] / rates[1]:.2f}×** (target >= 1.5)")


if __name__ == "__main__":
    main()
