"""Transferability estimates on cases with known answers: separable beats shuffled, LogME is scale invariant
and equals the maximised marginal likelihood (checked by a direct optimisation), H-score, LEEP and NCE equal
their definitions computed by hand on small examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from tl_sweep import transferability as tr


def separable(n=120, d=16, classes=4, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.normal(size=(classes, d)) * 3
    return centres[y] + noise * rng.normal(size=(n, d)), y


@pytest.mark.parametrize("estimate", [tr.logme, tr.hscore])
def test_separable_features_score_above_the_same_features_with_shuffled_labels(estimate):
    f, y = separable()
    shuffled = np.random.default_rng(1).permutation(y)
    assert estimate(f, y) > estimate(f, shuffled) + 0.1


def test_logme_is_invariant_to_feature_scaling():
    f, y = separable()
    assert tr.logme(f * 1000.0, y) == pytest.approx(tr.logme(f, y), abs=1e-6)
    assert tr.logme(f * 1e-3, y) == pytest.approx(tr.logme(f, y), abs=1e-6)


def test_logme_is_the_maximised_log_evidence():
    """Per class: max over (alpha, beta) of log N(t | 0, I/beta + F F^T/alpha), found here by a generic
    optimiser, equals LogME's fixed point; averaged over classes, divided by n."""
    f, y = separable(n=40, d=6, classes=3, noise=1.0)
    direct = []
    for c in range(3):
        t = (y == c).astype(float)

        def neg(log_ab):
            a, b = np.exp(log_ab)
            cov = np.eye(len(t)) / b + f @ f.T / a
            return -multivariate_normal(np.zeros(len(t)), cov).logpdf(t)

        best = minimize(neg, x0=[0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12,
                                                                              "maxiter": 4000})
        direct.append(-best.fun / len(t))
    assert tr.logme(f, y) == pytest.approx(np.mean(direct), abs=1e-5)


def test_logme_with_more_dimensions_than_images():
    f, y = separable(n=30, d=500, classes=3)
    value = tr.logme(f, y)
    assert math.isfinite(value)
    assert value > tr.logme(f, np.random.default_rng(2).permutation(y))
    assert tr.logme(f * 7.0, y) == pytest.approx(value, abs=1e-6)


def test_hscore_is_the_between_class_share_of_variance_in_one_dimension():
    f = np.array([[0.0], [2.0], [4.0], [10.0]])
    y = np.array([0, 0, 1, 1])
    # class means 1 and 7 around the mean 4: between-class variance 9; total variance (16+4+0+36)/4 = 14
    assert tr.hscore(f, y, shrinkage=0) == pytest.approx(9 / 14)
    # shrunk by a towards mu = 14 (one dimension: the identity term is the variance itself): unchanged
    assert tr.hscore(f, y, shrinkage=0.3) == pytest.approx(0.7 * 9 / 14)


def test_plain_hscore_saturates_with_more_dimensions_than_images_and_the_shrunk_one_does_not():
    good, y = separable(n=40, d=64, classes=4, noise=0.3)
    bad = np.random.default_rng(3).normal(size=good.shape)  # no class structure at all
    assert tr.hscore(good, y, shrinkage=0) == pytest.approx(3.0) == pytest.approx(tr.hscore(bad, y, shrinkage=0))
    assert tr.hscore(good, y) > tr.hscore(bad, y) + 0.5


def test_ranks_share_ties():
    assert tr.ranks({"a": 0.5, "b": 0.5, "c": 0.1, "d": 0.9}) == {"d": 1, "a": 2, "b": 2, "c": 4}


def test_leep_by_hand():
    theta = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # source classifier over its 2 labels
    y = np.array([0, 1, 1])
    joint = np.zeros((2, 2))
    for i in range(3):
        joint[y[i]] += theta[i] / 3
    cond = joint / joint.sum(axis=0)
    expected = np.mean([math.log(sum(cond[y[i], z] * theta[i, z] for z in range(2))) for i in range(3)])
    assert tr.leep(theta, y) == pytest.approx(expected)
    assert tr.leep(np.eye(2)[[0, 1, 1]], y) == pytest.approx(0.0)  # source labels that are the target's


def test_nce_is_minus_the_conditional_entropy():
    z = np.array([0, 0, 1, 1, 2, 2])
    assert tr.nce(z, np.array([5, 5, 6, 6, 7, 7])) == pytest.approx(0.0)  # y is a function of z
    y = np.array([0, 1, 0, 1, 0, 1])
    assert tr.nce(z, y) == pytest.approx(-math.log(2))  # y independent of z: -H(Y)


