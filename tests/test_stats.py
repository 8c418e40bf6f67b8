"""The study's statistics on hand-computed numbers: intervals, paired and Welch (exact df), Holm, chance,
the depth tie rule, budget curves, and the verdicts a study can give."""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import pytest

from tl_sweep.contract import TrialConfig, TrialResult
from tl_sweep.report import budget, importance, stats


def test_mean_ci_on_known_numbers():
    m, lo, hi = stats.mean_ci([0.8, 0.9, 1.0])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) × sd / sqrt(n)
    assert m == pytest.approx(0.9) and lo == pytest.approx(0.9 - half) and hi == pytest.approx(0.9 + half)
    assert math.isnan(stats.mean_ci([0.7])[1])


def test_paired_interval_uses_the_differences():
    g = stats.paired([0.70, 0.72, 0.75], [0.90, 0.91, 0.92])  # differences 0.20, 0.19, 0.17
    sd = math.sqrt(((0.2 - 0.18667) ** 2 + (0.19 - 0.18667) ** 2 + (0.17 - 0.18667) ** 2) / 2)
    assert g.gap == pytest.approx(0.186667, abs=1e-5) and g.paired and g.df == 2
    assert g.hi - g.gap == pytest.approx(4.302652729911275 * sd / math.sqrt(3), rel=1e-3)
    assert g.p < 0.01


def test_welch_keeps_the_exact_degrees_of_freedom():
    g = stats.welch([0.70, 0.72, 0.74], [0.90, 0.91, 0.92])
    v1, v2 = 4e-4 / 3, 1e-4 / 3  # variances of the means
    df = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 2)  # 2.94, not rounded to 3
    assert g.df == pytest.approx(df) and df == pytest.approx(2.941176, abs=1e-5)
    from scipy import stats as sp

    assert g.hi - g.gap == pytest.approx(sp.t.ppf(0.975, df) * math.sqrt(v1 + v2))
    assert g.hi - g.gap != pytest.approx(3.182446305284263 * math.sqrt(v1 + v2))  # the rounded-df interval


def test_no_spread_gives_no_interval_and_no_verdict():
    """Per-seed accuracies out of 179 test images with a constant gap of 6 images: the differences are equal,
    but their floating-point values are not bit-identical (their stdev is ~1e-17, not 0)."""
    x = [150 / 179, 160 / 179, 171 / 179, 144 / 179, 157 / 179]
    y = [(k * 179 + 6) / 179 for k in x]
    assert statistics.stdev([b - a for a, b in zip(x, y)]) != 0  # what an exact == 0 test would miss
    g = stats.paired(x, y)
    assert math.isnan(g.lo) and math.isnan(g.p) and g.gap == pytest.approx(6 / 179)
    assert stats.verdict(g, corrected=False).startswith("not resolved")
    assert math.isnan(stats.mean_ci([0.3 + 0.6 - 0.6] * 3 + [0.3])[1] - 0.3) is False  # equal values: no width
    m, lo, hi = stats.mean_ci([0.1 + 0.2, 0.3, 0.3])  # 0.30000000000000004 and 0.3
    assert lo == hi == m


def test_holm_on_known_p_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    got = stats.holm([0.2, math.nan])
    assert got[0] == pytest.approx(0.2) and math.isnan(got[1])


def test_above_chance_is_a_one_sided_t_test_over_seeds():
    from scipy import stats as sp

    tests = [0.55, 0.60, 0.58, 0.62, 0.57]
    assert stats.above_chance_p(tests, 0.5) == pytest.approx(sp.ttest_1samp(tests, 0.5, alternative="greater").pvalue)
    assert stats.above_chance_p([0.50, 0.52, 0.49], 0.5) > 0.05  # at the majority-class rate: not shown above
    # seeds that scored alike say nothing about the test images' sampling: not resolved, never p = 0
    assert math.isnan(stats.above_chance_p([0.6, 0.6, 0.6], 0.5)) and math.isnan(stats.above_chance_p([0.4] * 3, 0.5))
    assert math.isnan(stats.above_chance_p([0.9], 0.5))


