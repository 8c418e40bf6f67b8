"""A study under ``study.allocate: grid`` and ``halving``, side by side, read back from MLflow.

    python benchmarks/allocate.py --tracking-uri sqlite:///mlflow.db --grid RUN_ID --halving RUN_ID \
        [--halving-tracking-uri sqlite:///other.db]

For each of the two parent runs (the same spec, run once with each allocation): the cells each search repeat
chose (per source: the depth its finals' validation picked), the NTG verdicts, the trainings, and the compute
they spent (the sum of every run's ``compute_seconds``: search trials and finals; the transferability
estimates' seconds apart); then whether halving reached the same choices and verdicts, and its share of grid's
compute; the floor (what training only the scratch cell and the cells grid chose costs: no allocation that
trains grid's choices can spend less); and, for each choice that differs, how halving's cell did in grid's own
finals. Also the estimates' share of the study's training compute.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

from tl_sweep import tracking, transferability
from tl_sweep.report import collect, stats
from tl_sweep.study import Cell


def summarise(uri: str, run_id: str) -> dict:
    exp_id = tracking.get_run(uri, run_id).info.experiment_id
    sweep = collect.sweep(uri, exp_id, run_id)
    header = collect.describe(sweep)
    # the report's own analysis: each final's per-image predictions (intervals over seeds and images)
    a = stats.analyze(sweep.results, collect.chance(header["chance"], header["chance_by_search"]),
                      collect.predictions(uri, sweep.results))
    compute = sum(r.seconds or 0.0 for r in sweep.results)
    estimates = sum(v for k, v in sweep.metrics.items() if k.startswith(f"{transferability.PREFIX}/")
                    and k.endswith("/seconds"))
    chosen = {k: v for k, v in sorted(a.chosen.items()) if k[0] != a.scratch}
    # the least any allocation can spend and still train what this design chose: the scratch cell's search and
    # finals (every verdict's baseline, always given its full budget) and each chosen cell's search and finals
    needed = {(arm, depth, search) for (arm, search), depth in chosen.items()}
    floor = sum(r.seconds or 0.0 for r in sweep.results
                if r.config.arm == a.scratch or (r.config.arm, r.config.unfrozen_blocks, r.config.search) in needed)
    return {
        "chosen": chosen,
        "verdicts": {(c.arm, c.search): c.verdict for c in a.primary},
        "headline": {arm: v for arm, v in a.verdicts.items()},
        "per_depth": {(c.arm, c.depth, c.search): (c.verdict, c.gap) for c in a.per_depth},
        "cells": a.cells,
        "search": sum(not r.config.final for r in sweep.results),
        "finals": sum(r.config.final for r in sweep.results),
        "compute": compute,
        "floor": floor,
        "estimates": estimates,
        "cut": [(c.search, f"{c.arm}@k={c.depth}", c.trials) for c in stats.cut_cells(a)],
    }


def modal(chosen: dict[tuple[str, int], int]) -> dict[str, str]:
    """Per source, the depths chosen over the search repeats, most often first."""
    by: dict[str, list[int]] = {}
    for (arm, _), depth in sorted(chosen.items()):
        by.setdefault(arm, []).append(depth)
    return {arm: ", ".join(f"k={d} ×{n}" for d, n in Counter(ds).most_common()) for arm, ds in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--grid", required=True, help="parent run id of the grid study")
    ap.add_argument("--halving", required=True, help="parent run id of the halving study")
    ap.add_argument("--halving-tracking-uri", help="where the halving study is, if not in --tracking-uri")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per final's predictions
    g = summarise(args.tracking_uri, args.grid)
    h = summarise(args.halving_tracking_uri or args.tracking_uri, args.halving)
    for name, s in (("grid", g), ("halving", h)):
        print(f"{name}: {s['search']} search trials + {s['finals']} finals, {s['compute']:.0f} compute-s "
              f"(estimates {s['estimates']:.1f} s = {100 * s['estimates'] / max(s['compute'], 1e-9):.1f}% of it)")
        for (arm, search), depth in s["chosen"].items():
            print(f"  repeat {search}: {arm} chose k={depth}; verdict {s['verdicts'].get((arm, search), '–')}")
        for arm, v in s["headline"].items():
            print(f"  {arm} pooled over the repeats: NTG {100 * v.pooled.value:+.1f} [{100 * v.pooled.lo:+.1f}, "
                  f"{100 * v.pooled.hi:+.1f}] points; {v.verdict}")
        print("  chosen over the repeats: " + "; ".join(f"{arm}: {d}" for arm, d in modal(s["chosen"]).items()))
        for search, cell, n in s["cut"]:
            print(f"  cut: repeat {search}: {cell} after {n} trials")
    same_depth = sum(g["chosen"].get(k) == v for k, v in h["chosen"].items())
    same_verdict = sum(g["verdicts"].get(k) == v for k, v in h["verdicts"].items())
    def kind(v) -> str:  # "not resolved", "transfer gain", ...: the verdict without its figures
        return v.verdict.split(":")[0]

    same_headline = sum(g["headline"].get(k) is not None and kind(g["headline"][k]) == kind(v)
                        for k, v in h["headline"].items())
    print(f"halving vs grid: same chosen depth in {same_depth} of {len(g['chosen'])} (source, repeat) pairs; "
          f"same per-repeat verdict in {same_verdict} of {len(g['verdicts'])}; same pooled verdict for "
          f"{same_headline} of {len(g['headline'])} sources; compute {100 * h['compute'] / g['compute']:.0f}% "
          f"of grid's")
    print(f"floor: training only the scratch cell and the cells grid chose (search + finals) costs "
          f"{100 * g['floor'] / g['compute']:.0f}% of grid's compute: no allocation reaching grid's choices by "
          f"training them spends less")
    for key in sorted(set(g["chosen"]) | set(h["chosen"])):
        gd, hd = g["chosen"].get(key), h["chosen"].get(key)
        if gd == hd:
            continue
        arm, search = key
        mine, theirs = g["cells"].get(Cell(search, arm, hd)), g["cells"].get(Cell(search, arm, gd))
        line = f"  differs: {key}: grid k={gd}, halving k={hd}"
        if mine is not None and theirs is not None and mine.test and theirs.test:
            verdict, gap = g["per_depth"].get((arm, hd, search), ("–", None))
            line += (f"; in grid's own finals halving's cell scored val {100 * mine.val:.1f}% / test "
                     f"{100 * mine.test[0]:.1f}% against grid's choice {100 * theirs.val:.1f}% / "
                     f"{100 * theirs.test[0]:.1f}% (test {100 * (mine.test[0] - theirs.test[0]):+.1f} points), "
                     f"its descriptive verdict there: {verdict}")
        print(line)
    for key in sorted(set(g["verdicts"]) | set(h["verdicts"])):
        if g["verdicts"].get(key) != h["verdicts"].get(key):
            print(f"  differs: {key}: grid {g['verdicts'].get(key)}, halving {h['verdicts'].get(key)}")


if __name__ == "__main__":
    main()
