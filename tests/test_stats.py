"""The study's statistics on hand-computed numbers: intervals, paired and Welch (exact df), Holm, chance,
the depth tie rule, budget curves, and the verdicts a study can give."""

from __future__ import annotations

import math

import pytest

from tl_sweep.contract import TrialConfig, TrialResult
from tl_sweep.report import stats


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
    g = stats.paired([0.8, 0.8, 0.8], [0.9, 0.9, 0.9])
    assert math.isnan(g.lo) and math.isnan(g.p)
    assert stats.verdict(g, corrected=False).startswith("not resolved")


def test_holm_on_known_p_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    got = stats.holm([0.2, math.nan])
    assert got[0] == pytest.approx(0.2) and math.isnan(got[1])


def test_chance_and_the_verdicts():
    assert not stats.beats_chance([0.50, 0.52, 0.49], 0.5)  # the interval reaches the majority-class rate
    assert stats.beats_chance([0.80, 0.82, 0.81], 0.5)
    gain = stats.Gap(-0.1, -0.15, -0.05, 0.01, 4, True, 0.02)
    assert stats.verdict(gain) == "transfer gain"
    assert stats.verdict(gain, trained=False) == "did not train"
    assert stats.verdict(gain, baseline_trained=False) == "baseline did not train"
    assert stats.verdict(stats.Gap(0.1, 0.05, 0.15, 0.01, 4, True, 0.06)) == "no significant difference"
    assert stats.verdict(stats.Gap(0.1, 0.05, 0.15, 0.01, 4, True, 0.02)) == "negative transfer"


def test_expected_best_of_n_trials():
    vals = [0.1, 0.2, 0.3, 0.4]
    assert stats.expected_max(vals, 1) == pytest.approx(0.25)  # the mean
    # n = 2: P(max = v_i) = (i² − (i−1)²) / 16
    assert stats.expected_max(vals, 2) == pytest.approx((0.1 * 1 + 0.2 * 3 + 0.3 * 5 + 0.4 * 7) / 16)
    assert stats.expected_max(vals, 50) == pytest.approx(0.4, abs=1e-3)


def _r(arm, depth, search, seed, val, test=None, role="trial"):
    c = TrialConfig(batch_size=32, optimizer="sgd", lr_mult=1.0, head_lr_mult=1.0, weight_decay=0.0,
                    layer_decay=1.0, unfrozen_blocks=depth, epochs=2, arm=arm, seed=seed, role=role, search=search)
    return TrialResult(c, "FINISHED", 2, best_val_acc=val, test_acc=test, seconds=1.0)


def test_analysis_chooses_depth_on_validation_ties_shallow_and_pairs_by_seed():
    results = [_r("src", 0, 0, 0, 0.7), _r("src", 3, 0, 0, 0.8), _r("scratch", 5, 0, 0, 0.6)]
    seeds = (1000, 1001, 1002)
    for s, (a, b, c) in zip(seeds, [(0.80, 0.95, 0.70), (0.82, 0.93, 0.71), (0.81, 0.94, 0.69)]):
        # depth 0 and 3 tie on finals' validation (0.9): the shallower is chosen, though depth 3 tests higher
        results += [_r("src", 0, 0, s, 0.9, a, "final"), _r("src", 3, 0, s, 0.9, b, "final"),
                    _r("scratch", 5, 0, s, 0.85, c, "final")]
    a = stats.analyze(results, chance={0: 0.2})
    assert a.chosen[("src", 0)] == 0 and a.chosen[("scratch", 0)] == 5
    (primary,) = a.primary
    assert primary.depth == 0 and primary.gap.paired
    assert primary.gap.gap == pytest.approx(0.70 - 0.81)  # scratch acc − source acc = source err − scratch err
    assert primary.verdict == "transfer gain" and primary.gap.p_holm == primary.gap.p  # one source
    assert {c.depth for c in a.per_depth} == {0, 3}
    assert a.stability("src") == {"transfer gain": 1}
    assert stats.budget_curves(results)[("src", 0)] == [0.7]
    assert stats.cost(results)[("src", 3)] == 4.0  # one search trial + three finals


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
    from tl_sweep import runner
    from tl_sweep.report import render

    search = ([_r("src", 0, 0, i, 0.6 + i / 100) for i in range(2)] + [_r("src", 3, 0, i, 0.8) for i in range(4)]
              + [_r("scratch", 5, 0, i, 0.7) for i in range(4)])
    configs = runner.finalists(search, seed=0, repeats=2, full_budget=4)
    assert {(c.arm, c.unfrozen_blocks) for c in configs} == {("src", 3), ("scratch", 5)}  # src@k=0 was cut
    finals = [_r(c.arm, c.unfrozen_blocks, 0, c.seed, 0.8, 0.8 if c.arm == "src" else 0.7, "final")
              for c in configs]
    a = stats.analyze(search + finals, {0: 0.2})
    assert [(c.arm, c.depth, c.trials) for c in stats.cut_cells(a)] == [("src", 0, 2)]
    header = {"experiment": "x", "arch": "resnet18", "dataset": "d", "classes": 5, "n_train": 1, "n_val": 1,
              "n_test": 1, "crop": 32, "seed": 0}
    md = render.markdown(header, "p" * 32, search + finals, a, {}, set())
    assert "cut 1 cells before their full budget" in md and "src@k=0 after 2 trials (best search val 61.0%)" in md
    assert "This run trained 10 search trials and 4 finals where the grid design would train 12 and 6" in md