def test_the_verdict_is_given_whenever_one_side_is_above_chance_and_says_which_is_not():
    harm = stats.Gap(0.057, 0.007, 0.107, 0.039, 2, True, 0.039)  # hymenoptera's repeat 1: source at chance
    assert stats.verdict(harm) == "negative transfer"
    assert stats.verdict(harm, source_above=False) == "negative transfer (source not above chance)"
    gain = stats.Gap(-0.35, -0.45, -0.25, 0.002, 2, True, 0.004)  # ImageNet weights vs a scratch arm at chance
    assert stats.verdict(gain, baseline_above=False) == "transfer gain (scratch did not learn within its budget)"
    assert stats.verdict(gain, source_above=False, baseline_above=False) == "no verdict: neither above chance"
    unsure = stats.Gap(0.02, -0.03, 0.07, 0.3, 4, True, 0.3)  # a claim of harm needs the paired test too
    assert stats.verdict(unsure, source_above=False) == "no significant difference (source not above chance)"
    assert stats.verdict(stats.Gap(0.1, 0.05, 0.15, 0.01, 4, True, 0.06)) == "no significant difference"


def _r(arm, depth, search, seed, val, test=None, role="trial", status="FINISHED", bs=32):
    c = TrialConfig.of(batch_size=bs, weight_decay=0.0, unfrozen_blocks=depth, epochs=2, arm=arm, seed=seed,
                       role=role, search=search)
    return TrialResult(c, status, 2, best_val_acc=val, test_acc=test, seconds=1.0)


def test_analysis_chooses_depth_on_the_selection_not_the_finals_ties_shallow_and_pairs_by_seed():
    results = [_r("src", 0, 0, 0, 0.7), _r("src", 3, 0, 0, 0.8), _r("scratch", 5, 0, 0, 0.6)]
    # selection: depth 0 and 3 tie on their candidates' mean validation (0.85): the shallower is chosen
    results += [_r("src", d, 0, sd, v, role="candidate") for d in (0, 3) for sd, v in ((2000, 0.8), (2001, 0.9))]
    results += [_r("scratch", 5, 0, sd, 0.8, role="candidate") for sd in (2000, 2001)]
    for s, (a, b, c) in zip((1000, 1001, 1002), [(0.80, 0.95, 0.70), (0.82, 0.93, 0.71), (0.81, 0.94, 0.69)]):
        # depth 3's finals validate and test higher: the finals choose nothing, so depth 0 stays chosen
        results += [_r("src", 0, 0, s, 0.80, a, "final"), _r("src", 3, 0, s, 0.99, b, "final"),
                    _r("scratch", 5, 0, s, 0.85, c, "final")]
    a = stats.analyze(results, chance={0: 0.2})
    assert a.chosen[("src", 0)] == 0 and a.chosen[("scratch", 0)] == 5
    assert a.at("src", 0, 0).select_val == pytest.approx(0.85)
    (primary,) = a.primary
    assert primary.depth == 0 and primary.gap.paired
    assert primary.gap.gap == pytest.approx(0.70 - 0.81)  # scratch acc − source acc = source err − scratch err
    assert primary.verdict == "transfer gain"
    assert {c.depth for c in a.per_depth} == {0, 3}
    assert a.stability("src") == {"transfer gain": 1}
    assert all(c.above_chance for c in a.cells.values() if c.final_test)
    assert budget.cost(results)[("src", 3)] == 6.0  # one search trial + two candidates + three finals


def test_holm_corrects_the_verdict_across_sources():
    results = [_r(a, d, 0, 0, 0.7) for a, d in (("a", 0), ("b", 0), ("scratch", 5))]
    finals = {"a": (0.84, 0.85, 0.80, 0.86), "b": (0.78, 0.82, 0.86, 0.81), "scratch": (0.80, 0.81, 0.79, 0.80)}
    for i, s in enumerate((1000, 1001, 1002, 1003)):
        results += [_r(arm, 5 if arm == "scratch" else 0, 0, s, 0.8, t[i], "final") for arm, t in finals.items()]
    a = stats.analyze(results, chance={0: 0.2})
    p = {c.arm: c.gap for c in a.primary}
    assert p["a"].p < p["b"].p  # Holm: the smaller p times 2, the larger as is (but never below the first)
    assert p["a"].p_holm == pytest.approx(min(1, 2 * p["a"].p)) and p["b"].p_holm == pytest.approx(max(p["b"].p,
                                                                                                       2 * p["a"].p))