def test_agreement_on_rankings_that_are_known():
    from tl_sweep.report import render, stats

    truth = {("a", 0): 0.9, ("a", 2): 0.8, ("b", 0): 0.6, ("b", 2): 0.5}
    right = {c: {"logme": v * 10, "leep": -v} for c, v in truth.items()}  # LogME agrees, LEEP is reversed
    agree = {g.estimate: g for g in stats.agreement(right, truth)}
    assert agree["logme"].tau == pytest.approx(1.0) and agree["logme"].weighted_tau == pytest.approx(1.0)
    assert agree["logme"].right_top and agree["logme"].cells == 4
    assert agree["leep"].tau == pytest.approx(-1.0) and not agree["leep"].right_top
    md = "\n".join(render.estimates_section(right, truth, list(agree.values())))
    assert "LogME: Kendall τ = +1.00" in md and "ranked the finals' best cell (a@k=0) first" in md
    assert "LEEP: Kendall τ = -1.00" in md and "got the ranking wrong at the top" in md and "put b@k=2 first" in md
    assert stats.agreement({("a", 0): {"logme": 1.0}}, truth) == []  # under 3 cells: no correlation claimed
    # LEEP and NCE do not depend on depth: a tie at the top is said as a tie, right when it holds the best cell
    tied = {c: {"nce": {"a": 1.0, "b": 0.0}[c[0]]} for c in truth}
    (g,) = stats.agreement(tied, truth)
    assert g.top_estimated == [("a", 0), ("a", 2)] and g.right_top
    assert "ties a@k=0 and a@k=2 at the top" in "\n".join(render.estimates_section(tied, truth, [g]))


def test_estimate_on_a_real_spec_prints_ranks_and_logs_a_run(cli, tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import SPEC

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code, out, err = cli("estimate", SPEC, "--set", "study.sources=[source:digits-0-4]",
                         "--set", "study.depths=[0, 2, 5]", "--set", f"tracking.uri={uri}")
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| source")}
    assert set(rows) == {"source:digits-0-4@k=0", "source:digits-0-4@k=2", "source:digits-0-4@k=5"}
    assert "(1)" in rows["source:digits-0-4@k=0"] + rows["source:digits-0-4@k=2"]
    assert "no frozen prefix" in rows["source:digits-0-4@k=5"]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("freeze-depth").experiment_id])
    run = next(r for r in runs if r.data.tags.get("tl_sweep.role") == "estimate")
    m = run.data.metrics
    assert {"transferability/source_digits-0-4/k0/logme", "transferability/source_digits-0-4/k2/hscore",
            "transferability/source_digits-0-4/k0/leep", "transferability/source_digits-0-4/k2/nce"} <= set(m)
    assert all(math.isfinite(v) for v in m.values())


def test_estimate_under_feature_cache_false_stores_no_features(cli, cache_dir, tmp_path):
    """The estimates need the prefix features; a spec that turned the feature store off gets them computed and
    dropped (k=1: a key no other test stores, so a file appearing here is this run's; the second run checks
    that, since it must add exactly one)."""
    from conftest import SPEC

    def stored() -> set:
        return set(cache_dir.rglob("features/*.npy"))

    before = stored()
    code, out, err = cli("estimate", SPEC, "--set", "study.sources=[source:digits-0-4]", "--set", "study.depths=[1]",
                         "--set", "data.feature_cache=false",
                         "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| source:digits-0-4@k=1"))
    assert "(1)" in row  # estimated
    assert stored() == before
    code, out, err = cli("estimate", SPEC, "--set", "study.sources=[source:digits-0-4]", "--set", "study.depths=[1]",
                         "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}")
    assert code == 0, err
    assert len(stored() - before) == 1  # the store on: the train split's features


def test_the_knn_probe_is_sklearns_leave_one_out_knn_and_separates_from_shuffled():
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    f, y = separable(n=60, d=8, classes=2, noise=8.0, seed=3)  # overlapping: neither 0 nor 1
    ours = tr.knn_probe(f, y, k=5)
    # standardised on every image (the probe uses no label to do it), then leave-one-out; odd k, 2 classes: no ties
    theirs = cross_val_score(KNeighborsClassifier(5, metric="cosine"), StandardScaler().fit_transform(f), y,
                             cv=LeaveOneOut()).mean()
    assert 0.5 < ours < 1.0 and ours == pytest.approx(theirs)
    assert tr.knn_probe(*separable(noise=0.1)) == 1.0
    rng = np.random.default_rng(4)  # labels that have nothing to do with the features: about chance (4 classes)
    assert tr.knn_probe(f := rng.normal(size=(400, 16)), rng.integers(0, 4, 400)) < 0.35
    assert tr.knn_probe(f[:6], np.array([0, 0, 1, 1, 2, 2]), k=5) >= 0  # k shrinks to the smallest class - 1


def test_the_report_says_when_no_estimator_beats_the_knn_probe():
    from tl_sweep.report import render, stats

    truth = {("a", 0): 0.9, ("a", 2): 0.8, ("b", 0): 0.6, ("b", 2): 0.5}
    scores = {c: {"knn": v, "logme": -v, "hscore": v * 2} for c, v in truth.items()}  # H-score ties the probe
    agree = stats.agreement(scores, truth)
    md = "\n".join(render.estimates_section(scores, truth, agree))
    assert "k-NN probe: Kendall τ = +1.00" in md and "**no estimator beats the k-NN probe**" in md
    scores = {c: {"knn": -v, "logme": v} for c, v in truth.items()}
    md = "\n".join(render.estimates_section(scores, truth, stats.agreement(scores, truth)))
    assert "LogME beats it" in md and "one swapped pair moves τ by 0.33" in md
