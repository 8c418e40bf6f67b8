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
    from tl_sweep import contract, runner, spec, tracking

    spec_path = Path(__file__).resolve().parents[1] / "search_spaces" / "freeze_depth.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cfg = spec.load(spec_path, [
            "study=null", "model.weights=none", f"search.num_trials={args.trials}",
            f"search.max_concurrent={args.concurrent}", "search.space.epochs=1", "search.space.batch_size=16",
            "search.space.unfrozen_blocks=0", "data.train_per_class=2", "data.image_size=16", "scheduler.kind=fifo",
            f"tracking.uri=sqlite:///{tmp}/load.db"])
        phases: dict[str, float] = {}
        search = runner.search

        def timed_search(*a, **k):  # the Tuner phase alone: the rest of the wall is fixed cost
            t = time.perf_counter()
            try:
                return search(*a, **k)
            finally:
                phases["search"] = time.perf_counter() - t
                phases["before"] = t - t0

        runner.search = timed_search
        t0 = time.perf_counter()
        summary = runner.run(cfg, log=lambda m: None)
        wall = time.perf_counter() - t0
        kids = tracking.children(cfg.spec.tracking.uri, summary.experiment_id, summary.parent_run_id)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finished = sum(1 for k in kids if k.info.status == "FINISHED")
    order = sorted(kids, key=lambda k: k.info.start_time)
    m = lambda name: [k.data.metrics.get(contract.mlflow_key(name), 0.0) for k in order]  # noqa: E731
    n, c, search_s = args.trials, args.concurrent, phases["search"]
    train_s, startup, compute = sum(m("epoch_seconds")), m("startup_seconds"), m("compute_seconds")
    slot = search_s * c / n  # slot-seconds each trial held, scheduling included
    print(f"{n} trials, {c} concurrent: wall {wall:.1f}s; {len(kids)} child runs in MLflow ({finished} FINISHED)")
    print(f"fixed cost: {phases['before']:.1f}s before the Tuner (imports done: checks, data, MLflow parent run, "
          f"Ray start), {wall - search_s - phases['before']:.1f}s after it (closing runs, report, model)")
    print(f"Tuner phase {search_s:.1f}s: {slot:.3f} slot-seconds per trial, of which training "
          f"{train_s / n:.3f}s; runner overhead {slot - train_s / n:.3f} slot-seconds per trial")
    later = lambda xs: sorted(xs[c:])  # noqa: E731
    med = lambda xs: later(xs)[len(xs[c:]) // 2]  # noqa: E731
    inside = [a - b for a, b in zip(compute, m("epoch_seconds"))]
    print(f"  in the trial (median of later trials): entry to first step {med(startup):.3f}s (data, model, "
          f"MLflow run), "
          f"entry to last metric minus training {med(inside):.3f}s; the rest of the slot is Ray Tune's and the "
          f"driver's (scheduling, searcher, callbacks, result transfer): {slot - med(compute):.3f}s")
    print(f"end to end: {wall / n:.3f}s wall per trial; overhead {(wall * c - train_s) / n:.2f} slot-seconds per "
          f"trial including the fixed cost")
    print(f"driver peak RSS {peak:.0f} MiB")
    for metric, what in (("scheduled_to_first_step_seconds", "trial scheduled to first step (driver clock)"),
                         ("startup_seconds", "trial function entry to first step")):
        times = m(metric)
        print(f"start-up, {what}: first {c} trials {', '.join(f'{x:.2f}s' for x in times[:c])}; later trials "
              f"median {med(times):.2f}s, max {later(times)[-1]:.2f}s")


if __name__ == "__main__":
    main()