def test_chance_is_tested_per_cell_and_holm_corrected_across_the_study():
    results = [_r(a, d, 0, 0, 0.5) for a, d in (("src", 0), ("src", 2), ("src", 3), ("scratch", 5))]
    finals = {("src", 0): (0.21, 0.24, 0.19, 0.25, 0.23), ("src", 2): (0.60, 0.65, 0.62, 0.61, 0.66),
              ("src", 3): (0.21, 0.25, 0.19, 0.26, 0.23), ("scratch", 5): (0.63, 0.58, 0.61, 0.64, 0.60)}
    for i, s in enumerate((1000, 1001, 1002, 1003, 1004)):
        results += [_r(arm, d, 0, s, 0.6, t[i], "final") for (arm, d), t in finals.items()]
    a = stats.analyze(results, chance={0: 0.2})
    probe = a.at("src", 0, 0)
    raw = stats.above_chance_p(list(finals[("src", 0)]), 0.2)
    # 0.045 alone; the third smallest of four p-values, Holm multiplies it by 2
    assert raw < 0.05 and probe.p_chance == pytest.approx(2 * raw) and probe.p_chance > 0.05
    assert not probe.above_chance and a.at("src", 2, 0).above_chance
    comp = next(c for c in a.per_depth if c.depth == 0)
    assert comp.verdict == "negative transfer (source not above chance)"


def test_parent_metrics_carry_the_study_per_search_repeat():
    results = [_r("source:x", 2, 0, 0, 0.7), _r("scratch", 5, 0, 0, 0.6)]
    for s, (a, b) in zip((1000, 1001, 1002), [(0.90, 0.80), (0.92, 0.81), (0.91, 0.79)]):
        results += [_r("source:x", 2, 0, s, 0.9, a, "final"), _r("scratch", 5, 0, s, 0.8, b, "final")]
    m = stats.parent_metrics(stats.analyze(results, chance={0: 0.2}))[0]
    assert m["study/source_x/depth"] == 2 and m["study/scratch/depth"] == 5
    assert m["study/source_x/test_acc"] == pytest.approx(0.91) and m["study/source_x/ntg"] == pytest.approx(-0.11)
    assert m["study/source_x/ntg_lo"] < m["study/source_x/ntg"] < m["study/source_x/ntg_hi"] < 0
    assert "study/scratch/ntg" not in m


def test_halving_cut_cells_get_no_finals_and_the_report_says_which_and_when():
    from tl_sweep import study
    from tl_sweep.report import render

    search = ([_r("src", 0, 0, i, 0.6 + i / 100) for i in range(2)] + [_r("src", 3, 0, i, 0.8) for i in range(4)]
              + [_r("scratch", 5, 0, i, 0.7) for i in range(4)])
    chosen = study.candidates(search, seed=0, n=1, seeds=1, full_budget=4)
    assert {(c.arm, c.unfrozen_blocks) for c in chosen} == {("src", 3), ("scratch", 5)}  # src@k=0 was cut
    configs = study.finalists([TrialResult(c, "FINISHED", 2, best_val_acc=0.8) for c in chosen], 0, 2)
    finals = [_r(c.arm, c.unfrozen_blocks, 0, c.seed, 0.8, 0.8 if c.arm == "src" else 0.7, "final")
              for c in configs]
    a = stats.analyze(search + finals, {0: 0.2})
    assert [(c.arm, c.depth, c.trials) for c in stats.cut_cells(a)] == [("src", 0, 2)]
    header = {"experiment": "x", "arch": "resnet18", "dataset": "d", "classes": 5, "n_train": 1, "n_val": 1,
              "n_test": 1, "crop": 32, "seed": 0}
    md = render.markdown(header, "p" * 32, search + finals, a, {}, set())
    assert "cut 1 cells before their full budget" in md and "src@k=0 after 2 trials (best search val 61.0%)" in md
    assert "This run trained 10 search trials and 4 finals where the grid design would train 12 and 6" in md


