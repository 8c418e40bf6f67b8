"""Study arithmetic (NTG, intervals), depth coverage, finalists, and a tiny real study end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import SPEC
from tl_sweep.report import stats


def test_mean_ci_on_known_numbers():
    m, lo, hi = stats.mean_ci([0.8, 0.9, 1.0])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) × sd / sqrt(n)
    assert m == pytest.approx(0.9) and lo == pytest.approx(0.9 - half) and hi == pytest.approx(0.9 + half)
    assert math.isnan(stats.mean_ci([0.7])[1])


def test_ntg_is_pretrained_error_minus_scratch_error():
    gap, lo, hi = stats.ntg([0.70, 0.72, 0.74], [0.90, 0.91, 0.92])
    assert gap == pytest.approx(0.19)  # error 0.28 − error 0.09
    # Welch: variances 4e-4/3 and 1e-4/3, dof = 2.94 → 3
    se = math.sqrt(4e-4 / 3 + 1e-4 / 3)
    assert hi - gap == pytest.approx(3.182446305284263 * se)
    assert stats.verdict(gap, lo, hi) == "negative transfer"
    assert stats.verdict(*stats.ntg([0.95, 0.96, 0.97], [0.80, 0.81, 0.82])) == "transfer gain"
    assert stats.verdict(*stats.ntg([0.80, 0.90, 0.85], [0.84, 0.86, 0.85])) == "no significant difference"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, mlflow_server):
    """A tiny real study logged to an MLflow server on 127.0.0.1: returns (tmp dir, run output)."""
    tmp_path = tmp_path_factory.mktemp("study")
    sets = ["search.num_trials=4", "search.space.unfrozen_blocks={low: 4, high: 5}",
            "search.space.epochs={low: 1, high: 2}", "search.space.batch_size=32", "search.space.optimizer=sgd",
            "scheduler.kind=fifo", "study.sources=[source:digits-0-4]", "study.repeats=2",
            f"tracking.uri={mlflow_server}", "tracking.experiment=study"]
    cmd = [sys.executable, "-m", "tl_sweep.cli", "run", str(SPEC), "--report-dir", str(tmp_path / "at_end")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=900)
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
    finals = [r for r in runs if r.data.tags.get("tl_sweep.role") == "final"]
    assert len(search) == 8 and len(finals) == (2 + 1) * 2
    depths = sorted(int(r.data.params["unfrozen_blocks"]) for r in search
                    if r.data.tags["tl_sweep.arm"] == "source:digits-0-4")
    assert depths == [4, 4, 5, 5]  # every depth, two trials each
    assert {int(r.data.params["unfrozen_blocks"]) for r in search if r.data.tags["tl_sweep.arm"] == "scratch"} == {5}
    # the test split never steered the search: no search run ever logged a test metric
    assert all(not any(k.startswith("test_") for k in r.data.metrics) for r in search)
    for r in finals:
        assert len(client.get_metric_history(r.info.run_id, "test_acc")) == 1
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/trials.csv", "report/freeze_depth.png"} <= names

    again = subprocess.run([sys.executable, "-m", "tl_sweep.cli", "report", "--experiment", "study",
                            "--tracking-uri", mlflow_server, "--out", str(tmp_path / "rebuilt"), "--no-log"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("report.md", "trials.csv"):
        assert (tmp_path / "rebuilt" / name).read_text() == (tmp_path / "at_end" / name).read_text()
    md = (tmp_path / "at_end" / "report.md").read_text()
    assert "| source:digits-0-4 |" in md and "(baseline)" in md


def test_mlflow_ui_shows_parent_with_nested_trials_and_report(tiny_study, mlflow_server):
    """A real browser (headless Chromium) on the MLflow UI: the parent run, its nested trials, the report."""
    import shutil
    import time
    from pathlib import Path

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("study")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tl_sweep.role") == "sweep")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1000"):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    shots = Path(os.environ.get("TL_SWEEP_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
    shots.mkdir(parents=True, exist_ok=True)

    def wait_for(predicate, what: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        driver.save_screenshot(str(shots / "mlflow_ui_failure.png"))
        raise AssertionError(f"the MLflow UI never showed {what}")

    try:
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        wait_for(lambda: parent.info.run_name in driver.page_source, "the parent run")
        # the "+" beside the parent's name (MLflow 3's run-name cell) unfolds its nested runs
        for b in driver.find_elements(By.CSS_SELECTOR, 'button[data-component-id*="runnamecellrenderer"]'):
            b.click()
        wait_for(lambda: "resnet18·k=4·sgd·bs32" in driver.page_source, "the nested trial runs")
        driver.save_screenshot(str(shots / "mlflow_ui_runs.png"))
        driver.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts")
        wait_for(lambda: "report" in driver.page_source and "resolved.yaml" in driver.page_source,
                 "the parent run's report artifacts")
        driver.save_screenshot(str(shots / "mlflow_ui_parent_artifacts.png"))
    finally:
        driver.quit()
