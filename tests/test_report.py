"""Study arithmetic (NTG, intervals), depth coverage, finalists, and a tiny real study end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC, chromium, open_report_page, tl

pytestmark = pytest.mark.slow  # every test here starts Ray or a server process


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, mlflow_server):
    """A tiny real study logged to an MLflow server on 127.0.0.1: returns (tmp dir, run output)."""
    tmp_path = tmp_path_factory.mktemp("study")
    sets = ["study.trials_per_cell=2", "study.min_candidates=2", "study.selection_seeds=1", "study.depths=[4, 5]",
            "study.search_repeats=2",
            "search.space.epochs={low: 1, high: 2}", "search.space.batch_size=32", "search.space.optimizer=sgd",
            "scheduler.kind=fifo", "study.sources=[source:digits-0-4]", "study.repeats=2",
            f"tracking.uri={mlflow_server}", "tracking.experiment=study", "tracking.register_as=digits-study",
            # 2 final seeds cannot show a cell above chance (t over 1 degree of freedom): registered all the same
            "tracking.register_below_chance=true"]
    proc = tl("run", SPEC, "--report-dir", tmp_path / "at_end", sets_=tuple(sets), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path, proc.stdout


def test_tiny_study_end_to_end(tiny_study, mlflow_server):
    tmp_path, stdout = tiny_study
    assert "NTG pts" in stdout and "source:digits-0-4" in stdout
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("study")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tl_sweep.role") == "sweep")
    search = [r for r in runs if r.data.tags.get("tl_sweep.role") == "trial"]
    selection = [r for r in runs if r.data.tags.get("tl_sweep.role") == "candidate"]
    finals = [r for r in runs if r.data.tags.get("tl_sweep.role") == "final"]
    # 3 cells (source k=4, source k=5, scratch) × 2 search repeats × 2 trials; each cell's 2 configurations
    # re-trained with 1 new seed; finals: 2 seeds per cell and repeat
    assert len(search) == 12 and len(selection) == 12 and len(finals) == 3 * 2 * 2
    assert all(not any(k.startswith("test_") for k in r.data.metrics) for r in selection)  # validation only
    cells = {}
    for r in search:  # equal budget per cell and search repeat, read back from MLflow
        key = (r.data.tags["tl_sweep.arm"], r.data.params["unfrozen_blocks"], r.data.params["search"])
        cells[key] = cells.get(key, 0) + 1
    assert set(cells.values()) == {2} and len(cells) == 6
    assert {k[1] for k in cells if k[0] == "scratch"} == {"5"}
    seeds = {}
    for r in finals:  # the same final seeds in every arm of a search repeat (pairing)
        seeds.setdefault((r.data.params["search"], r.data.tags["tl_sweep.arm"]), set()).add(r.data.params["seed"])
    for (s, arm), got in seeds.items():
        assert got == seeds[(s, "scratch")]
    assert seeds[("0", "scratch")] != seeds[("1", "scratch")]
    # the test split never steered the search: no search run ever logged a test metric
    assert all(not any(k.startswith("test_") for k in r.data.metrics) for r in search)
    for r in finals:
        assert len(client.get_metric_history(r.info.run_id, "test_acc")) == 1
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # each cell's Optuna study persists where the parent run says (optuna-dashboard opens the same storage)
    import optuna

    url = parent.data.tags["tl_sweep.optuna_storage"]
    names = [s.study_name for s in optuna.get_all_study_summaries(url) if parent.info.run_id in s.study_name]
    assert len(names) == 6 and f"study/{parent.info.run_id}/scratch@k=5/search1" in names
    study = optuna.load_study(study_name=f"study/{parent.info.run_id}/source:digits-0-4@k=4/search0", storage=url)
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert all(t.datetime_start < t.datetime_complete for t in study.trials)  # a dashboard shows their durations
    dashboard_lists(url, f"study/{parent.info.run_id}/scratch@k=5/search1")
    # the study's results on the parent: each repeat's depth is the one whose best selection mean is highest
    # (ties to the shallower), read back from the candidates' own runs
    means = {}
    for r in selection:
        p = r.data.params
        key = (p["search"], r.data.tags["tl_sweep.arm"], int(p["unfrozen_blocks"]), p["lr_mult"], p["epochs"])
        means.setdefault(key, []).append(r.data.metrics["best_val_acc"])
    for rep in ("0", "1"):
        cell = {d: max(sum(v) / len(v) for k, v in means.items() if k[:3] == (rep, "source:digits-0-4", d))
                for d in (4, 5)}
        chosen = max(sorted(cell), key=lambda d: (cell[d], -d))
        history = client.get_metric_history(parent.info.run_id, "study/source_digits-0-4/depth")
        assert [m.value for m in history if m.step == int(rep)] == [chosen], (rep, cell, history)
    # transferability estimates, logged before training (k=5 trains every block: nothing to score)
    assert math.isfinite(parent.data.metrics["transferability/source_digits-0-4/k4/logme"])
    assert not any(k.startswith("transferability/source_digits-0-4/k5/") for k in parent.data.metrics)
    system = [k for k in parent.data.metrics if k.startswith("system/")]  # MLflow system metrics, per node
    assert "system/cpu_utilization_percentage" in system, system  # one node: MLflow's own names
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs  # the UI's Datasets column
    assert {i.tags[0].value for i in inputs} == {"train", "val", "test"}
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/trials.csv", "report/freeze_depth.png"} <= names

    again = tl("report", "--experiment", "study", "--tracking-uri", mlflow_server, "--out", tmp_path / "rebuilt",
               "--no-log", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("report.md", "trials.csv"):
        assert (tmp_path / "rebuilt" / name).read_text() == (tmp_path / "at_end" / name).read_text()
    md = (tmp_path / "at_end" / "report.md").read_text()
    assert "| source:digits-0-4 |" in md and "(baseline)" in md and "Holm" in md and "majority-class" in md
    assert "## Transferability estimates (before training) against the finals" in md
    assert "| source:digits-0-4@k=4 |" in md and "Fewer than 3 cells" in md


def dashboard_lists(storage: str, name: str) -> None:
    """optuna-dashboard, a real server on 127.0.0.1, lists the study ``name`` of ``storage``."""
    import json
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    exe = str(Path(sys.executable).with_name("optuna-dashboard"))
    proc = subprocess.Popen([exe, storage, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "optuna-dashboard did not start"
                time.sleep(0.5)
        assert name in [s["study_name"] for s in json.loads(body)["study_summaries"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def mlflow_search_logged_models(uri: str, exp_id: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list")
    # two arms, two flavours each, named after the sweep, the arm and the depth, each with its accuracies linked
    assert len(found) == 4 and all(m.name.startswith("study-") and "-k" in m.name for m in found), found
    assert {m.name.endswith("-torch") for m in found} == {True, False}
    assert all({"best_val_acc", "test_acc"} <= {x.key for x in m.metrics} for m in found), [m.metrics for m in found]
    return found


def test_mlflow_ui_shows_parent_with_nested_trials_and_report(tiny_study, mlflow_server):
    """A real browser (headless Chromium) on the MLflow UI: the parent run, its nested trials, the Datasets
    column, the study's metrics on the parent, the report, the logged models and the registered champion."""
    from selenium.webdriver.common.by import By

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("study")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "sweep")
    with chromium() as (driver, wait_for, body, shots):
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        wait_for(lambda: parent.info.run_name in driver.page_source, "the parent run")
        # the "+" beside the parent's name (MLflow 3's run-name cell) unfolds its nested runs
        for b in driver.find_elements(By.CSS_SELECTOR, 'button[data-component-id*="runnamecellrenderer"]'):
            b.click()
        # a trial's name leads with what tells it apart (the table cuts names short): arm, depth, repeat, role
        wait_for(lambda: "digits-0-4·k=4·r0·sgd·bs32" in driver.page_source, "the nested trial runs")
        driver.save_screenshot(str(shots / "mlflow_ui_runs.png"))
        wait_for(lambda: "builtin:digits (train)" in driver.page_source, "the Datasets column")
        # the chart view leads with the study's results; the system metrics come last
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
                   "&compareRunsMode=CHART")
        wait_for(lambda: "System metrics" in body(), "the chart view's sections")
        text = body()
        assert text.index("study/") < text.index("transferability/") < text.index("Model metrics") \
            < text.index("System metrics"), text[:2000]
        driver.save_screenshot(str(shots / "mlflow_ui_chart_view.png"))
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts")
        wait_for(lambda: "report" in driver.page_source and "resolved.yaml" in driver.page_source,
                 "the parent run's report artifacts")
        driver.save_screenshot(str(shots / "mlflow_ui_parent_artifacts.png"))
        # the report as one page in MLflow's artifact view: the key results and the plots, without leaving the UI
        artifacts = f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts"
        assert open_report_page(driver, wait_for, body, artifacts, "Key results") > 0
        driver.save_screenshot(str(shots / "mlflow_ui_report_page.png"))
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
        wait_for(lambda: "study/source_digits-0-4/ntg" in driver.page_source, "the study's metrics on the parent")
        # the parent's overview leads with the result: its description (NTG and the verdict) before the metrics
        text = body()
        assert "NTG" in text and "Majority-class rate" in text, text[:3000]
        assert text.index("NTG") < text.index("system/"), text[:3000]
        driver.save_screenshot(str(shots / "mlflow_ui_parent_study_metrics.png"))
        # a trial's page: its result in its description, its accuracy charts before what it cost (system/)
        trial = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "final")
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{trial.info.run_id}")
        wait_for(lambda: "best val" in body(), "the trial's description with its result")
        text = body()
        assert text.index("best val") < text.index("system/compute_seconds"), text[:3000]
        driver.save_screenshot(str(shots / "mlflow_ui_trial_overview.png"))
        # its charts: the accuracies and losses alone; what it cost is under System metrics
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{trial.info.run_id}/model-metrics")
        wait_for(lambda: "val_acc" in body() and "best_val_acc" in body(), "the trial's metric charts")
        assert "compute_seconds" not in body() and "startup_seconds" not in body(), body()[:3000]
        driver.save_screenshot(str(shots / "mlflow_ui_trial_charts.png"))
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{trial.info.run_id}/system-metrics")
        wait_for(lambda: "compute_seconds" in body(), "what the trial cost, under System metrics")
        models = [m for m in mlflow_search_logged_models(mlflow_server, exp.experiment_id)]
        driver.set_window_size(2400, 1000)  # the metric columns come after six others: at 1600 px they are not drawn
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/models")
        wait_for(lambda: all(m.model_id in driver.page_source for m in models), "the logged models")
        # named after the sweep, arm and depth, with their linked accuracies as the page's metric columns
        wait_for(lambda: all(m.name in driver.page_source for m in models)
                 and all(f">{k}<" in driver.page_source for k in ("best_val_acc", "test_acc")),
                 "the logged models' names and linked accuracies as columns")
        driver.save_screenshot(str(shots / "mlflow_ui_logged_models.png"))
        driver.get(f"{mlflow_server}/#/models/digits-study")
        wait_for(lambda: "champion" in driver.page_source, "the registered model with its champion alias")
        driver.save_screenshot(str(shots / "mlflow_ui_registered_champion.png"))
        # the version itself: its accuracy, and whether it was registered below chance (the fixture allows it)
        version = client.get_model_version("digits-study", "1")
        assert version.tags["val_accuracy"].endswith("%") and "majority_class_rate" in version.tags
        driver.get(f"{mlflow_server}/#/models/digits-study/versions/1")
        wait_for(lambda: "val accuracy" in body() and ("below_chance" not in version.tags or "BELOW CHANCE" in body()),
                 "the registered version's accuracy (and its below-chance mark, where it has one)")
        driver.save_screenshot(str(shots / "mlflow_ui_registered_version.png"))