def test_a_plain_sweeps_report_says_what_faults_cost_and_ranks_nothing_when_all_trials_tie():
    import dataclasses

    from tl_sweep.report import render

    results = [_r("scratch", d, 0, i, 0.5, bs=16 * (1 + i % 2)) for i, d in enumerate([0, 2, 5, 0])]
    space = {"batch_size": {"choices": [16, 32, 64]}, "unfrozen_blocks": {"low": 0, "high": 5, "log": False,
                                                                          "int": True}}
    # fANOVA itself raises on zero variance
    assert importance.importance(importance.search_study(results, space)) == {}
    results[0] = dataclasses.replace(results[0], retries=2)
    results[1] = dataclasses.replace(results[1], delayed=7)
    header = {"experiment": "x", "arch": "resnet18", "dataset": "d", "classes": 2, "n_train": 8, "n_val": 8,
              "n_test": 0, "crop": 32, "seed": 0, "val_chance": "0.5"}
    md = render.sweep_markdown(header, "p" * 32, results, {}, set(), (0.5, 0.5, 0.6, 4))
    assert "1 trial lost a worker or node and continued from its last checkpoint (2 retries" in md
    assert "A tracking outage held back 7 writes of 1 run on local disk" in md
    assert "is not above the majority-class rate" in md and "## Search" not in md


