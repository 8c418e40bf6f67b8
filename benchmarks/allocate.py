"""A study under ``study.allocate: grid`` and ``halving``, side by side, read back from MLflow.

    python benchmarks/allocate.py --tracking-uri sqlite:///mlflow.db --grid RUN_ID --halving RUN_ID

For each of the two parent runs (the same spec, run once with each allocation): the cells each search repeat
chose (per source: the depth its finals' validation picked), the NTG verdicts, the trainings, and the compute
they spent (the sum of every run's ``compute_seconds``: search trials and finals, plus the transferability
estimates' seconds); then whether halving reached the same choices and verdicts, and its share of grid's
compute. Also the estimates' share of the study's training compute.
"""

from __future__ import annotations

import argparse

from tl_sweep import tracking
from tl_sweep.report import collect, stats


def summarise(uri: str, run_id: str) -> dict:
    exp_id = tracking.get_run(uri, run_id).info.experiment_id
    sweep = collect.sweep(uri, exp_id, run_id)
    header = collect.describe(sweep)
    a = stats.analyze(sweep.results, collect.chance(header["chance"], header["chance_by_search"]))
    compute = sum(r.seconds or 0.0 for r in sweep.results)
    estimates = sum(v for k, v in sweep.metrics.items() if k.startswith("estimate/") and k.endswith("/seconds"))
    return {
        "chosen": {k: v for k, v in sorted(a.chosen.items()) if k[0] != a.scratch},
        "verdicts": {(c.arm, c.search): c.verdict for c in a.primary},
        "search": sum(not r.config.final for r in sweep.results),
        "finals": sum(r.config.final for r in sweep.results),
        "compute": compute,
        "estimates": estimates,
        "cut": [(c.search, f"{c.arm}@k={c.depth}", c.trials) for c in stats.cut_cells(a)],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--grid", required=True, help="parent run id of the grid study")
    ap.add_argument("--halving", required=True, help="parent run id of the halving study")
    args = ap.parse_args()
    g, h = summarise(args.tracking_uri, args.grid), summarise(args.tracking_uri, args.halving)
    for name, s in (("grid", g), ("halving", h)):
        print(f"{name}: {s['search']} search trials + {s['finals']} finals, {s['compute']:.0f} compute-s "
              f"(estimates {s['estimates']:.1f} s = {100 * s['estimates'] / max(s['compute'], 1e-9):.1f}% of it)")
        for (arm, search), depth in s["chosen"].items():
            print(f"  repeat {search}: {arm} chose k={depth}; verdict {s['verdicts'].get((arm, search), '–')}")
        for search, cell, n in s["cut"]:
            print(f"  cut: repeat {search}: {cell} after {n} trials")
    same_depth = g["chosen"] == h["chosen"]
    same_verdict = g["verdicts"] == h["verdicts"]
    print(f"halving vs grid: same chosen depths: {same_depth}; same verdicts: {same_verdict}; "
          f"compute {100 * h['compute'] / g['compute']:.0f}% of grid's")
    for key in sorted(set(g["chosen"]) | set(h["chosen"])):
        if g["chosen"].get(key) != h["chosen"].get(key):
            print(f"  differs: {key}: grid k={g['chosen'].get(key)}, halving k={h['chosen'].get(key)}")
    for key in sorted(set(g["verdicts"]) | set(h["verdicts"])):
        if g["verdicts"].get(key) != h["verdicts"].get(key):
            print(f"  differs: {key}: grid {g['verdicts'].get(key)}, halving {h['verdicts'].get(key)}")


if __name__ == "__main__":
    main()
