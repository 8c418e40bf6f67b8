"""Load: many very short trials through the whole stack (Ray Tune, Optuna, MLflow on sqlite).

    python benchmarks/load.py [--trials 200] [--concurrent 2]

Each trial is one tiny epoch (10 images at 16 px, linear probe), so nearly all of its time is the runner's own
overhead: scheduling, the trial's MLflow run, reporting. Prints the wall time, the per-trial overhead, the
driver's peak memory, and checks that every child run reached MLflow.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=2)
    args = ap.parse_args()
    from tl_sweep import runner, spec, tracking

    spec_path = Path(__file__).resolve().parents[1] / "search_spaces" / "freeze_depth.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cfg = spec.load(spec_path, [
            "study=null", "model.weights=none", f"search.num_trials={args.trials}",
            f"search.max_concurrent={args.concurrent}", "search.space.epochs=1", "search.space.batch_size=16",
            "search.space.unfrozen_blocks=0", "data.train_per_class=2", "data.image_size=16", "scheduler.kind=fifo",
            f"tracking.uri=sqlite:///{tmp}/load.db"])
        t0 = time.perf_counter()
        summary = runner.run(cfg, log=lambda m: None)
        wall = time.perf_counter() - t0
        kids = tracking.children(cfg.spec.tracking.uri, summary.experiment_id, summary.parent_run_id)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finished = sum(1 for k in kids if k.info.status == "FINISHED")
    order = sorted(kids, key=lambda k: k.info.start_time)
    train_s = sum(k.data.metrics.get("epoch_seconds", 0) for k in kids)
    print(f"{args.trials} trials, {args.concurrent} concurrent: wall {wall:.0f}s; {len(kids)} child runs in MLflow "
          f"({finished} FINISHED)")
    print(f"per trial: {wall / args.trials:.2f}s wall, of which training {train_s / len(kids):.3f}s; "
          f"overhead {(wall * args.concurrent - train_s) / args.trials:.2f} slot-seconds per trial")
    print(f"driver peak RSS {peak:.0f} MiB")
    for metric, what in (("scheduled_to_first_step_seconds", "trial scheduled to first step (driver clock)"),
                         ("startup_seconds", "trial function entry to first step")):
        times = [k.data.metrics.get(metric, float("nan")) for k in order]
        later = sorted(times[args.concurrent:])
        print(f"start-up, {what}: first {args.concurrent} trials "
              f"{', '.join(f'{x:.2f}s' for x in times[:args.concurrent])}; later trials median "
              f"{later[len(later) // 2]:.2f}s, max {later[-1]:.2f}s")

if __name__ == "__main__":
    main()