def test_the_report_reads_each_dimensions_distribution_from_the_spec_not_from_the_values():
    """A list is categorical (batch 16, 32, 64: three ticks, not 16..64), a log range stays log, a study's depths
    are its grid; a constant is no dimension. Read back from the parent run's params as the spec logged them."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from conftest import SPEC
    from tl_sweep import spec
    from tl_sweep.report import collect

    cfg = spec.load(SPEC, ["search.space.epochs={low: 2, high: 6}", "search.space.weight_decay=0.01"])
    space = collect.space(cfg.params())
    assert space["batch_size"] == {"choices": [16, 32, 64]} and space["optimizer"] == {"choices": ["sgd", "adam",
                                                                                                  "adamw"]}
    assert space["lr_mult"] == {"low": 0.1, "high": 10, "log": True, "int": False}
    assert space["epochs"] == {"low": 2, "high": 6, "log": False, "int": True}
    assert space["unfrozen_blocks"] == {"choices": [0, 2, 5]} and "weight_decay" not in space
    assert isinstance(importance.distribution(space["batch_size"]), CategoricalDistribution)
    assert importance.distribution(space["lr_mult"]) == FloatDistribution(0.1, 10, log=True)
    assert importance.distribution(space["epochs"]) == IntDistribution(2, 6)
    results = [_r("src", d, 0, i, 0.5 + i / 20, bs=(16, 32, 64)[i % 3]) for i, d in enumerate([0, 2, 5, 0, 2, 5])]
    study = importance.search_study(results, space)
    assert set(study.trials[0].distributions) == {"batch_size", "unfrozen_blocks"}  # what varied
    assert study.trials[-1].value == pytest.approx(75.0)  # percent, as every accuracy a person reads


def _study_with_images(gaps: list[float], n: int = 150, seeds=(1000, 1001, 1002, 1003, 1004), chance=0.2,
                       source=0.9):
    """A study of one source and scratch over len(gaps) search repeats, with per-image predictions: in repeat r
    the source is right on ``source`` (90%) of the images and scratch on that − gaps[r] (each seed flips a few of
    them)."""
    rng = np.random.default_rng(0)
    results, predictions = [], {}
    for r, gap in enumerate(gaps):
        hard = rng.random(n)  # image difficulty, shared by both arms (the pairing)
        for arm, depth, acc in (("src", 0, source), ("scratch", 5, source - gap)):
            results.append(_r(arm, depth, r, r, 0.8))
            results.append(_r(arm, depth, r, 2000 + r, 0.8, role="candidate"))
            for sd in seeds:
                right = (hard + rng.normal(0, 0.03, n) < acc).astype(int)
                res = _r(arm, depth, r, sd, 0.8, float(right.mean()), "final")
                res = dataclasses.replace(res, run_id=f"{arm}-{r}-{sd}")
                predictions[res.run_id] = {100 * r + i: int(v) for i, v in enumerate(right)}
                results.append(res)
    return results, predictions, {r: chance for r in range(len(gaps))}


def test_the_headline_is_one_ntg_per_source_pooled_over_repeats_seeds_and_images():
    results, predictions, chance = _study_with_images([0.20, 0.06, 0.03])
    a = stats.analyze(results, chance, predictions)
    assert a.images and set(a.verdicts) == {"src"}
    v = a.verdicts["src"]
    per_repeat = [c.gap for c in a.primary]
    assert [g.gap for g in per_repeat] == pytest.approx([-0.20, -0.06, -0.03], abs=0.02)  # NTG < 0: a gain
    # the repeats disagree far beyond each one's interval: the pooled interval says so, and so does the verdict
    assert v.pooled.heterogeneous and "depends on the search repeat" in v.verdict
    assert v.pooled.hi - v.pooled.lo > max(g.hi - g.lo for g in per_repeat)
    assert v.pooled.lo < -0.2 or v.pooled.hi > -0.03  # wider than the span of the estimates' own intervals
    assert v.stability == a.stability("src") and sum(v.stability.values()) == 3
    assert math.isfinite(v.mde) and v.mde > 0


def test_agreeing_repeats_resolve_a_gain_and_a_null_result_reads_with_what_the_design_could_see():
    results, predictions, chance = _study_with_images([-0.10, -0.11, -0.09], n=300)
    v = stats.analyze(results, chance, predictions).verdicts["src"]
    assert v.pooled.p_holm < 0.05 and v.verdict.startswith("negative transfer") and not v.pooled.heterogeneous
    results, predictions, chance = _study_with_images([0.0, 0.005, -0.005], n=300)
    v = stats.analyze(results, chance, predictions).verdicts["src"]
    assert v.pooled.p_holm > 0.05
    assert v.verdict.startswith(("no difference larger than", "not resolved: the design resolves only"))
    assert f"{100 * v.mde:.1f} points" in v.verdict


def test_a_cell_whose_seeds_all_agree_is_tested_over_its_test_images():
    results, predictions, chance = _study_with_images([0.0], n=76, chance=41 / 76)
    for res in results:  # every seed of every final right on the same 42 of 76 images
        if res.run_id:
            predictions[res.run_id] = {i: int(i < 42) for i in range(76)}
    a = stats.analyze(results, chance, predictions)
    assert all(0.3 < c.p_chance <= 1 and not c.above_chance for c in a.cells.values() if c.final_test)


def test_chance_in_the_headline_is_pooled_over_the_repeats_as_its_ntg_is():
    """Hymenoptera's case (2026-12-07): on 76 test images scratch at ~66% is above the 54% majority rate in every
    repeat, but no single repeat shows it after Holm over the study's cells; the source stays at chance. Pooled
    over the repeats, scratch is above chance and the source is not: negative transfer with the source at chance,
    not "no verdict: neither above chance" (what requiring every repeat's cell to pass said)."""
    results, predictions, chance = _study_with_images([-0.12, -0.12, -0.12, -0.12], n=76, seeds=(1000, 1001, 1002),
                                                      chance=41 / 76, source=0.54)
    a = stats.analyze(results, chance, predictions)
    scratch = [c for c in a.cells.values() if c.arm == "scratch" and c.final_test]
    assert not all(c.above_chance for c in scratch)  # per cell (Holm over 8 cells) not every repeat shows it
    assert a.pooled_chance["scratch"] < 0.05 < a.pooled_chance["src"]
    v = a.verdicts["src"]
    assert "neither above chance" not in v.verdict and v.verdict.endswith("(source not above chance)"), v.verdict
    assert v.pooled.value > 0.05  # the source is worse: a positive NTG
    from tl_sweep.report import render

    said = "\n".join(render.findings(a))
    assert "`src` **not shown above it**" in said and "`scratch` above it" in said  # the pooled chance test
    assert "the finals of k=0 in every search repeat are not shown above" in said  # one phrase, not 4 cells
