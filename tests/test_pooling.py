"""Estimates over seeds, test images and search repeats (report/pooling.py), on cases with known answers and
against statsmodels' meta-analysis (verified against R's metafor) and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tl_sweep.report import pooling


def test_identical_seeds_are_not_no_spread_the_images_are_still_a_sample():
    rng = np.random.default_rng(0)
    c = (rng.random(76) < 0.55).astype(float)
    e = pooling.crossed(np.tile(c, (3, 1)))  # three seeds, the very same predictions
    assert e.var == pytest.approx(c.var(ddof=1) / 76) and e.df == pytest.approx(75)
    # 42 of 76 right three times against a 41/76 majority rate: not above chance (the old test said p = 0)
    y = np.tile(np.r_[np.ones(42), np.zeros(34)], (3, 1))
    p = pooling.above_chance(y, 41 / 76)
    assert 0.3 < p < 0.6
    # one-sided z on the binomial variance agrees
    assert p == pytest.approx(stats.t.sf((42 / 76 - 41 / 76) / math.sqrt((42 * 34 / 76 / 75) / 76), 75))
    # every seed right on every image: the exact binomial test
    assert pooling.above_chance(np.ones((3, 20)), 0.5) == pytest.approx(0.5 ** 20)


def test_seeds_that_only_shift_the_mean_give_the_t_over_seeds():
    a = np.array([0.9, 0.7, 0.8, 0.75, 0.85])
    e = pooling.crossed(np.repeat(a[:, None], 50, axis=1))  # no image effect at all
    assert e.value == pytest.approx(a.mean()) and e.var == pytest.approx(a.var(ddof=1) / 5)
    assert e.df == pytest.approx(4)
    lo, hi = e.interval()
    assert (lo, hi) == pytest.approx(stats.t.interval(0.95, 4, a.mean(), a.std(ddof=1) / math.sqrt(5)))


def test_the_crossed_variance_matches_the_spread_of_simulated_studies():
    """Seeds and images both random: the estimated variance of the mean is on average the variance of the mean
    over many simulated studies (within Monte Carlo error), where the seeds-only t and the images-only
    binomial variance each fall short."""
    rng = np.random.default_rng(1)
    s, n, sims = 5, 80, 3000
    means, est, seeds_only, images_only = [], [], [], []
    for _ in range(sims):
        logit = 0.5 + rng.normal(0, 0.6, (s, 1)) + rng.normal(0, 1.2, (1, n))
        y = (rng.random((s, n)) < 1 / (1 + np.exp(-logit))).astype(float)
        means.append(y.mean())
        est.append(pooling.crossed(y).var)
        seeds_only.append(y.mean(1).var(ddof=1) / s)
        images_only.append(y.mean(0).var(ddof=1) / n)
    truth = np.var(means, ddof=1)
    assert np.mean(est) == pytest.approx(truth, rel=0.12)
    assert np.mean(seeds_only) < 0.9 * truth and np.mean(images_only) < 0.9 * truth


def test_the_random_effects_pool_is_statsmodels_dersimonian_laird_with_hartung_knapp():
    from statsmodels.stats.meta_analysis import combine_effects

    y, v = np.array([-0.187, -0.061, -0.034, -0.09]), np.array([0.0010, 0.0006, 0.0005, 0.0009])
    ref = combine_effects(y, v, method_re="dl")
    tau2, q, fe = pooling.dersimonian_laird(y, v)
    assert tau2 == pytest.approx(ref.tau2) and q == pytest.approx(ref.q) and fe == pytest.approx(ref.mean_effect_fe)
    mu, se = pooling.hksj(y, v, tau2, modified=False)
    assert mu == pytest.approx(ref.mean_effect_re) and se == pytest.approx(ref.sd_eff_w_re_hksj)
    pooled = pooling.pool([pooling.Estimate(a, b, 50, 5, 179) for a, b in zip(y, v)])
    assert pooled.value == pytest.approx(ref.mean_effect_re) and pooled.df == 3
    assert pooled.i2 == pytest.approx(ref.i2) and pooled.p_q == pytest.approx(stats.chi2.sf(ref.q, 3))


def test_the_pooled_interval_is_not_narrower_than_the_repeats_disagree():
    """freeze-depth's MNIST source, 2026-12-04: per repeat −18.7 [−26.0, −11.3], −6.1 [−10.7, −1.6],
    −3.4 [−8.1, +1.4] (t over 5 seeds, 4 df). A pool that treats them as one sample of seeds would claim
    [−16.7, −1.5]-like certainty; the repeats themselves say the expected gain is anywhere from −30 to +10."""
    effects = [-18.7, -6.1, -3.4]
    half = [7.35, 4.55, 4.75]
    per_repeat = [pooling.Estimate(e, (h / stats.t.ppf(0.975, 4)) ** 2, 4, 5, 179) for e, h in zip(effects, half)]
    pooled = pooling.pool(per_repeat)
    over_repeats = stats.t.interval(0.95, 2, np.mean(effects), np.std(effects, ddof=1) / math.sqrt(3))
    assert pooled.lo <= -25 and pooled.hi >= 5  # about the t over repeats: −29.6 to +10.9
    assert pooled.hi - pooled.lo >= 0.9 * (over_repeats[1] - over_repeats[0])
    assert pooled.p > 0.05 and pooled.heterogeneous and pooled.i2 > 0.8
    assert 0.5 < pooled.below_zero < 1


def test_the_smallest_detectable_effect_of_one_estimate_is_about_2_8_standard_errors():
    one = pooling.pool([pooling.Estimate(0.01, 0.02 ** 2, math.inf, 5, 100)])
    assert pooling.mde(one, [math.inf]) == pytest.approx((1.96 + 0.8416) * 0.02, rel=0.04)
    three = pooling.pool([pooling.Estimate(0.01, 0.02 ** 2, 50, 5, 100)] * 3)
    # three repeats: more data, but the t with 2 df and the pool's own uncertainty; still a finite effect
    assert math.isfinite(pooling.mde(three)) and pooling.mde(three) > 0
    assert pooling.power(pooling.mde(three), [0.02 ** 2] * 3, 0.0) >= 0.8
